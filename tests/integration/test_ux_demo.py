"""``make demo`` as a newcomer reads it: the README's recipe, step by step, in a log that
reads well when it is not a terminal; a failure is one line, never a traceback."""

from __future__ import annotations

import errno
import re
import sys
from pathlib import Path

import pytest

from pyfleece import demo
from tests.support import run

README = Path(__file__).resolve().parents[2] / "README.md"


def recipe_lines() -> list[str]:
    """The monitor lines of README's recipe ("(HMP)"/"(QMP)" tagged), in order."""
    text = README.read_text()
    return re.findall(r"^(\S.*?)\s+\((?:HMP|QMP)\)$", text, re.M)


def test_demo_shows_the_readme_recipe_in_order() -> None:
    result = run([sys.executable, "-m", "pyfleece.demo"], timeout=120)
    out = result.stdout
    assert "\r" not in out  # not a terminal: no progress rewritten in place
    positions = [out.find(line) for line in recipe_lines()]
    assert len(positions) == 5 and -1 not in positions, out
    assert positions == sorted(positions), out
    assert "IDENTICAL" in out


def test_demo_failure_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def no_space(path: Path) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(demo, "make_disk", no_space)
    assert demo.main() == 1
    err = capsys.readouterr().err
    assert re.fullmatch(r"\npyfleece demo: failed: /\S+/disk.raw: No space left on device\n", err)
