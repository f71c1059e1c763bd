"""kill -9 during fleecing: the images stay consistent and flushed guest data survives.

A guest writes distinct patterns through the live export, flushing every few writes, while a
fleecing job copies old clusters into the temporary qcow2. The daemon is killed with SIGKILL
at a random instant. ``qemu-img check`` must find no corruption in either image (leaks are
allowed), every write acknowledged before an acknowledged flush must read back, and the
daemon must start again on the same images.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import threading
from pathlib import Path

import pytest
from qemu.qmp.legacy import QEMUMonitorProtocol

from pyfleece.nbd.client import NbdClient
from tests.support import PYFLEECE, qemu_io, run, running, wait_until

SIZE = 64 << 20
CHUNK = 65536
ROUNDS = 4


def pattern(index: int) -> int:
    return index % 250 + 1


def daemon_argv(tmp: Path, *, fleece: bool) -> list[str]:
    argv = [*PYFLEECE, "daemon",
            "--drive", f"file={tmp / 'disk.qcow2'},format=qcow2,id=disk0,if=none",
            "--chardev", f"socket,path={tmp / 'qmp.sock'},server=on,wait=off,id=m",
            "--monitor", "chardev=m",
            "--nbd-server", f"addr.type=unix,addr.path={tmp / 'nbd.sock'}",
            "--export", "type=nbd,id=live,node-name=disk0,name=live,writable=on",
            "--pidfile", str(tmp / "pid")]  # fmt: skip
    if fleece:
        argv[6:6] = ["--drive", f"file={tmp / 'fleece.qcow2'},format=qcow2,id=fleece0,"
                     "if=none,backing=disk0"]  # fmt: skip
    return argv


def guest(uri: str, durable: list[int], stop: threading.Event) -> None:
    """Writes chunk i with pattern(i); after each acknowledged flush, records how many
    writes are durable."""
    try:
        with NbdClient.connect(uri) as disk:
            index = 0
            while not stop.is_set() and index < SIZE // CHUNK:
                disk.write(index * CHUNK, bytes([pattern(index)]) * CHUNK)
                index += 1
                if index % 4 == 0:
                    disk.flush()
                    durable.append(index)
    except Exception:  # the daemon was killed under us: expected
        return


@pytest.mark.parametrize("round_", range(ROUNDS))
def test_kill_9_during_fleecing(tmp_path: Path, round_: int) -> None:
    disk, fleece = tmp_path / "disk.qcow2", tmp_path / "fleece.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), str(SIZE)])
    qemu_io(str(disk), "write -P 0x77 0 64M", fmt="qcow2")
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(fleece), str(SIZE)])
    pidfile = tmp_path / "pid"
    proc = subprocess.Popen(daemon_argv(tmp_path, fleece=True), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        wait_until(lambda: pidfile.exists() or proc.poll() is not None, 20, "the daemon")
        assert proc.poll() is None, "the daemon did not start"
        qmp = QEMUMonitorProtocol(str(tmp_path / "qmp.sock"))
        qmp.connect(negotiate=True)
        reply = qmp.cmd_obj({"execute": "blockdev-backup", "arguments": {
            "device": "disk0", "target": "fleece0", "sync": "none"}})  # fmt: skip
        assert "return" in reply, reply
        durable: list[int] = []
        stop = threading.Event()
        writer = threading.Thread(target=guest, args=(
            f"nbd+unix:///live?socket={tmp_path / 'nbd.sock'}", durable, stop))  # fmt: skip
        writer.start()
        wait_until(lambda: len(durable) >= 2, 20, "the guest's first flushes")
        stop.wait(random.Random(round_).uniform(0.05, 0.8))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        stop.set()
        writer.join(30)
        qmp.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)

    for image in (disk, fleece):
        check = run(["qemu-img", "check", "--output=json", str(image)], check=False)
        assert check.returncode in (0, 3), f"{image.name}: {check.stdout}{check.stderr}"
        assert json.loads(check.stdout).get("corruptions", 0) == 0
    flushed = durable[-1]
    qemu_io(str(disk), *(f"read -P {pattern(i):#x} {i * CHUNK} {CHUNK}" for i in range(flushed)),
            fmt="qcow2", read_only=True)  # fmt: skip
    # The snapshot's copies are whole old clusters: every data cluster holds 0x77.
    mapping = json.loads(run(["qemu-img", "map", "--output=json", str(fleece)]).stdout)
    copies = [f"read -P 0x77 {e['start']} {e['length']}" for e in mapping if e["data"]]
    if copies:
        qemu_io(str(fleece), *copies, fmt="qcow2", read_only=True)

    # The daemon starts again on the same images and serves the flushed data.
    (tmp_path / "nbd.sock").unlink(missing_ok=True)
    pidfile.unlink(missing_ok=True)
    with running(daemon_argv(tmp_path, fleece=False), pidfile):
        uri = f"nbd+unix:///live?socket={tmp_path / 'nbd.sock'}"
        qemu_io(uri, f"read -P {pattern(0):#x} 0 {CHUNK}", read_only=True)
