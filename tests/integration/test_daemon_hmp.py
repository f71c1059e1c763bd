"""HMP on the daemon, over a readline socket and through QMP's human-monitor-command.

Every command a user of QEMU's HMP would try on a storage daemon: drives (add, delete, with
their soft and hard references), ``info`` (block, block-jobs, jobs), ``qemu-io``, the NBD
server commands and the block job commands, with QEMU's output and error texts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import nbd
import pytest

from tests.integration.test_daemon_support import HMP_ARGS, QMP_ARGS, Served, hmp_socket, serve
from tests.support import run


class Hmp:
    """One way to run HMP command lines, and the QMP connection for events."""

    def __init__(self, daemon: Served, command: Callable[[str], str]) -> None:
        self.daemon = daemon
        self.command = command

    def __call__(self, line: str) -> str:
        return self.command(line)


@pytest.fixture(params=["readline", "human-monitor-command"])
def hmp(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Hmp]:
    for name, fmt in (("d.qcow2", "qcow2"), ("e.raw", "raw"), ("t.qcow2", "qcow2")):
        run(["qemu-img", "create", "-q", "-f", fmt, str(tmp_path / name), "4M"])
    args = ["--drive", "file=d.qcow2,id=hd0,if=none"]
    with serve("ours", tmp_path, args, monitors=[*QMP_ARGS, *HMP_ARGS]) as daemon:
        if request.param == "readline":
            with hmp_socket(daemon) as conn:
                assert conn.banner.startswith("QEMU 7.2.0 monitor - type 'help'")
                yield Hmp(daemon, conn.command)
        else:
            yield Hmp(daemon, daemon.hmp)


def test_help_and_info(hmp: Hmp) -> None:
    listing = hmp("help")
    for name in ("drive_add", "drive_del", "qemu-io", "nbd_server_start", "nbd_server_add",
                 "nbd_server_remove", "nbd_server_stop", "block_job_cancel",
                 "block_job_complete", "info", "quit|q"):  # fmt: skip
        assert f"\n{name} " in f"\n{listing}", name
    assert hmp("help drive_del") == "drive_del device -- remove host block device\n"
    assert "info block [-n] [-v] [device]" in hmp("help info")
    assert hmp("info version").startswith("7.2.0 ")
    assert hmp("info nosuch") == "unknown command: 'info nosuch'\n"
    assert hmp("info block-jobs") == "No active jobs\n"
    assert hmp("info jobs") == "No jobs\n"


def test_drives_and_info_block(hmp: Hmp) -> None:
    assert hmp("drive_add file=e.raw,format=raw,id=e0,if=none,readonly=on") == "OK\n"
    assert hmp("drive_add 0 file=t.qcow2,id=t0,if=none,backing=hd0") == "OK\n"
    assert hmp("drive_add file=e.raw,format=raw,id=e0,if=none") == "Duplicate ID 'e0' for drive\n"
    assert hmp("drive_add file=nosuch,id=x,if=none") == (
        "Could not open 'nosuch': No such file or directory\n"
    )
    assert hmp("drive_add file=t.qcow2,id=x,if=none,backing=nosuch") == (
        "Device 'nosuch' not found\n"
    )
    assert (
        hmp("drive_add")
        == 'drive_add: string expected\nTry "help drive_add" for more information\n'
    )
    assert (
        hmp("drive_add -n file=e.raw,format=raw,if=none") == "'node-name' needs to be specified\n"
    )
    assert hmp("drive_add -n file=e.raw,format=raw,if=none,node-name=n0,readonly=on") == ""
    assert hmp("info block") == (
        "hd0 (hd0): d.qcow2 (qcow2)\n    Cache mode:       writeback\n\n"
        "e0 (e0): e.raw (raw, read-only)\n    Cache mode:       writeback\n\n"
        't0 (t0): json:{"backing": {"driver": "qcow2", "file": {"driver": "file", '
        '"filename": "d.qcow2"}}, "driver": "qcow2", "file": {"driver": "file", '
        '"filename": "t.qcow2"}} (qcow2)\n    Cache mode:       writeback\n'
        "    Backing file:     d.qcow2 (chain depth: 1)\n"
    )
    assert (
        hmp("info block e0") == "e0 (e0): e.raw (raw, read-only)\n    Cache mode:       writeback\n"
    )
    assert hmp("info block n0") == "n0: e.raw (raw, read-only)\n    Cache mode:       writeback\n"
    assert "\nn0: e.raw" in "\n" + hmp("info block -n")
    verbose = hmp("info block -v hd0")
    assert "\nImages:\nimage: d.qcow2\nfile format: qcow2\n" in verbose
    assert "virtual size: 4 MiB (4194304 bytes)" in verbose
    # drive_del: a drive, or a node as blockdev-del would delete it.
    assert hmp("drive_del t0") == ""
    assert hmp("drive_del nosuch") == "Device 'nosuch' not found\n"
    assert hmp("drive_del n0") == ""
    assert "n0" not in hmp("info block -n")


def test_qemu_io(hmp: Hmp) -> None:
    assert hmp('qemu-io hd0 "write -P 0x55 0 64k"').startswith(
        "wrote 65536/65536 bytes at offset 0\n"
    )
    assert hmp('qemu-io hd0 "read -P 0x55 0 64k"').startswith(
        "read 65536/65536 bytes at offset 0\n"
    )
    assert hmp('qemu-io hd0 "read -P 0x66 0 512"').startswith(
        "Pattern verification failed at offset 0, 512 bytes\n"
    )
    assert hmp('qemu-io hd0 "write -z 64k 64k"').startswith(
        "wrote 65536/65536 bytes at offset 65536"
    )
    assert hmp('qemu-io hd0 "read -P 0 64k 64k"').startswith("read 65536/65536")
    assert hmp('qemu-io hd0 "discard 0 64k"').startswith("discard 65536/65536 bytes at offset 0")
    assert hmp('qemu-io hd0 "flush"') == ""
    assert hmp('qemu-io hd0 "nosuch"') == 'command "nosuch" not found\n'
    assert hmp('qemu-io hd0 "read 4M 512"') == "read failed: Input/output error\n"
    assert hmp('qemu-io nosuch "read 0 512"') == "Error: Device 'nosuch' not found\n"
    assert hmp("drive_add file=e.raw,format=raw,id=e0,if=none,readonly=on") == "OK\n"
    assert hmp('qemu-io e0 "write 0 512"') == "Block node is read-only\n"


def test_nbd_server_commands(hmp: Hmp, tmp_path: Path) -> None:
    daemon = hmp.daemon
    assert hmp("nbd_server_start -w unix:nbd.sock") == "Error: -w only valid together with -a\n"
    assert hmp("nbd_server_start nosuch") == "Error: error parsing address 'nosuch'\n"
    assert hmp("nbd_server_start [::1") == "Error: error parsing IPv6 address '[::1'\n"
    for address in ("127.0.0.1:0", "[::1]:0", ":0"):
        assert hmp(f"nbd_server_start {address}") == "", address
        assert hmp("nbd_server_stop") == ""
    assert hmp("nbd_server_stop") == "Error: NBD server not running\n"
    # -a -w with a read-only drive fails, and leaves no server running, as QEMU.
    assert hmp("drive_add file=e.raw,format=raw,id=e0,if=none,readonly=on") == "OK\n"
    assert "read-only" in hmp("nbd_server_start -a -w unix:nbd.sock")
    assert daemon.ok("query-block-exports") == []
    deleted = [e["data"] for e in daemon.drain_events() if e["event"] == "BLOCK_EXPORT_DELETED"]
    assert deleted == [{"id": "hd0"}]  # exported before e0 failed, then removed again
    assert hmp("nbd_server_stop") == "Error: NBD server not running\n"
    assert not (tmp_path / "nbd.sock").exists()
    assert hmp("nbd_server_start unix:nbd.sock") == ""
    assert hmp("nbd_server_start unix:nbd2.sock") == "Error: NBD server already running\n"
    assert hmp("nbd_server_add -w hd0 disk") == ""
    assert hmp("nbd_server_add e0") == ""
    assert hmp("nbd_server_add nosuch") == (
        "Error: Cannot find device='nosuch' nor node-name='nosuch'\n"
    )
    exports = sorted((e["id"], e["node-name"]) for e in daemon.ok("query-block-exports"))
    assert exports == [("disk", "hd0"), ("e0", "e0")]
    client = nbd.NBD()
    client.connect_uri(daemon.uri("disk"))
    client.pwrite(b"\x77" * 4096, 0)
    assert hmp("nbd_server_remove disk") == "Error: export 'disk' still in use\n"
    assert hmp("nbd_server_remove -f disk") == ""
    assert daemon.event("BLOCK_EXPORT_DELETED")["data"] == {"id": "disk"}
    with pytest.raises(nbd.Error):
        client.pread(512, 0)
    assert hmp("nbd_server_remove nosuch") == "Error: Export 'nosuch' is not found\n"
    assert hmp("nbd_server_stop") == ""
    assert daemon.event("BLOCK_EXPORT_DELETED")["data"] == {"id": "e0"}
    assert "read 4096/4096" in hmp('qemu-io hd0 "read -P 0x77 0 4k"')


def test_drive_del_releases_exports_and_refuses_hard_references(hmp: Hmp) -> None:
    """The seed's references: drive_del of an exported drive disconnects its clients and
    deletes the export first; a job's target or a backing edge refuses, naming the holder."""
    daemon = hmp.daemon
    assert hmp("drive_add file=t.qcow2,id=t0,if=none,backing=hd0") == "OK\n"
    assert hmp("nbd_server_start unix:nbd.sock") == ""
    daemon.ok("blockdev-backup", device="hd0", target="t0", sync="none")
    assert hmp("nbd_server_add t0") == ""
    snapshot = nbd.NBD()
    snapshot.connect_uri(daemon.uri("t0"))
    assert hmp("drive_del t0") == (
        "Node 't0' is busy: block device is in use by block job: backup\n"
    )
    assert hmp("drive_del hd0") == "Node 'hd0' is busy: node is used as backing hd of 't0'\n"
    assert snapshot.pread(512, 0) == bytes(512)  # refusals disturb nobody
    assert hmp("info block-jobs") == (
        "Type backup, device hd0: Completed 0 of 4194304 bytes, speed limit 0 bytes/s\n"
    )
    assert hmp("info jobs") == "backup job hd0: running, 0 of 4194304 bytes\n"
    assert hmp("block_job_complete hd0") == ""
    daemon.event("BLOCK_JOB_COMPLETED")
    assert hmp("drive_del t0") == ""
    assert daemon.event("BLOCK_EXPORT_DELETED")["data"] == {"id": "t0"}
    with pytest.raises(nbd.Error):
        snapshot.pread(512, 0)
    assert "t0" not in hmp("info block")


def test_block_job_cancel(hmp: Hmp) -> None:
    daemon = hmp.daemon
    assert hmp("drive_add file=t.qcow2,id=t0,if=none,backing=hd0") == "OK\n"
    daemon.ok("blockdev-backup", device="hd0", target="t0", sync="none", **{"job-id": "j0"})
    assert hmp("block_job_cancel nosuch") == "Error: Block job 'nosuch' not found\n"
    daemon.ok("block-job-pause", device="j0")
    assert hmp("block_job_cancel j0") == (
        "Error: The block job for device 'j0' is currently paused\n"
    )
    assert hmp("block_job_cancel -f j0") == ""
    assert daemon.event("BLOCK_JOB_CANCELLED")["data"]["device"] == "j0"
    assert hmp("info jobs") == "No jobs\n"
