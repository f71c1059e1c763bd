"""The node contract on the simple drivers: bounds, permissions, status, refs, tracking."""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

import pytest

from pyfleece.block.fault import FaultNode, Rule
from pyfleece.block.graph import Graph
from pyfleece.block.image import open_image
from pyfleece.block.memory import MemoryNode
from pyfleece.block.qcow2.create import CreateOptions, create_image
from pyfleece.block.registry import open_node
from pyfleece.block.tracking import ReqKind
from pyfleece.errors import BlockError, ConfigError, NodeBusy, NodeNotFound

MiB = 1 << 20


@pytest.fixture
def raw_file(tmp_path: Path) -> Path:
    path = tmp_path / "disk.raw"
    with open(path, "wb") as f:
        f.truncate(4 * MiB)
    return path


def test_raw_over_file_roundtrip(raw_file: Path) -> None:
    node = open_image(str(raw_file), read_only=False)
    assert node.driver == "raw" and node.size == 4 * MiB
    node.write(4096, b"\xab" * 8192)
    assert node.read(4096, 8192) == b"\xab" * 8192
    assert node.read(0, 4096) == bytes(4096)
    node.write_zeroes(4096, 4096, may_unmap=True)
    assert node.read(4096, 8192) == bytes(4096) + b"\xab" * 4096
    node.flush()
    node.close()


def test_bounds_and_permissions(raw_file: Path) -> None:
    node = open_image(str(raw_file), read_only=True)
    with pytest.raises(BlockError) as err:
        node.write(0, b"x")
    assert err.value.errno == errno.EPERM
    with pytest.raises(BlockError) as err:
        node.read(4 * MiB - 1, 2)
    assert err.value.errno == errno.EINVAL
    node.close()
    node = open_image(str(raw_file), read_only=False)
    with pytest.raises(BlockError) as err:
        node.write(4 * MiB, b"x")
    assert err.value.errno == errno.ENOSPC
    node.close()


def test_file_block_status_sees_holes(raw_file: Path) -> None:
    node = open_image(str(raw_file), read_only=False)
    node.write(MiB, b"\x01" * 65536)
    exts = list(node.extents())
    assert sum(e.length for e in exts) == 4 * MiB
    data = [e for e in exts if e.data]
    assert data and data[0].offset <= MiB < data[0].offset + data[0].length
    assert all(e.zero for e in exts if not e.data)
    node.close()


def test_raw_window(raw_file: Path) -> None:
    node = open_node(
        {
            "driver": "raw",
            "offset": "1M",
            "size": "1M",
            "file": {"driver": "file", "filename": str(raw_file)},
        }
    )
    assert node.size == MiB
    node.write(0, b"hello")
    node.close()
    assert raw_file.read_bytes()[MiB : MiB + 5] == b"hello"
    with pytest.raises(ConfigError):
        open_node(
            {
                "driver": "raw",
                "offset": "4M",
                "size": "1M",
                "file": {"driver": "file", "filename": str(raw_file)},
            }
        )


def test_unknown_option_and_driver() -> None:
    with pytest.raises(ConfigError, match="does not support the option 'bogus'"):
        open_node({"driver": "null-co", "bogus": "1"})
    with pytest.raises(ConfigError, match="Unknown driver"):
        open_node({"driver": "nonesuch"})


def test_memory_node_sparse() -> None:
    node = MemoryNode("m", 1 << 30)
    node.write(70000, b"x" * 100)
    assert node.read(70000, 100) == b"x" * 100
    first = node.block_status(0, 1 << 30)
    assert not first.data and first.zero and first.length == 65536
    node.discard(0, 1 << 20)
    assert node.read(70000, 100) == bytes(100)


def test_fault_nth_write_fails_once() -> None:
    mem = MemoryNode("m", MiB)
    node = FaultNode("f", mem, owned=True, rules=[Rule("write", errno.ENOSPC, nth=2)])
    node.write(0, b"a")
    with pytest.raises(BlockError) as err:
        node.write(0, b"b")
    assert err.value.errno == errno.ENOSPC
    node.write(0, b"c")
    assert node.read(0, 1) == b"c"


def test_fault_range_and_options() -> None:
    node = open_node(
        {
            "driver": "fault",
            "image": {"driver": "null-co", "size": "1M"},
            "rules": [
                {"op": "read", "offset": "64k", "length": "64k", "once": "off", "errno": "28"}
            ],
        }
    )
    node.read(0, 65536)
    for _ in range(2):
        with pytest.raises(BlockError):
            node.read(65536 + 10, 10)
    with pytest.raises(ConfigError):
        open_node({"driver": "fault", "image": {"driver": "null-co"}, "rules": [{"op": "explode"}]})


