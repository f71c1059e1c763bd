"""``pyfleece daemon``'s command-line errors against qemu-storage-daemon's: the same first
line on stderr (program names aside), exit status 1. pyfleece then adds a line pointing
at --help, as its other tools do."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import require_tool
from tests.nbdtest import SRC

CASES = {
    "unknown-short": ["-Z"],
    "unknown-long": ["--bogus"],
    "operand": ["stray"],
    "missing-argument": ["--blockdev"],
    "pidfile-missing-argument": ["--pidfile"],
}


def _first_line(command: list[str], cwd: Path, executable: str | None = None) -> tuple[int, str]:
    proc = subprocess.run(
        command, cwd=cwd, capture_output=True, text=True, timeout=30, executable=executable,
        env=dict(os.environ, PYTHONPATH=SRC),
    )  # fmt: skip
    first = proc.stderr.splitlines()[0] if proc.stderr else ""
    return proc.returncode, first.replace("pyfleece daemon", "qemu-storage-daemon")


@pytest.mark.parametrize("args", list(CASES.values()), ids=list(CASES))
def test_errors_match_qsd(tmp_path: Path, args: list[str]) -> None:
    qsd = require_tool("qemu-storage-daemon")
    theirs = _first_line(["qemu-storage-daemon", *args], tmp_path, qsd)
    mine = _first_line([sys.executable, "-m", "pyfleece", "daemon", *args], tmp_path)
    assert theirs[0] == 1
    assert mine == theirs
