"""Image locking against QEMU 7.2: the same lock bytes, the same refusals, both ways.

The lock bytes each daemon holds are read from outside with ``F_OFD_GETLK`` probes (a lock
held by any other open file description shows), after the same commands on qsd and on
pyfleece; they must be equal file by file. Then each side must refuse the other as QEMU
refuses itself: qemu-img/qemu-io against an image pyfleece holds, ``pyfleece img`` against
an image qsd holds (its output compared with qemu-img's in the same situation).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from pyfleece.block import locking
from tests.integration.test_daemon_qmp_vs_qsd import images
from tests.integration.test_daemon_support import Served, daemon_argv, daemon_env, pair, serve
from tests.integration.test_img_helpers import both, qemu

#: Every byte QEMU may lock: 100+i (holding permission i), 200+i (not sharing it).
BYTES = [base + i for base in (locking.PERM_BASE, locking.SHARED_BASE) for i in range(4)]
FILES = ("d.raw", "c.raw", "base.qcow2", "top.qcow2", "ov.qcow2", "t.qcow2", "other.qcow2",
         "t2.qcow2")  # fmt: skip

NODES = [
    {"driver": "qcow2", "node-name": "top", "file": {"driver": "file", "filename": "top.qcow2"}},
    {"driver": "qcow2", "node-name": "ov", "file": {"driver": "file", "filename": "ov.qcow2"}},
    {"driver": "raw", "node-name": "r0", "file": {"driver": "file", "filename": "d.raw"}},
    {"driver": "raw", "node-name": "copy", "file": {"driver": "file", "filename": "c.raw"}},
    {"driver": "qcow2", "node-name": "ro", "read-only": True,
     "file": {"driver": "file", "filename": "t.qcow2"}},
    {"driver": "qcow2", "node-name": "shared", "read-only": True, "force-share": True,
     "file": {"driver": "file", "filename": "other.qcow2"}},
    {"driver": "qcow2", "node-name": "nolock",
     "file": {"driver": "file", "filename": "t2.qcow2", "locking": "off"}},
]  # fmt: skip


def held(path: Path) -> list[int]:
    """The lock bytes some open file description other than ours holds on ``path``."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return [b for b in BYTES if locking.byte_locked_by_others(fd, b)]
    finally:
        os.close(fd)


def layout(daemon: Served) -> dict[str, list[int]]:
    return {name: held(daemon.dir / name) for name in FILES}


def test_lock_bytes_match_qsd(tmp_path: Path) -> None:
    with pair(tmp_path, [], images) as (qsd, ours):
        for options in NODES:
            for daemon in (qsd, ours):
                daemon.ok("blockdev-add", **options)
        theirs = layout(qsd)
        assert theirs["top.qcow2"] == [100, 101, 103, 201, 203]  # written, shares reading
        assert theirs["base.qcow2"] == theirs["t.qcow2"] == [100, 201, 203]  # read-only
        assert theirs["other.qcow2"] == [100]  # force-share
        assert theirs["d.raw"] == theirs["t2.qcow2"] == []  # raw with no user; locking=off
        assert layout(ours) == theirs
        backup = {"device": "r0", "target": "copy", "sync": "none", "job-id": "j0"}
        for daemon in (qsd, ours):
            daemon.ok("blockdev-backup", **backup)
        theirs = layout(qsd)
        assert (theirs["d.raw"], theirs["c.raw"]) == ([201, 203], [101, 203])
        assert layout(ours) == theirs
        for daemon in (qsd, ours):
            daemon.ok("block-job-cancel", device="j0", force=True)
            daemon.event("BLOCK_JOB_CANCELLED")
            daemon.ok("blockdev-del", **{"node-name": "top"})
        theirs = layout(qsd)
        assert theirs["top.qcow2"] == theirs["base.qcow2"] == theirs["d.raw"] == []
        assert layout(ours) == theirs


#: What QEMU's tools try against images a daemon holds (set up by ``hold``), and whether
#: QEMU refuses it for a lock.
TOOL_COMMANDS = [
    (("qemu-img", "info", "top.qcow2"), True),  # written: no reader may unshare writes
    (("qemu-img", "info", "-U", "top.qcow2"), False),
    (("qemu-img", "info", "base.qcow2"), False),  # a backing file: readers may share it
    (("qemu-io", "-c", "write 0 512", "base.qcow2"), True),
    (("qemu-io", "-f", "raw", "-c", "write 0 4k", "d.raw"), True),  # a backup's source
    (("qemu-io", "-f", "raw", "-c", "write 0 4k", "c.raw"), False),  # its target shares writes
    (("qemu-img", "convert", "-O", "raw", "c.raw", "out.raw"), True),  # but is written
    (("qemu-img", "convert", "-O", "raw", "d.raw", "out.raw"), False),
    (("qemu-img", "resize", "-f", "raw", "c.raw", "8M"), True),
    (("qemu-img", "create", "-f", "qcow2", "top.qcow2", "4M"), True),
]


def hold(daemon: Served) -> None:
    daemon.ok("blockdev-add", **NODES[0])
    for options in NODES[2:4]:
        daemon.ok("blockdev-add", **options)
    daemon.ok("blockdev-backup", device="r0", target="copy", sync="none", **{"job-id": "j0"})


