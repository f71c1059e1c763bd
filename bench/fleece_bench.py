"""Fleecing, side by side: pyfleece daemon against qemu-storage-daemon in the same run.

1. Guest writes under copy-before-write: fio, 1 MiB sequential writes at QD8 through the
   live disk's NBD export while a fleecing job (blockdev-backup sync=none into a qcow2 whose
   backing is the disk) copies every old cluster first.
2. Pull of the snapshot: nbdcopy of the whole snapshot export to null:.

The live disk is a 512 MiB raw file in the page cache. Each measurement uses a fresh daemon
and a fresh temporary image; the median and the best of REPEAT runs are printed, in MiB/s,
with ratios (pyfleece / qsd; above 1.0 means pyfleece is faster). Not a test: the machine
is shared.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

MiB = 1 << 20
SIZE = 512 * MiB
REPEAT = 5
DAEMONS = {
    "pyfleece": [sys.executable, "-m", "pyfleece", "daemon"],
    "qsd": ["qemu-storage-daemon"],
}


def qmp(sock: Path, commands: list[tuple[str, dict[str, Any]]]) -> None:
    from qemu.qmp.legacy import QEMUMonitorProtocol

    conn = QEMUMonitorProtocol(str(sock))
    conn.connect(negotiate=True)
    try:
        for name, args in commands:
            reply = conn.cmd_obj({"execute": name, "arguments": args})
            if "error" in reply:
                raise RuntimeError(f"{name}: {reply['error']}")
    finally:
        conn.close()


def with_fleecing(argv0: list[str], work: Path, measure: Callable[[Path], float]) -> float:
    """Starts a daemon with the disk exported and a fleecing job running; measures."""
    for name in ("qmp.sock", "nbd.sock", "pid", "fleece.qcow2"):
        (work / name).unlink(missing_ok=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(work / "fleece.qcow2"),
                    str(SIZE)], check=True)  # fmt: skip
    argv = [*argv0,
            "--chardev", f"socket,path={work / 'qmp.sock'},server=on,wait=off,id=m",
            "--monitor", "chardev=m",
            "--blockdev", json.dumps({"driver": "raw", "node-name": "disk", "file": {
                "driver": "file", "filename": str(work / "disk.raw")}}),
            "--nbd-server", f"addr.type=unix,addr.path={work / 'nbd.sock'}",
            "--export", "type=nbd,id=live,node-name=disk,name=live,writable=on",
            "--pidfile", str(work / "pid")]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not (work / "pid").exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{argv0[0]} did not start")
            time.sleep(0.01)  # waiting for the pidfile, with a deadline
        fleece = {"driver": "qcow2", "node-name": "fleece", "backing": "disk",
                  "file": {"driver": "file", "filename": str(work / "fleece.qcow2")}}  # fmt: skip
        qmp(work / "qmp.sock", [
            ("blockdev-add", fleece),
            ("blockdev-backup", {"device": "disk", "target": "fleece", "sync": "none",
                                 "job-id": "fleecing"}),
            ("block-export-add", {"type": "nbd", "id": "snap", "node-name": "fleece",
                                  "name": "snap"}),
        ])  # fmt: skip
        return measure(work)
    finally:
        proc.terminate()
        proc.wait(60)


def guest_writes(work: Path) -> float:
    """fio 1 MiB sequential writes, QD8, over the whole disk: MiB/s."""
    uri = f"nbd+unix:///live?socket={work / 'nbd.sock'}"
    out = subprocess.run(
        ["fio", "--name=guest", "--ioengine=nbd", f"--uri={uri}", "--rw=write", "--bs=1M",
         "--iodepth=8", f"--size={SIZE}", "--output-format=json"],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    job = json.loads(out[out.index("{") :])["jobs"][0]
    return float(job["write"]["bw_bytes"]) / MiB


def snapshot_pull(work: Path) -> float:
    """nbdcopy of the whole snapshot to null:, MiB/s."""
    start = time.perf_counter()
    subprocess.run(["nbdcopy", f"nbd+unix:///snap?socket={work / 'nbd.sock'}", "null:"],
                   check=True)  # fmt: skip
    return SIZE / MiB / (time.perf_counter() - start)


def main() -> int:
    for tool in ("qemu-storage-daemon", "fio", "nbdcopy", "qemu-img"):
        if shutil.which(tool) is None:
            print(f"fleece_bench: {tool} is not installed")
            return 1
    with tempfile.TemporaryDirectory(prefix="pyfleece-bench-") as tmp:
        work = Path(tmp)
        with open(work / "disk.raw", "wb") as f:
            block = os.urandom(MiB)
            for _ in range(SIZE // MiB):
                f.write(block)
        for label, measure in (("guest 1M writes QD8 under fleecing", guest_writes),
                               ("nbdcopy pull of the snapshot", snapshot_pull)):  # fmt: skip
            runs: dict[str, list[float]] = {name: [] for name in DAEMONS}
            for _ in range(REPEAT):
                for name, argv0 in DAEMONS.items():  # interleaved, so noise hits both
                    runs[name].append(with_fleecing(argv0, work, measure))
            for kind, pick in (("median", statistics.median), ("best", max)):
                ours, theirs = pick(runs["pyfleece"]), pick(runs["qsd"])
                print(f"{label:<36} {kind:<6} pyfleece {ours:6.0f} MiB/s  qsd {theirs:6.0f} "
                      f"MiB/s  ratio {ours / theirs:5.2f}", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
