"""Differences from qemu-storage-daemon 7.2 once found outside ``daemon/``, now fixed.

Each test states what qsd does and checks pyfleece does the same: the missing-child text,
image locking, a backup's source as another backup's target, aborted transactions, and the
resolver's error text. They were strict xfails until their owning modules were fixed.
"""

from __future__ import annotations

import re
from pathlib import Path

from tests.integration.test_daemon_qmp_vs_qsd import images, same
from tests.integration.test_daemon_support import pair


def _nodes(tmp_path: Path) -> list[str]:
    specs = [("qcow2", "q", "t.qcow2"), ("raw", "r0", "d.raw"), ("raw", "copy", "c.raw")]
    args: list[str] = []
    for driver, name, path in specs:
        args += [
            "--blockdev",
            f"driver={driver},node-name={name},file.driver=file,file.filename={path}",
        ]
    return args


def test_missing_child_reference_text(tmp_path: Path) -> None:
    with pair(tmp_path, [], images) as (qsd, ours):
        same(qsd, ours, "blockdev-add", driver="raw", file="nosuch", **{"node-name": "r"})


def test_same_image_opened_twice_for_writing(tmp_path: Path) -> None:
    with pair(tmp_path, [], images) as (qsd, ours):
        for name in ("a", "b"):
            options = {"driver": "qcow2", "node-name": name,
                       "file": {"driver": "file", "filename": "t.qcow2"}}  # fmt: skip
            same(qsd, ours, "blockdev-add", **options)


def test_backup_source_cannot_be_another_target(tmp_path: Path) -> None:
    with pair(tmp_path, _nodes(tmp_path), images) as (qsd, ours):
        same(qsd, ours, "blockdev-backup", device="r0", target="copy", sync="none",
             **{"job-id": "j0"})  # fmt: skip
        # QEMU names its copy-before-write filter nodes in the text: auto names, normalised.
        args = {"device": "q", "target": "r0", "sync": "none", "job-id": "j1"}
        theirs, mine = (re.sub(r"#block\d+", "#auto", str(d.execute("blockdev-backup", **args)))
                        for d in (qsd, ours))  # fmt: skip
        assert "Permission conflict on node 'r0'" in theirs
        assert mine == theirs


def test_aborted_transaction_starts_no_job(tmp_path: Path) -> None:
    with pair(tmp_path, _nodes(tmp_path), images) as (qsd, ours):
        actions = [{"type": "blockdev-backup", "data": {"device": "r0", "target": "copy",
                                                        "sync": "none", "job-id": "x1"}},
                   {"type": "abort", "data": {}}]  # fmt: skip
        same(qsd, ours, "transaction", actions=actions)
        theirs = [(e["event"], e["data"]) for e in qsd.drain_events()]
        mine = [(e["event"], e["data"]) for e in ours.drain_events()]
        assert mine == theirs


def test_unresolvable_host_text(tmp_path: Path) -> None:
    with pair(tmp_path, [], images) as (qsd, ours):
        addr = {"type": "inet", "data": {"host": "nosuchhost.invalid", "port": "10809"}}
        same(qsd, ours, "nbd-server-start", addr=addr)
