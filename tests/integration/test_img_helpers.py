"""Helpers for the ``pyfleece img`` tests (no tests here): run qemu-img and ``pyfleece img``
side by side, and build small images with known content through QEMU's own tools.

``both(args)`` runs the same command line through both programs in the same directory and
returns what each printed and exited with, with our program name replaced by qemu-img's,
so that a test can demand identical results.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pyfleece
from tests.conftest import require_tool

OUR_PROG = "pyfleece img"


class Outcome(NamedTuple):
    rc: int
    out: str
    err: str


def our_env() -> dict[str, str]:
    """The environment for running ``python -m pyfleece``: the same package as this test
    process imports (a relative PYTHONPATH would not survive a change of directory)."""
    env = dict(os.environ)
    root = str(Path(pyfleece.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return env


def ours(*args: str, cwd: Path) -> Outcome:
    """Runs ``pyfleece img`` (as the console script's module) in ``cwd``."""
    proc = subprocess.run(
        [sys.executable, "-m", "pyfleece", "img", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        env=our_env(),
    )
    return Outcome(proc.returncode, proc.stdout, proc.stderr.replace(OUR_PROG, "qemu-img"))


def qemu(tool: str, *args: str, cwd: Path) -> Outcome:
    proc = subprocess.run(
        [require_tool(tool), *args], cwd=cwd, capture_output=True, text=True, timeout=60
    )
    return Outcome(proc.returncode, proc.stdout, proc.stderr)


def both(*args: str, cwd: Path) -> tuple[Outcome, Outcome]:
    """(qemu-img's outcome, ours) for the same command line."""
    return qemu("qemu-img", *args, cwd=cwd), ours(*args, cwd=cwd)


def qemu_ok(tool: str, *args: str, cwd: Path) -> str:
    outcome = qemu(tool, *args, cwd=cwd)
    if outcome.rc != 0:
        raise AssertionError(f"{tool} {' '.join(args)} failed: {outcome.err}")
    return outcome.out


def sample_images(d: Path) -> None:
    """Images with every kind of cluster, made by QEMU's tools.

    - ``raw.img``: 4 MiB raw, data at 1 MiB and at byte 1000, the rest a hole;
    - ``base.qcow2``: 4 MiB qcow2 with data, a zero cluster, a partial cluster, a
      compressed cluster, explicit zeros written as data, and a discarded cluster;
    - ``top.qcow2``: an overlay of ``base.qcow2`` with its own data and zeros;
    - ``over_raw.qcow2``: an 8 MiB overlay of ``raw.img`` (longer than its backing).
    """
    qemu_ok("qemu-img", "create", "-q", "-f", "raw", "raw.img", "4M", cwd=d)
    qemu_ok("qemu-io", "-f", "raw", "-c", "write -P 7 1M 64k", "-c", "write -P 1 1000 1",
            "raw.img", cwd=d)  # fmt: skip
    qemu_ok("qemu-img", "create", "-q", "-f", "qcow2", "base.qcow2", "4M", cwd=d)
    commands = [
        "write -P 1 0 128k",
        "write -z 256k 64k",
        "write -P 2 512k 4k",
        "write -c -P 3 1M 64k",
        "write -P 0 2M 64k",
        "write -P 5 3M 64k",
        "discard 3M 64k",
    ]
    qemu_ok("qemu-io", *[a for c in commands for a in ("-c", c)], "base.qcow2", cwd=d)
    qemu_ok("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
            "top.qcow2", cwd=d)  # fmt: skip
    qemu_ok("qemu-io", "-c", "write -P 7 64k 64k", "-c", "write -z 1M 32k", "top.qcow2", cwd=d)
    qemu_ok("qemu-img", "create", "-q", "-f", "qcow2", "-b", "raw.img", "-F", "raw",
            "over_raw.qcow2", "8M", cwd=d)  # fmt: skip
    qemu_ok("qemu-io", "-c", "write -P 9 6M 64k", "over_raw.qcow2", cwd=d)