def test_fault_node_grows_with_its_image(tmp_path: Path) -> None:
    path = tmp_path / "grow.img"
    path.write_bytes(bytes(4096))
    node = open_node({"driver": "fault", "image": {"driver": "file", "filename": str(path)},
                      "rules": []})  # fmt: skip
    assert node.growable
    node.write(8192, b"\x5a" * 4096)
    assert node.size == 12288 and path.stat().st_size == 12288
    assert node.read(8192, 4096) == b"\x5a" * 4096
    node.close()
    fixed = open_node({"driver": "fault", "image": {"driver": "null-co", "size": 4096}})
    assert not fixed.growable
    with pytest.raises(BlockError) as err:
        fixed.write(4096, b"x")
    assert err.value.errno == errno.ENOSPC


def test_qcow2_allocates_through_a_fault_node(tmp_path: Path) -> None:
    """A qcow2 whose container is a fault node with no rules allocates as on the file."""
    path = tmp_path / "t.qcow2"
    create_image(str(path), CreateOptions(size=4 * MiB))
    before = path.stat().st_size
    node = open_node({"driver": "qcow2", "file": {"driver": "fault", "rules": [],
                      "image": {"driver": "file", "filename": str(path)}}})  # fmt: skip
    node.write(MiB, b"\x77" * 65536)
    assert node.read(MiB, 65536) == b"\x77" * 65536
    node.close()
    assert path.stat().st_size > before
    reopened = open_image(str(path), "qcow2")
    assert reopened.read(MiB, 65536) == b"\x77" * 65536
    reopened.close()


def test_graph_references() -> None:
    graph = Graph()
    graph.open({"driver": "null-co", "node-name": "base"})
    top = graph.open({"driver": "raw", "node-name": "top", "file": "base"})
    with pytest.raises(NodeBusy, match="Node 'base' is busy: node is used as file of 'top'"):
        graph.remove("base")
    released = []
    soft = top.add_ref("export 'e'", "exported", hard=False, on_release=lambda: released.append(1))
    with pytest.raises(NodeBusy):
        graph.remove("top")
    graph.remove("top", release_soft=True)
    assert released == [1] and soft.released
    graph.remove("base")
    with pytest.raises(NodeNotFound):
        graph.get("base")


def test_tracker_waits_for_overlap() -> None:
    mem = MemoryNode("m", MiB)
    gate = threading.Event()
    fault = FaultNode("f", mem, owned=True, rules=[])
    rule = fault.add_rule(Rule("read", pause=gate))
    reader = threading.Thread(target=fault.read, args=(0, 4096))
    reader.start()
    assert rule.reached.wait(5)
    assert not fault.tracker.wait_overlapping(0, 10, timeout=0.05)
    assert fault.tracker.wait_overlapping(8192, 10, timeout=1)
    assert fault.tracker.wait_overlapping(0, 10, kinds=frozenset({ReqKind.WRITE}), timeout=1)
    gate.set()
    assert fault.tracker.wait_overlapping(0, 10, timeout=5)
    reader.join(5)


@pytest.mark.parametrize("how", ["flush", "fua"])
def test_file_flush_fails_for_good_once_fdatasync_failed(
    raw_file: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """After a failed fdatasync the kernel may have marked the unwritten pages clean: the
    next fdatasync succeeds without them. No later flush or FUA write may then report
    success, or a write acknowledged as durable is lost."""
    node = open_image(str(raw_file), read_only=False)
    real = os.fdatasync
    failures = [OSError(errno.EIO, "Input/output error")]

    def fdatasync(fd: int) -> None:
        if failures:
            raise failures.pop()
        real(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    try:
        node.write(0, b"\x11" * 4096)
        with pytest.raises(BlockError) as first:
            if how == "flush":
                node.flush()
            else:
                node.write(4096, b"\x22" * 4096, fua=True)
        assert first.value.errno == errno.EIO and not failures
        with pytest.raises(BlockError) as again:
            node.flush()
        assert again.value.errno == errno.EIO
        with pytest.raises(BlockError):
            node.write(8192, b"\x33" * 4096, fua=True)
    finally:
        node.close()