def test_qemu_tools_refuse_what_pyfleece_holds_as_they_refuse_qsd(tmp_path: Path) -> None:
    with pair(tmp_path, [], images) as (qsd, ours):
        hold(qsd)
        hold(ours)
        for (tool, *args), refused in TOOL_COMMANDS:
            theirs, mine = (qemu(tool, *args, cwd=d.dir) for d in (qsd, ours))
            assert (theirs.rc != 0 and "lock" in theirs.err) == refused, f"{tool} {args}: {theirs}"
            assert (mine.rc, mine.err) == (theirs.rc, theirs.err), f"{tool} {args}"
    assert held(tmp_path / "ours" / "top.qcow2") == []  # the daemon's exit let go


#: ``pyfleece img`` against images qsd holds: (arguments, whether qemu-img refuses for a
#: lock). Each must give qemu-img's exit status, output and error text.
IMG_COMMANDS = [
    (("info", "top.qcow2"), True),
    (("info", "-U", "top.qcow2"), False),
    (("info", "--force-share", "--output=json", "top.qcow2"), False),
    (("check", "top.qcow2"), True),
    (("check", "-U", "top.qcow2"), False),
    (("check", "-r", "all", "top.qcow2"), True),
    (("check", "-U", "-r", "leaks", "top.qcow2"), False),  # force-share needs read-only
    (("map", "top.qcow2"), True),
    (("map", "-U", "--output=json", "top.qcow2"), False),
    (("compare", "top.qcow2", "top.qcow2"), True),
    (("compare", "-U", "top.qcow2", "base.qcow2"), False),
    (("convert", "-O", "raw", "top.qcow2", "out.raw"), True),
    (("convert", "-U", "-O", "raw", "top.qcow2", "out.raw"), False),
    (("convert", "-O", "raw", "c.raw", "out.raw"), True),  # a backup's target: written
    (("convert", "-O", "raw", "d.raw", "out.raw"), False),  # its source: nobody writes it
    (("convert", "-U", "-O", "qcow2", "t.qcow2", "top.qcow2"), True),  # the target is in use
    (("info", "d.raw"), False),
    (("create", "-f", "qcow2", "top.qcow2", "4M"), True),
    (("create", "-f", "raw", "c.raw", "4M"), True),
    (("create", "-f", "qcow2", "-b", "top.qcow2", "-F", "qcow2", "new.qcow2"), False),
]


@pytest.mark.parametrize(
    ("args", "refused"), IMG_COMMANDS, ids=[" ".join(a) for a, _ in IMG_COMMANDS]
)
def test_pyfleece_img_refuses_what_qsd_holds_as_qemu_img_does(
    tmp_path: Path, args: tuple[str, ...], refused: bool
) -> None:
    images(tmp_path)
    with serve("qsd", tmp_path, []) as qsd:
        hold(qsd)
        theirs, mine = both(*args, cwd=tmp_path)
        assert (theirs.rc != 0 and "lock" in theirs.err) == refused, theirs
        assert mine == theirs


def test_a_daemon_refuses_at_start_an_image_the_other_holds(tmp_path: Path) -> None:
    """qsd and pyfleece each hold top.qcow2; the other one, started on it, fails the same
    way (message and QEMU's hint), pyfleece's text under its own program name."""
    option = "driver=qcow2,node-name=q,file.driver=file,file.filename=top.qcow2"
    with pair(tmp_path, ["--blockdev", option], images) as (qsd, ours):
        outcomes = []
        for holder, kind in ((ours, "qsd"), (qsd, "ours")):
            proc = subprocess.run(
                [*daemon_argv(kind), "--blockdev", option], cwd=holder.dir,
                capture_output=True, text=True, timeout=60, env=daemon_env(),
            )  # fmt: skip
            program = "qemu-storage-daemon" if kind == "qsd" else "pyfleece daemon"
            outcomes.append((proc.returncode, proc.stderr.replace(program, "<daemon>")))
        assert outcomes[0] == outcomes[1] == (1, (
            f"<daemon>: --blockdev {option}: Failed to get \"write\" lock\n"
            "Is another process using the image [top.qcow2]?\n"))  # fmt: skip


def test_export_lock_bytes_match_qsd(tmp_path: Path) -> None:
    """Exports claim read (and write when writable) and unshare resize, as QEMU's do; a
    fleecing job on an exported disk adds the filter's unshares without refusing it."""
    with pair(tmp_path, [], images) as (qsd, ours):
        for daemon in (qsd, ours):
            for options in NODES[2:4]:
                daemon.ok("blockdev-add", **options)
            sock = str(daemon.dir / "nbd.sock")
            daemon.ok("nbd-server-start", addr={"type": "unix", "data": {"path": sock}})
            daemon.ok("block-export-add", type="nbd", id="e0", writable=True,
                      **{"node-name": "r0"})  # fmt: skip
            daemon.ok("block-export-add", type="nbd", id="e1", **{"node-name": "copy"})
        theirs = layout(qsd)
        assert (theirs["d.raw"], theirs["c.raw"]) == ([100, 101, 203], [100, 203])
        assert layout(ours) == theirs
        backup = {"device": "r0", "target": "copy", "sync": "none", "job-id": "j0"}
        for daemon in (qsd, ours):
            daemon.ok("block-export-del", id="e1")
            daemon.event("BLOCK_EXPORT_DELETED")
            daemon.ok("blockdev-backup", **backup)
        theirs = layout(qsd)
        assert layout(ours) == theirs
