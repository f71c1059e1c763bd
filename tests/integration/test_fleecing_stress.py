"""Stress: concurrent guest writers over NBD while snapshot readers check every byte.

Invariant under test, in one line: every byte read from the snapshot equals the disk at
snapshot time, whatever the guest does. Four writers (libnbd, many requests in flight each)
mix sub-cluster and cross-cluster writes, write-zeroes and trims at unaligned offsets for a
bounded time; two readers compare random snapshot ranges with the disk's snapshot-time copy
meanwhile; then a full ``nbdcopy`` pull of the snapshot must equal it. The same test runs
against qemu-storage-daemon, which proves the test.
"""

from __future__ import annotations

import json
import random
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp.legacy import QEMUMonitorProtocol

from tests.conftest import require_module, require_tool
from tests.support import PYFLEECE, run, running

nbd: Any = require_module("nbd")

SIZE = 64 << 20
SECONDS = 5.0
WRITERS = 4
READERS = 2
IN_FLIGHT = 16
HOT = 4 << 20


def pick_offset(rng: random.Random, length: int) -> int:
    """Half the requests land in a 4 MiB window that moves to fresh ground every 0.25 s,
    so that writers and readers meet on units not copied yet (where races live)."""
    if rng.random() < 0.5:
        base = (int(time.monotonic() * 4) * 7 * HOT) % (SIZE - HOT)
        return base + rng.randrange(0, max(1, HOT - length))
    return rng.randrange(0, SIZE - length)


def make_disk(path: Path) -> None:
    rng = random.Random(7)
    with open(path, "wb") as f:
        for block in range(SIZE // 65536):
            # data, zeros and holes, so every kind of copy happens
            kind = block % 5
            f.write(bytes(65536) if kind == 0 else rng.randbytes(65536))
    with open(path, "r+b") as f:  # punch a few real holes
        f.truncate(SIZE - (1 << 20))
        f.truncate(SIZE)


def writer(uri: str, seed: int, stop: threading.Event, errors: list[str]) -> None:
    rng = random.Random(seed)
    h = nbd.NBD()
    try:
        h.connect_uri(uri)
        while not stop.is_set():
            while h.aio_in_flight() >= IN_FLIGHT:
                h.poll(-1)
            kind = rng.random()
            length = rng.choice((1, 511, 4096, 65535, 65536, 200_000, 1 << 20))
            offset = pick_offset(rng, length)
            if kind < 0.7:
                buf = nbd.Buffer.from_bytearray(bytearray(rng.randbytes(length)))
                h.aio_pwrite(buf, offset)
            elif kind < 0.85:
                h.aio_zero(length, offset)
            else:
                h.aio_trim(length, offset)
        while h.aio_in_flight():
            h.poll(-1)
        h.flush()
        h.shutdown()
    except nbd.Error as err:
        errors.append(f"writer {seed}: {err}")


def reader(uri: str, expected: bytes, seed: int, stop: threading.Event,
           wrong: list[str]) -> None:  # fmt: skip
    rng = random.Random(seed)
    h = nbd.NBD()
    h.connect_uri(uri)
    try:
        while not stop.is_set():
            length = rng.choice((512, 4096, 65536, 300_000))
            offset = pick_offset(rng, length)
            got = h.pread(length, offset)
            if got != expected[offset : offset + length]:
                bad = next(i for i in range(length) if got[i] != expected[offset + i])
                wrong.append(f"snapshot byte {offset + bad:#x} differs")
                return
    finally:
        h.shutdown()


@pytest.fixture(params=["pyfleece", "qemu-storage-daemon"])
def fleecing(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, str, Path]]:
    disk, fleece = tmp_path / "disk.raw", tmp_path / "fleece.qcow2"
    make_disk(disk)
    shutil.copyfile(disk, tmp_path / "expected.raw")
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(fleece), str(SIZE)])
    qmp_sock, nbd_sock, pidfile = tmp_path / "qmp.sock", tmp_path / "nbd.sock", tmp_path / "pid"
    args = ["--chardev", f"socket,path={qmp_sock},server=on,wait=off,id=m",
            "--monitor", "chardev=m",
            "--blockdev", json.dumps({"driver": "raw", "node-name": "disk",
                                      "file": {"driver": "file", "filename": str(disk)}}),
            "--nbd-server", f"addr.type=unix,addr.path={nbd_sock}",
            "--export", "type=nbd,id=live,node-name=disk,name=live,writable=on",
            "--pidfile", str(pidfile)]  # fmt: skip
    if request.param == "qemu-storage-daemon":
        argv = [require_tool("qemu-storage-daemon"), *args]
    else:
        argv = [*PYFLEECE, "daemon", *args]
    with running(argv, pidfile):
        qmp = QEMUMonitorProtocol(str(qmp_sock))
        qmp.connect(negotiate=True)
        for command, arguments in [
            ("blockdev-add", {"driver": "qcow2", "node-name": "fleece", "backing": "disk",
                              "file": {"driver": "file", "filename": str(fleece)}}),
            ("blockdev-backup", {"device": "disk", "target": "fleece", "sync": "none",
                                 "job-id": "fleecing"}),
            ("block-export-add", {"type": "nbd", "id": "snap", "node-name": "fleece",
                                  "name": "snap"}),
        ]:  # fmt: skip
            reply = qmp.cmd_obj({"execute": command, "arguments": arguments})
            assert "return" in reply, reply
        try:
            yield (f"nbd+unix:///live?socket={nbd_sock}",
                   f"nbd+unix:///snap?socket={nbd_sock}", tmp_path)  # fmt: skip
        finally:
            qmp.close()


def test_snapshot_survives_concurrent_guests(fleecing: tuple[str, str, Path]) -> None:
    require_tool("nbdcopy")
    live, snap, work = fleecing
    expected = (work / "expected.raw").read_bytes()
    stop = threading.Event()
    errors: list[str] = []
    wrong: list[str] = []
    threads = [threading.Thread(target=writer, args=(live, i, stop, errors))
               for i in range(WRITERS)]  # fmt: skip
    threads += [threading.Thread(target=reader, args=(snap, expected, 100 + i, stop, wrong))
                for i in range(READERS)]  # fmt: skip
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + SECONDS
    while time.monotonic() < deadline and not wrong and not stop.wait(0.1):
        pass
    stop.set()
    for thread in threads:
        thread.join(60)
        assert not thread.is_alive(), "a stress thread hung"
    assert not errors, errors
    assert not wrong, wrong
    run(["nbdcopy", snap, str(work / "pulled.raw")], timeout=120)
    pulled = (work / "pulled.raw").read_bytes()
    assert len(pulled) == SIZE
    assert pulled == expected, "the full pull differs from the disk at snapshot time"
    assert (work / "disk.raw").read_bytes() != expected, "the guests wrote nothing"
