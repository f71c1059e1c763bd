"""qemu.qmp's asyncio QMPClient drives both daemons; events arrive in QEMU's order.

The same fleecing life cycle (start, export, unexport, cancel; and a full backup) runs
against qemu-storage-daemon and pyfleece, and the event sequences must match. qsd also
reports a paused/running pair around its internal drains; those pairs say nothing about the
job and are dropped before comparing.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from qemu.qmp import QMPClient

from tests.conftest import require_tool
from tests.support import PYFLEECE, run, running

SIZE = 16 << 20


def summary(event: dict[str, Any]) -> str:
    data = event.get("data", {})
    if event["event"] == "JOB_STATUS_CHANGE":
        return f"JOB_STATUS_CHANGE {data['id']} {data['status']}"
    if event["event"].startswith("BLOCK_JOB_"):
        return f"{event['event']} {data['device']} {data['type']} len={data['len']}"
    return f"{event['event']} {data.get('id', '')}".strip()


def without_drain_pairs(events: list[str]) -> list[str]:
    out: list[str] = []
    for name in events:
        if out and name.endswith(" running") and out[-1].endswith(" paused"):
            out.pop()
            continue
        out.append(name)
    return out


async def scenario(qmp_sock: Path, work: Path) -> list[str]:
    qmp = QMPClient("test")
    await qmp.connect(str(qmp_sock))
    events: list[str] = []

    async def collect() -> None:
        async for event in qmp.events:
            events.append(summary(dict(event)))

    task = asyncio.create_task(collect())
    try:
        fleece = {"driver": "qcow2", "node-name": "fleece", "backing": "disk",
                  "file": {"driver": "file", "filename": str(work / "fleece.qcow2")}}  # fmt: skip
        await qmp.execute("blockdev-add", fleece)
        await qmp.execute("blockdev-backup", {"job-id": "j0", "device": "disk",
                                              "target": "fleece", "sync": "none"})  # fmt: skip
        await qmp.execute("block-export-add", {"type": "nbd", "id": "e0",
                                               "node-name": "fleece"})  # fmt: skip
        await qmp.execute("block-export-del", {"id": "e0"})
        await _until(events, "BLOCK_EXPORT_DELETED e0")
        await qmp.execute("block-job-cancel", {"device": "j0"})
        await _until(events, "JOB_STATUS_CHANGE j0 null")
        await qmp.execute("blockdev-del", {"node-name": "fleece"})
        copy = {"driver": "raw", "node-name": "copy",
                "file": {"driver": "file", "filename": str(work / "copy.raw")}}  # fmt: skip
        await qmp.execute("blockdev-add", copy)
        await qmp.execute("blockdev-backup", {"job-id": "j1", "device": "disk",
                                              "target": "copy", "sync": "full"})  # fmt: skip
        await _until(events, "JOB_STATUS_CHANGE j1 null")
    finally:
        task.cancel()
        await qmp.disconnect()
    return without_drain_pairs(events)


async def _until(events: list[str], name: str) -> None:
    async with asyncio.timeout(20):
        while name not in events:
            await asyncio.sleep(0.005)  # polling the collected list, with a deadline


def run_daemon(argv0: list[str], tmp: Path) -> list[str]:
    run(["qemu-img", "create", "-q", "-f", "raw", str(tmp / "disk.raw"), str(SIZE)])
    run(["qemu-img", "create", "-q", "-f", "raw", str(tmp / "copy.raw"), str(SIZE)])
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(tmp / "fleece.qcow2"), str(SIZE)])
    qmp_sock, nbd_sock, pidfile = tmp / "qmp.sock", tmp / "nbd.sock", tmp / "pid"
    argv = [*argv0,
            "--chardev", f"socket,path={qmp_sock},server=on,wait=off,id=m",
            "--monitor", "chardev=m",
            "--blockdev", json.dumps({"driver": "raw", "node-name": "disk", "file": {
                "driver": "file", "filename": str(tmp / "disk.raw")}}),
            "--nbd-server", f"addr.type=unix,addr.path={nbd_sock}",
            "--pidfile", str(pidfile)]  # fmt: skip
    with running(argv, pidfile):
        return asyncio.run(scenario(qmp_sock, tmp))


def test_event_order_matches_qemu(tmp_path: Path) -> None:
    (tmp_path / "qsd").mkdir()
    (tmp_path / "ours").mkdir()
    theirs = run_daemon([require_tool("qemu-storage-daemon")], tmp_path / "qsd")
    ours = run_daemon([*PYFLEECE, "daemon"], tmp_path / "ours")
    assert ours == theirs
    assert "BLOCK_JOB_CANCELLED j0 backup len=16777216" in ours
    assert "BLOCK_JOB_COMPLETED j1 backup len=16777216" in ours
