# Set-up and entry points for a fresh Debian 12 machine, run as root.
#   make demo   install everything, then run the main job on an embedded default
#   make test   install everything (test peers included), then lint, type-check and test

# Debian's own Python: python3-libnbd is built for it, and the venv sees it through
# --system-site-packages.
PY      ?= /usr/bin/python3
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.installed

.PHONY: all demo test lint typecheck unit bench peers clean

all: test

peers:
	PY=$(PY) tools/install-peers.sh

$(STAMP): pyproject.toml
	$(MAKE) peers
	$(PY) -m venv --system-site-packages $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VPY) -m pyfleece.demo

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench

typecheck: $(STAMP)
	$(VENV)/bin/mypy

unit: $(STAMP)
	$(VPY) -m pytest -q tests

test: $(STAMP)
	$(MAKE) peers
	$(MAKE) lint typecheck unit

bench: $(STAMP)
	$(VPY) bench/run.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis
