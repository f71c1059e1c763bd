"""The 2013 seed's recipe, verbatim, against pyfleece daemon, while a guest keeps writing.

    qemu-img create -f qcow2 BACKUP.qcow2 <size>                       (shell)
    drive_add backing=ide0-hd0,file=BACKUP.qcow2,id=target0,if=none    (HMP)
    blockdev-backup device=ide0-hd0 sync=none target=target0           (QMP)
    nbd-server-add device=target0                                      (QMP)
       ... a backup tool reads the point-in-time snapshot over NBD ...
    block-job-complete device=ide0-hd0                                 (QMP)
    drive_del target0                                                  (HMP)
    rm BACKUP.qcow2

HMP runs once over a readline socket and once through QMP's ``human-monitor-command``; the
guest writes through a writable NBD export and through HMP ``qemu-io``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp.legacy import QEMUMonitorProtocol

from pyfleece.monitor.client import HmpConnection
from tests.conftest import require_tool
from tests.support import PYFLEECE, qemu_io, run, running

SIZE = 64 << 20
#: (pattern, offset, length) on the disk before the snapshot
BEFORE = [("0x11", "0", "1M"), ("0x22", "8M", "256k"), ("0x33", "63M", "1M")]
#: what the guest writes afterwards, through NBD ...
GUEST_NBD = [("0xa1", "0", "64k"), ("0xa2", "8M", "1M"), ("0xa3", "40M", "4k")]
#: ... and through HMP qemu-io
GUEST_HMP = [("0xb1", "512k", "64k"), ("0xb2", "63M", "128k")]
#: what the snapshot must still show (the disk as it was, zeros included)
SNAPSHOT = [*BEFORE, ("0", "40M", "4k"), ("0", "9M", "1M")]


class Recipe:
    def __init__(self, qmp: QEMUMonitorProtocol, hmp: Callable[[str], str], nbd: Path) -> None:
        self.qmp = qmp
        self.hmp = hmp
        self.nbd = nbd

    def qmp_cmd(self, command: str, **args: Any) -> Any:
        reply = self.qmp.cmd_obj({"execute": command, "arguments": args})
        if "error" in reply:
            raise AssertionError(f"{command} failed: {reply['error']}")
        return reply["return"]

    def uri(self, export: str) -> str:
        return f"nbd+unix:///{export}?socket={self.nbd}"

    def event(self, name: str) -> dict[str, Any]:
        while True:
            event = self.qmp.pull_event(wait=20.0)
            assert event is not None, f"no {name} event"
            if event["event"] == name:
                return event


@pytest.fixture(params=["hmp-socket", "human-monitor-command"])
def recipe(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Recipe]:
    require_tool("qemu-io")
    disk = tmp_path / "disk.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), str(SIZE)])
    qemu_io(str(disk), *(f"write -P {p} {o} {n}" for p, o, n in BEFORE), fmt="qcow2")
    qmp_sock, hmp_sock, nbd = tmp_path / "qmp.sock", tmp_path / "hmp.sock", tmp_path / "nbd.sock"
    pidfile = tmp_path / "pid"
    argv = [*PYFLEECE, "daemon",
            "--drive", f"file={disk},format=qcow2,id=ide0-hd0,if=none",
            "--chardev", f"socket,path={qmp_sock},server=on,wait=off,id=qmp0",
            "--monitor", "chardev=qmp0",
            "--chardev", f"socket,path={hmp_sock},server=on,wait=off,id=hmp0",
            "--monitor", "chardev=hmp0,mode=readline",
            "--nbd-server", f"addr.type=unix,addr.path={nbd}",
            "--export", "type=nbd,id=live,node-name=ide0-hd0,name=ide0-hd0,writable=on",
            "--pidfile", str(pidfile)]  # fmt: skip
    with running(argv, pidfile, cwd=tmp_path):
        qmp = QEMUMonitorProtocol(str(qmp_sock))
        qmp.connect(negotiate=True)
        try:
            if request.param == "hmp-socket":
                with HmpConnection(str(hmp_sock)) as conn:
                    yield Recipe(qmp, conn.command, nbd)
            else:

                def via_qmp(line: str) -> str:
                    reply = qmp.cmd_obj({"execute": "human-monitor-command",
                                         "arguments": {"command-line": line}})  # fmt: skip
                    assert "return" in reply, reply
                    return str(reply["return"]).replace("\r\n", "\n")

                yield Recipe(qmp, via_qmp, nbd)
        finally:
            qmp.close()
    # The daemon has shut down: the live disk holds every guest write.
    qemu_io(str(disk), *(f"read -P {p} {o} {n}" for p, o, n in GUEST_NBD + GUEST_HMP),
            fmt="qcow2", read_only=True)  # fmt: skip
    run(["qemu-img", "check", "-q", str(disk)])


def test_seed_recipe(recipe: Recipe, tmp_path: Path) -> None:
    backup = tmp_path / "BACKUP.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(backup), str(SIZE)])
    out = recipe.hmp("drive_add backing=ide0-hd0,file=BACKUP.qcow2,id=target0,if=none")
    assert out.strip() == "OK", out
    recipe.qmp_cmd("blockdev-backup", device="ide0-hd0", sync="none", target="target0")
    recipe.qmp_cmd("nbd-server-add", device="target0")
    snapshot = recipe.uri("target0")

    qemu_io(recipe.uri("ide0-hd0"), *(f"write -P {p} {o} {n}" for p, o, n in GUEST_NBD))
    for p, o, n in GUEST_HMP:
        out = recipe.hmp(f'qemu-io ide0-hd0 "write -P {p} {o} {n}"')
        assert out.startswith("wrote "), out
    qemu_io(snapshot, *(f"read -P {p} {o} {n}" for p, o, n in SNAPSHOT), read_only=True)

    refused = recipe.hmp("drive_del target0")
    assert "busy" in refused or "in use" in refused, refused
    qemu_io(snapshot, *(f"read -P {p} {o} {n}" for p, o, n in SNAPSHOT[:1]), read_only=True)

    recipe.qmp_cmd("block-job-complete", device="ide0-hd0")
    completed = recipe.event("BLOCK_JOB_COMPLETED")
    assert completed["data"]["device"] == "ide0-hd0" and "error" not in completed["data"]
    assert recipe.hmp("drive_del target0") == ""
    assert recipe.event("BLOCK_EXPORT_DELETED")["data"]["id"] == "target0"
    assert recipe.qmp_cmd("query-block-jobs") == []
    assert recipe.qmp_cmd("query-block-exports") == [
        {"type": "nbd", "id": "live", "node-name": "ide0-hd0", "shutting-down": False}
    ]
    assert "target0" not in recipe.hmp("info block")
    check = run(["qemu-img", "check", "--output=json", str(backup)])
    assert json.loads(check.stdout)["check-errors"] == 0
    backup.unlink()
