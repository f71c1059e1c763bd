"""The daemon's QMP commands against qemu-storage-daemon 7.2, side by side.

Each test starts qsd and pyfleece with the same command line in two directories laid out the
same way (relative paths), sends both the same commands, and compares the replies whole:
results, error classes and texts. Auto-generated node names (``#block123``) are the one
thing normalised away. Differences that are ours on purpose (docs/daemon.md) are not sent.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_daemon_support import Served, make_images, pair
from tests.support import run


def normalised(value: Any) -> Any:
    """Auto node names differ between runs and daemons: replaced by one token."""
    if isinstance(value, dict):
        return {k: normalised(v) for k, v in value.items()}
    if isinstance(value, list):
        return [normalised(v) for v in value]
    if isinstance(value, str) and value.startswith("#"):
        return "#auto"
    return value


def same(qsd: Served, ours: Served, command: str, /, **args: Any) -> dict[str, Any]:
    """Runs a command on both; the replies must be equal. Returns qsd's."""
    theirs, mine = (
        normalised(qsd.execute(command, **args)),
        normalised(ours.execute(command, **args)),
    )
    assert mine == theirs, f"{command} {args}"
    return dict(theirs)


def by_name(nodes: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {n["node-name"]: n for n in nodes if not n["node-name"].startswith("#")}


def images(workdir: Path) -> None:
    make_images(workdir, ("d.raw", "raw", "4M"), ("base.qcow2", "qcow2", "4M"),
                ("other.qcow2", "qcow2", "4M"), ("t.qcow2", "qcow2", "4M"),
                ("t2.qcow2", "qcow2", "4M"), ("c.raw", "raw", "4M"),
                ("odd.raw", "raw", "1000"))  # fmt: skip
    for top, base, fmt in (("top.qcow2", "base.qcow2", "qcow2"), ("ov.qcow2", "d.raw", "raw")):
        run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", fmt, top], cwd=workdir)


#: blockdev-add arguments whose nodes query-named-block-nodes must show exactly as qsd does.
NODES: list[dict[str, Any]] = [
    {"driver": "null-co", "node-name": "n0"},
    {"driver": "null-co", "node-name": "n1", "size": 1 << 20},
    {"driver": "file", "filename": "d.raw", "node-name": "f0"},
    {"driver": "raw", "file": "f0", "node-name": "r0"},
    {"driver": "raw", "file": {"driver": "file", "filename": "odd.raw"}, "node-name": "odd"},
    {"driver": "raw", "file": {"driver": "file", "filename": "d.raw"}, "offset": 512,
     "size": 1024, "node-name": "window"},
    {"driver": "raw", "file": {"driver": "file", "filename": "c.raw"}, "read-only": True,
     "node-name": "ro"},
    {"driver": "qcow2", "file": {"driver": "file", "filename": "top.qcow2"}, "node-name": "q0"},
    {"driver": "qcow2", "file": {"driver": "file", "filename": "other.qcow2"}, "backing": "q0",
     "node-name": "q1"},
    {"driver": "qcow2", "file": {"driver": "file", "filename": "t.qcow2", "node-name": "tf"},
     "backing": None, "node-name": "q2"},
    {"driver": "qcow2", "file": {"driver": "file", "filename": "ov.qcow2"}, "node-name": "q3"},
    {"driver": "qcow2", "file": {"driver": "file", "filename": "t2.qcow2"}, "backing": "r0",
     "node-name": "fleece"},
]  # fmt: skip


def test_blockdev_add_and_node_queries(tmp_path: Path) -> None:
    with pair(tmp_path, [], images) as (qsd, ours):
        for options in NODES:
            assert "return" in same(qsd, ours, "blockdev-add", **options)
        for flat in (False, True):
            theirs = by_name(normalised(qsd.ok("query-named-block-nodes", flat=flat)))
            mine = by_name(normalised(ours.ok("query-named-block-nodes", flat=flat)))
            assert sorted(mine) == sorted(theirs)
            for name, node in theirs.items():
                assert mine[name] == node, f"flat={flat}: {name}"
        # The auto-named children are there too, one per opened file.
        files = sorted(n["file"] for n in qsd.ok("query-named-block-nodes") if n["drv"] == "file")
        assert files == sorted(n["file"] for n in ours.ok("query-named-block-nodes")
                               if n["drv"] == "file")  # fmt: skip
        window = by_name(ours.ok("query-named-block-nodes"))["window"]
        assert json.loads(window["file"].removeprefix("json:"))["offset"] == 512
        same(qsd, ours, "query-block")


#: (arguments, why) blockdev-add must refuse with qsd's words.
BAD_ADDS: list[dict[str, Any]] = [
    {"driver": "raw", "file": {"driver": "file", "filename": "d.raw"}},
    {"driver": "raw", "file": {"driver": "file", "filename": "nosuch.raw"}, "node-name": "x"},
    {"driver": "raw", "file": {"driver": "file", "filename": "d.raw"}, "node-name": "1bad"},
    {"driver": "raw", "file": {"driver": "file", "filename": "d.raw", "node-name": "-x"},
     "node-name": "ok"},
    {"driver": "qcow2", "file": {"driver": "file", "filename": "d.raw"}, "node-name": "x"},
    {"driver": "null-co", "node-name": "f0"},
]  # fmt: skip


def test_blockdev_add_and_del_refusals(tmp_path: Path) -> None:
    """Every refusal of blockdev-del, in QEMU's order: exported, backing edge, job,
    not added by the monitor, file edge."""
    with pair(tmp_path, ["--nbd-server", "addr.type=unix,addr.path=nbd.sock"], images) as (
        qsd,
        ours,
    ):
        for options in NODES[2:4] + NODES[9:10] + NODES[11:]:
            assert "return" in same(qsd, ours, "blockdev-add", **options)
        for options in BAD_ADDS:
            assert "error" in same(qsd, ours, "blockdev-add", **options)
        same(qsd, ours, "blockdev-add", driver="raw", file={"driver": "file", "filename": "c.raw"},
             **{"node-name": "copy"})  # fmt: skip
        for name in ("nosuch", "f0", "r0", "tf"):
            assert "error" in same(qsd, ours, "blockdev-del", **{"node-name": name})
        same(qsd, ours, "block-export-add", type="nbd", id="e0", **{"node-name": "copy"})
        assert same(qsd, ours, "blockdev-del", **{"node-name": "copy"})["error"]["desc"] == (
            "Node copy is in use"
        )
        same(qsd, ours, "block-export-del", id="e0")
        qsd.event("BLOCK_EXPORT_DELETED"), ours.event("BLOCK_EXPORT_DELETED")
        same(qsd, ours, "blockdev-backup", device="r0", target="fleece", sync="none",
             **{"job-id": "j0"})  # fmt: skip
        busy = same(qsd, ours, "blockdev-del", **{"node-name": "fleece"})
        assert busy["error"]["desc"] == (
            "Node 'fleece' is busy: block device is in use by block job: backup"
        )
        assert (
            "backing hd of 'fleece'"
            in same(qsd, ours, "blockdev-del", **{"node-name": "r0"})["error"]["desc"]
        )
        same(qsd, ours, "block-job-cancel", device="j0")
        qsd.event("BLOCK_JOB_CANCELLED"), ours.event("BLOCK_JOB_CANCELLED")
        for name in ("fleece", "r0", "f0", "copy"):
            assert "return" in same(qsd, ours, "blockdev-del", **{"node-name": name}), name
        same(qsd, ours, "query-named-block-nodes")


#: Commands naming a device, node, export or job that does not exist: qsd's answers.
MISSING: list[tuple[str, dict[str, Any]]] = [
    ("blockdev-backup", {"device": "nosuch", "target": "r0", "sync": "full", "job-id": "j"}),
    ("blockdev-backup", {"device": "r0", "target": "nosuch", "sync": "full", "job-id": "j"}),
    ("blockdev-backup", {"device": "r0", "target": "copy", "sync": "full"}),
    ("blockdev-backup", {"device": "r0", "target": "copy", "sync": "full", "job-id": "1x"}),
    ("blockdev-backup", {"device": "r0", "target": "r0", "sync": "full", "job-id": "j"}),
    ("blockdev-backup", {"device": "r0", "target": "copy", "sync": "bitmap", "job-id": "j"}),
    ("blockdev-backup", {"device": "r0", "target": "copy", "sync": "incremental",
                         "job-id": "j"}),
    ("drive-backup", {"device": "nosuch", "target": "x.qcow2", "sync": "full"}),
    ("drive-backup", {"device": "r0", "target": "nodir/x.qcow2", "sync": "full", "job-id": "j"}),
    ("drive-backup", {"device": "r0", "target": "nosuch.qcow2", "sync": "full",
                      "mode": "existing", "job-id": "j"}),
    ("drive-backup", {"device": "r0", "target": "t.raw", "sync": "none", "format": "raw",
                      "job-id": "j"}),
    ("nbd-server-stop", {}),
    ("nbd-server-add", {"device": "r0"}),
    ("nbd-server-remove", {"name": "nosuch"}),
    ("block-export-add", {"type": "nbd", "id": "e", "node-name": "r0"}),
    ("block-export-del", {"id": "nosuch"}),
    ("transaction", {"actions": [{"type": "abort", "data": {}}]}),
    ("transaction", {"actions": [{"type": "blockdev-backup", "data": {
        "device": "nosuch", "target": "copy", "sync": "none", "job-id": "x"}}]}),
] + [
    (name, {"device": "nosuch"})
    for name in ("block-job-cancel", "block-job-pause", "block-job-resume", "block-job-complete")
] + [
    ("block-job-set-speed", {"device": "nosuch", "speed": 1}),
    ("block-job-finalize", {"id": "nosuch"}),
    ("block-job-dismiss", {"id": "nosuch"}),
] + [
    (name, {"id": "nosuch"})
    for name in ("job-cancel", "job-pause", "job-resume", "job-complete", "job-finalize",
                 "job-dismiss")
]  # fmt: skip


def test_missing_names_and_refused_arguments(tmp_path: Path) -> None:
    args = [
        "--blockdev", "driver=raw,node-name=r0,file.driver=file,file.filename=d.raw",
        "--blockdev", "driver=raw,node-name=copy,file.driver=file,file.filename=c.raw",
    ]  # fmt: skip
    with pair(tmp_path, args, images) as (qsd, ours):
        for command, arguments in MISSING:
            reply = same(qsd, ours, command, **arguments)
            assert "error" in reply, (command, arguments)
        same(qsd, ours, "nbd-server-start", addr={"type": "unix", "data": {"path": "nbd.sock"}})
        for command, arguments in [
            ("nbd-server-add", {"device": "nosuch"}),
            ("nbd-server-add", {"device": "r0", "bitmap": "b0"}),
            ("block-export-add", {"type": "nbd", "id": "e", "node-name": "nosuch"}),
            ("nbd-server-start", {"addr": {"type": "unix", "data": {"path": "x.sock"}}}),
            ("nbd-server-remove", {"name": "nosuch"}),
        ]:
            assert "error" in same(qsd, ours, command, **arguments), command
        same(qsd, ours, "nbd-server-stop")
        addr = {"type": "inet", "data": {"host": "127.0.0.1", "port": "notaport"}}
        assert "error" in same(qsd, ours, "nbd-server-start", addr=addr)
        for host in ("127.0.0.1", "::1"):  # port 0: each daemon gets a free port
            addr = {"type": "inet", "data": {"host": host, "port": "0"}}
            same(qsd, ours, "nbd-server-start", addr=addr)
            same(qsd, ours, "nbd-server-stop")


def test_job_verbs_and_queries(tmp_path: Path) -> None:
    """A paused, throttled full backup with auto-finalize/dismiss off: every verb in every
    state answers as qsd's does, and the queries show the same jobs."""

    def prepare(workdir: Path) -> None:
        images(workdir)
        make_images(workdir, ("big.raw", "raw", "16M"), ("big-copy.raw", "raw", "16M"))
        run(["qemu-io", "-f", "raw", "-c", "write -P 7 0 16M", str(workdir / "big.raw")])

    args = [
        "--blockdev", "driver=raw,node-name=src,file.driver=file,file.filename=big.raw",
        "--blockdev", "driver=raw,node-name=dst,file.driver=file,file.filename=big-copy.raw",
    ]  # fmt: skip
    with pair(tmp_path, args, prepare) as (qsd, ours):
        same(qsd, ours, "blockdev-backup", device="src", target="dst", sync="full", speed=1 << 20,
             **{"job-id": "j0", "auto-finalize": False, "auto-dismiss": False})  # fmt: skip
        for command, arguments in [
            ("block-job-pause", {"device": "j0"}),
            ("block-job-pause", {"device": "j0"}),
            ("job-pause", {"id": "j0"}),
            ("query-jobs", {}),
            ("block-job-cancel", {"device": "j0"}),
            ("block-job-resume", {"device": "j0"}),
            ("job-resume", {"id": "j0"}),
            ("block-job-set-speed", {"device": "j0", "speed": -1}),
            ("block-job-complete", {"device": "j0"}),
            ("job-finalize", {"id": "j0"}),
            ("job-dismiss", {"id": "j0"}),
            ("block-job-set-speed", {"device": "j0", "speed": 0}),
        ]:
            same(qsd, ours, command, **arguments)
        qsd.event("BLOCK_JOB_PENDING"), ours.event("BLOCK_JOB_PENDING")
        for command, arguments in [
            ("query-block-jobs", {}),
            ("query-jobs", {}),
            ("block-job-pause", {"device": "j0"}),
            ("block-job-dismiss", {"id": "j0"}),
            ("block-job-finalize", {"id": "j0"}),
            ("query-jobs", {}),
            ("job-cancel", {"id": "j0"}),
            ("block-job-dismiss", {"id": "j0"}),
            ("query-jobs", {}),
        ]:
            same(qsd, ours, command, **arguments)


@pytest.mark.parametrize(
    ("target", "extra", "backing"),
    [
        ("fleece.qcow2", {"sync": "none", "format": "qcow2"}, "d.raw"),
        ("copy.raw", {"sync": "full"}, None),
        ("c.raw", {"sync": "full", "mode": "existing", "format": "raw"}, None),
    ],
    ids=["sync-none-overlay", "sync-full-raw", "existing"],
)
def test_drive_backup_targets(
    tmp_path: Path, target: str, extra: dict[str, Any], backing: str | None
) -> None:
    """drive-backup creates (or opens) its target as qsd does: with sync=none a qcow2 whose
    backing file is the source's; the node it opens is shown as qsd shows it."""
    args = ["--blockdev", "driver=raw,node-name=r0,file.driver=file,file.filename=d.raw"]
    with pair(tmp_path, args, images) as (qsd, ours):
        same(qsd, ours, "drive-backup", device="r0", target=target, **{"job-id": "j0"}, **extra)
        if extra["sync"] == "none":
            node = [n for n in ours.ok("query-named-block-nodes") if n["file"] == target]
            node = [n for n in node if n["drv"] == "qcow2"]
            theirs = [n for n in qsd.ok("query-named-block-nodes") if n["file"] == target]
            theirs = [n for n in theirs if n["drv"] == "qcow2"]
            # QEMU opens the target with detect-zeroes=unmap; pyfleece detects no zeros, and
            # says so.
            assert [n.pop("detect_zeroes") for n in node + theirs] == ["off", "unmap"]
            assert normalised(node) == normalised(theirs)
            same(qsd, ours, "block-job-cancel", device="j0")
        for served in (qsd, ours):
            served.event(
                "BLOCK_JOB_CANCELLED" if extra["sync"] == "none" else "BLOCK_JOB_COMPLETED"
            )
        infos = [
            json.loads(run(["qemu-img", "info", "-U", "--output=json", str(s.dir / target)]).stdout)
            for s in (qsd, ours)
        ]
        for info, served in zip(infos, (qsd, ours), strict=True):
            info.pop("filename"), info.pop("actual-size")
            if "full-backing-filename" in info:
                assert info.pop("full-backing-filename") == str(served.dir / "d.raw")
        assert infos[1] == infos[0]
        assert infos[1].get("backing-filename") == backing
