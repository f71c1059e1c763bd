#!/usr/bin/env bash
# Installs the Debian packages pyfleece and its tests need, when any is missing.
# Runs apt-get update at most once, and only when something must be installed.
set -euo pipefail
py=${PY:-/usr/bin/python3}
missing=()
need() { # need PACKAGE TEST-COMMAND...
	local pkg=$1; shift
	"$@" >/dev/null 2>&1 || missing+=("$pkg")
}
need python3 test -x "$py"
need python3-venv "$py" -c 'import ensurepip, venv'
need qemu-utils command -v qemu-img
need qemu-utils command -v qemu-io
need qemu-utils command -v qemu-nbd
need qemu-system-common command -v qemu-storage-daemon
need libnbd-bin command -v nbdinfo
need libnbd-bin command -v nbdcopy
need python3-libnbd "$py" -c 'import nbd'
need nbdkit command -v nbdkit
need fio command -v fio
need openssl command -v openssl
if [ ${#missing[@]} -gt 0 ]; then
	mapfile -t unique < <(printf '%s\n' "${missing[@]}" | sort -u)
	echo "installing Debian packages: ${unique[*]}"
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${unique[@]}"
fi
