"""``pyfleece nbd``'s command-line errors against qemu-nbd's, on the same command lines.

Each case fails before serving, in both programs: same exit status, same lines on stderr
(program names aside), nothing on stdout.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import require_tool
from tests.nbdtest import SRC, short_tempdir

CASES = {
    "unknown-short": ["-Z", "d.raw"],
    "unknown-long": ["--bogus", "d.raw"],
    "short-missing-argument": ["-x"],
    "long-missing-argument": ["--export-name"],
    "flag-with-argument": ["--read-only=3", "d.raw"],
    "shared-too-large": ["-e", "2147483648", "-f", "raw", "d.raw"],
    "shared-huge": ["-e", "99999999999999999999", "-f", "raw", "d.raw"],
    "pid-file-in-missing-directory": ["--pid-file", "no/such/dir/pid", "-f", "raw", "d.raw"],
    "no-arguments": [],
}


def _run(command: list[str], cwd: Path, executable: str | None = None) -> tuple[int, str, str]:
    env = dict(os.environ, PYTHONPATH=SRC)
    proc = subprocess.run(
        command, cwd=cwd, capture_output=True, text=True, timeout=30, env=env,
        executable=executable,
    )  # fmt: skip
    return proc.returncode, proc.stdout, proc.stderr.replace("pyfleece nbd", "qemu-nbd")


@pytest.mark.parametrize("args", list(CASES.values()), ids=list(CASES))
def test_errors_match_qemu_nbd(args: list[str]) -> None:
    qemu_nbd = require_tool("qemu-nbd")
    with short_tempdir() as tmp:
        (tmp / "d.raw").write_bytes(bytes(1 << 20))
        sock = ["-k", str(tmp / "s")] if args else []  # qemu-nbd wants an absolute path
        theirs = _run(["qemu-nbd", *sock, *args], tmp, qemu_nbd)  # its messages use argv[0]
        mine = _run([sys.executable, "-m", "pyfleece", "nbd", *sock, *args], tmp)
    assert theirs[0] == 1
    assert mine == theirs
