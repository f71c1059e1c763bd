"""Drives as the seed defined them: legacy options, backing override, drive_del rules."""

from __future__ import annotations

from pathlib import Path

import pytest

from pyfleece.block.graph import Graph
from pyfleece.daemon.args import parse_args
from pyfleece.daemon.drives import DriveTable
from pyfleece.errors import ConfigError, DuplicateNode, NodeBusy, NodeNotFound
from pyfleece.keyval import parse_keyval


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    path = tmp_path / "disk.raw"
    path.write_bytes(bytes(1 << 20))
    return path


def test_drive_add_names_drive_and_node(disk: Path) -> None:
    drives = DriveTable(Graph())
    drive = drives.add(parse_keyval(f"file={disk},format=raw,id=ide0-hd0,if=none"))
    assert drive.node.node_name == "ide0-hd0" and drive.node.driver == "raw"
    assert drives.node_of("ide0-hd0") is drive.node
    with pytest.raises(DuplicateNode):
        drives.add(parse_keyval(f"file={disk},id=ide0-hd0"))


def test_drive_options_rejected(disk: Path) -> None:
    drives = DriveTable(Graph())
    with pytest.raises(ConfigError, match="if=ide"):
        drives.add(parse_keyval(f"file={disk},id=d,if=ide"))
    with pytest.raises(ConfigError, match="needs a file"):
        drives.add(parse_keyval("id=d"))
    with pytest.raises(NodeNotFound, match="Device 'nope' not found"):
        drives.add(parse_keyval(f"file={disk},format=raw,id=d,backing=nope"))


def test_drive_del_releases_soft_refuses_hard(disk: Path) -> None:
    graph = Graph()
    drives = DriveTable(graph)
    drive = drives.add(parse_keyval(f"file={disk},format=raw,id=d0"))
    released: list[str] = []
    drive.node.add_ref(
        "export 'e'", "exported", hard=False, on_release=lambda: released.append("e")
    )
    hard = drive.node.add_ref(
        "block job 'j'", "block device is in use by block job: backup", hard=True
    )
    with pytest.raises(NodeBusy, match="in use by block job: backup"):
        drives.delete("d0")
    assert released == []
    hard.release()
    drives.delete("d0")
    assert released == ["e"] and "d0" not in graph
    with pytest.raises(NodeNotFound, match="Device 'd0' not found"):
        drives.delete("d0")


def test_daemon_args_keep_order() -> None:
    args = parse_args(
        [
            "--blockdev",
            "null-co,node-name=n0",
            "--export",
            "nbd,id=e0,node-name=n0",
            "--pidfile=/tmp/p",
            "--blockdev",
            '{"driver": "null-co", "node-name": "n1"}',
        ]
    )
    assert [a.kind for a in args.actions] == ["blockdev", "export", "blockdev"]
    assert args.actions[0].options == {"driver": "null-co", "node-name": "n0"}
    assert args.actions[1].options["type"] == "nbd"
    assert args.pidfile == "/tmp/p"
    with pytest.raises(ConfigError, match="unrecognized option"):
        parse_args(["--bogus", "x"])
    with pytest.raises(ConfigError, match="requires an argument"):
        parse_args(["--blockdev"])
