"""Copy-before-write failures at daemon level: the snapshot is never silently wrong.

The fleecing target is a qcow2 whose file sits on a ``fault`` node that fails every write.
A guest write through NBD must then fail with EIO (its old data could not be saved), a
BLOCK_IO_ERROR event must say so, the live disk must keep its old data, the snapshot must
still show it, and the job must go on whatever its on-target-error (as QEMU 7.2's
copy-before-write does): failing it would drop the guard, and the snapshot would silently
read the live disk.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import nbd
import pytest

from tests.integration.test_daemon_support import make_images, serve
from tests.support import qemu_io, run

ARGS = ["--drive", "file=d.qcow2,format=qcow2,id=hd0,if=none",
        "--nbd-server", "addr.type=unix,addr.path=nbd.sock",
        "--export", "type=nbd,id=live,node-name=hd0,writable=on"]  # fmt: skip


def target(rules: list[dict[str, Any]]) -> dict[str, Any]:
    fault = {"driver": "fault", "image": {"driver": "file", "filename": "fl.qcow2"},
             "rules": rules}  # fmt: skip
    return {"driver": "qcow2", "node-name": "fl", "backing": "hd0", "file": fault}


def images(workdir: Path, room: bool = True) -> None:
    make_images(workdir, ("d.qcow2", "qcow2", "4M"), ("fl.qcow2", "qcow2", "4M"))
    qemu_io(str(workdir / "d.qcow2"), "write -P 0x11 0 1M", fmt="qcow2")
    if room:  # the qcow2 allocates inside the file, so only the rules make writes fail
        run(["truncate", "-s", "16M", str(workdir / "fl.qcow2")])


@pytest.mark.parametrize("policy", ["report", "stop", "ignore"])
def test_failed_copy_fails_the_guest_write(tmp_path: Path, policy: str) -> None:
    images(tmp_path)
    with serve("ours", tmp_path, ARGS) as daemon:
        daemon.ok("blockdev-add", **target([{"op": "write", "once": False}]))
        daemon.ok("blockdev-backup", device="hd0", target="fl", sync="none",
                  **{"job-id": "j0", "on-target-error": policy})  # fmt: skip
        daemon.ok("block-export-add", type="nbd", id="snap", **{"node-name": "fl"})
        guest = nbd.NBD()
        guest.connect_uri(daemon.uri("hd0"))
        with pytest.raises(nbd.Error) as failed:
            guest.pwrite(b"\x22" * 4096, 0)
        assert failed.value.errno == "EIO"
        event = daemon.event("BLOCK_IO_ERROR")["data"]
        assert event == {"device": "hd0", "node-name": "hd0", "operation": "write",
                         "action": "report", "nospace": False,
                         "reason": "Input/output error"}  # fmt: skip
        assert guest.pread(4096, 0) == b"\x11" * 4096  # the write never reached the disk
        jobs = daemon.ok("query-block-jobs")
        assert (jobs[0]["status"], jobs[0]["paused"], jobs[0]["io-status"]) == (
            "running", False, "ok")  # fmt: skip
        snapshot = nbd.NBD()
        snapshot.connect_uri(daemon.uri("fl"))
        assert snapshot.pread(4096, 0) == b"\x11" * 4096
        with pytest.raises(nbd.Error):  # still failing: still refused
            guest.pwrite(b"\x33" * 4096, 0)
        assert snapshot.pread(4096, 0) == b"\x11" * 4096
        snapshot.shutdown()
        assert not [e for e in daemon.drain_events() if e["event"] == "BLOCK_JOB_ERROR"]
        daemon.ok("block-job-cancel", device="j0", force=True)
        daemon.event("BLOCK_JOB_CANCELLED")
        guest.pwrite(b"\x44" * 4096, 0)  # no job, no copy: writes go through again
        guest.shutdown()
    qemu_io(str(tmp_path / "d.qcow2"), "read -P 0x44 0 4k", "read -P 0x11 4k 60k", fmt="qcow2",
            read_only=True)  # fmt: skip


def test_fault_node_grows_like_its_image(tmp_path: Path) -> None:
    images(tmp_path, room=False)
    with serve("ours", tmp_path, ARGS) as daemon:
        daemon.ok("blockdev-add", **target([]))  # no rules: everything passes through
        daemon.ok("blockdev-backup", device="hd0", target="fl", sync="none")
        assert "wrote 4096/4096" in daemon.hmp('qemu-io hd0 "write -P 0x22 0 4k"')
