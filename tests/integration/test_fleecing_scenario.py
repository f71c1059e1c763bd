"""QEMU's image-fleecing scenario, run against qemu-storage-daemon and against pyfleece.

A 64 MiB qcow2 disk carries four patterns; a fleecing job (blockdev-backup sync=none into a
temporary qcow2 whose backing is the disk) freezes a point-in-time view exported over NBD.
The guest then overwrites ranges through a writable export of the disk. The snapshot must
still show the original patterns, zeros and remainders; cancelling the job reports the six
64 KiB clusters copied (393216 bytes), and the temporary image holds exactly those clusters.
Running the same scenario against QEMU's own daemon proves the test itself.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp.legacy import QEMUMonitorProtocol

from tests.conftest import require_tool
from tests.support import PYFLEECE, qemu_io, run, running

MiB = 1 << 20
SIZE = 64 * MiB

# (pattern, offset, length): the disk before the snapshot.
PATTERNS = [("0x5d", "0", "64k"), ("0xd5", "1M", "64k"), ("0xdc", "32M", "64k"),
            ("0xcd", "0x3ff0000", "64k")]  # fmt: skip
# What the guest writes after the snapshot: full, partial-left, partial-right, adjacent.
OVERWRITES = [("0xab", "0", "64k"), ("0xad", "0x00f8000", "64k"),
              ("0x1d", "0x2008000", "64k"), ("0xea", "0x3fe0000", "64k")]  # fmt: skip
# Ranges the snapshot must still read as zeros (they were zero at snapshot time).
ZEROES = [("0", "0x00f8000", "32k"), ("0", "0x2010000", "32k"), ("0", "0x3fe0000", "64k")]
# Untouched remainders of the original patterns next to the overwrites.
REMAINDER = [("0xd5", "0x108000", "32k"), ("0xdc", "0x2000000", "32k"),
             ("0xcd", "0x3ff0000", "64k")]  # fmt: skip
COPIED_CLUSTERS = 6

IMPLEMENTATIONS = ["qemu-storage-daemon", "pyfleece"]


class Daemon:
    """A running storage daemon (QEMU's or ours) with a QMP monitor and an NBD socket."""

    def __init__(self, qmp: QEMUMonitorProtocol, nbd_socket: Path) -> None:
        self.qmp = qmp
        self.nbd_socket = nbd_socket

    def cmd(self, command: str, **args: Any) -> Any:
        reply = self.qmp.cmd_obj({"execute": command, "arguments": args})
        if "error" in reply:
            raise AssertionError(f"{command} failed: {reply['error']}")
        return reply["return"]

    def uri(self, export: str) -> str:
        return f"nbd+unix:///{export}?socket={self.nbd_socket}"

    def wait_event(self, name: str, timeout: float = 20.0) -> dict[str, Any]:
        while True:
            event = self.qmp.pull_event(wait=timeout)
            if event is None:
                raise AssertionError(f"no {name} event")
            if event["event"] == name:
                return event


@pytest.fixture(params=IMPLEMENTATIONS)
def daemon(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Daemon]:
    disk = tmp_path / "disk.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), str(SIZE)])
    qemu_io(str(disk), *(f"write -P {p} {o} {n}" for p, o, n in PATTERNS), fmt="qcow2")
    qmp_sock, nbd_sock, pidfile = tmp_path / "qmp.sock", tmp_path / "nbd.sock", tmp_path / "pid"
    args = [
        "--chardev", f"socket,path={qmp_sock},server=on,wait=off,id=qmp0",
        "--monitor", "chardev=qmp0",
        "--blockdev", json.dumps({"driver": "qcow2", "node-name": "drive0",
                                  "file": {"driver": "file", "filename": str(disk)}}),
        "--nbd-server", f"addr.type=unix,addr.path={nbd_sock}",
        "--export", "type=nbd,id=exp0,node-name=drive0,name=drive0,writable=on",
        "--pidfile", str(pidfile),
    ]  # fmt: skip
    if request.param == "qemu-storage-daemon":
        argv = [require_tool("qemu-storage-daemon"), *args]
    else:
        argv = [*PYFLEECE, "daemon", *args]
    with running(argv, pidfile):
        qmp = QEMUMonitorProtocol(str(qmp_sock))
        qmp.connect(negotiate=True)
        try:
            yield Daemon(qmp, nbd_sock)
        finally:
            qmp.close()


def read_checks(uri: str, table: list[tuple[str, str, str]]) -> None:
    qemu_io(uri, *(f"read -P {p} {o} {n}" for p, o, n in table), read_only=True)


def test_image_fleecing(daemon: Daemon, tmp_path: Path) -> None:
    require_tool("qemu-io")
    fleece = tmp_path / "fleece.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(fleece), str(SIZE)])
    daemon.cmd("blockdev-add", **{"driver": "qcow2", "node-name": "fleece", "backing": "drive0",
                                  "file": {"driver": "file", "filename": str(fleece)}})  # fmt: skip
    daemon.cmd("blockdev-backup", **{"job-id": "fleecing", "device": "drive0",
                                     "target": "fleece", "sync": "none"})  # fmt: skip
    daemon.cmd("block-export-add", type="nbd", id="snap", **{"node-name": "fleece"},
               name="fleece")  # fmt: skip
    snapshot = daemon.uri("fleece")

    read_checks(snapshot, PATTERNS + ZEROES)
    qemu_io(daemon.uri("drive0"), *(f"write -P {p} {o} {n}" for p, o, n in OVERWRITES))
    read_checks(snapshot, PATTERNS + ZEROES + REMAINDER)
    read_checks(daemon.uri("drive0"), OVERWRITES)

    daemon.cmd("block-job-cancel", device="fleecing")
    cancelled = daemon.wait_event("BLOCK_JOB_CANCELLED")
    assert cancelled["data"]["offset"] == COPIED_CLUSTERS * 65536
    assert cancelled["data"]["len"] == SIZE
    daemon.cmd("block-export-del", id="snap")
    daemon.wait_event("BLOCK_EXPORT_DELETED")
    daemon.cmd("blockdev-del", **{"node-name": "fleece"})

    mapping = json.loads(
        run(["qemu-img", "map", "--output=json", "-f", "qcow2", str(fleece)]).stdout
    )
    allocated = sum(e["length"] for e in mapping if e["depth"] == 0 and e["present"])
    assert allocated == COPIED_CLUSTERS * 65536
    run(["qemu-img", "check", "-q", str(fleece)])
