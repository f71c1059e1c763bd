"""block/locking.py: permission claims, their conflicts, and the lock bytes they become.

OFD locks held through one open file description conflict with every other one, in this
process too, so a second descriptor on the same file sees what a node holds (``held``).
The byte layout itself is checked against QEMU in tests/integration/test_locking.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pyfleece.block import locking
from pyfleece.block.file import FileNode
from pyfleece.block.graph import Graph
from pyfleece.block.image import open_image
from pyfleece.block.locking import (
    ALL,
    NONE,
    SHARED_READ,
    Claim,
    LockConflict,
    Perm,
    PermissionConflict,
)
from pyfleece.block.memory import MemoryNode
from pyfleece.block.qcow2.create import CreateOptions, create_image
from pyfleece.block.registry import open_node
from pyfleece.errors import ConfigError

MiB = 1 << 20
BYTES = [100, 101, 102, 103, 200, 201, 202, 203]
WRITTEN = [100, 101, 103, 201, 203]  # a qcow2 open read-write
READ = [100, 201, 203]  # a qcow2 open read-only


def held(path: Path) -> list[int]:
    fd = os.open(path, os.O_RDONLY)
    try:
        return [b for b in BYTES if locking.byte_locked_by_others(fd, b)]
    finally:
        os.close(fd)


@pytest.fixture
def qcow2(tmp_path: Path) -> Path:
    path = tmp_path / "t.qcow2"
    create_image(str(path), CreateOptions(size=4 * MiB))
    return path


def test_perm_names_in_qemus_order() -> None:
    assert locking.perm_names(Perm.RESIZE | Perm.WRITE) == "write, resize"
    assert locking.perm_names(ALL) == "consistent read, write, write unchanged, resize"


def test_claims_that_disagree_conflict_with_qemus_text() -> None:
    node = MemoryNode("f0", MiB)
    locking.claim(node, Claim("node 'r0'", "file", Perm.CONSISTENT_READ | Perm.WRITE, ALL))
    unsharing = Claim("node 'q'", "file", Perm.CONSISTENT_READ, SHARED_READ)
    with pytest.raises(PermissionConflict) as refused:
        locking.claim(node, unsharing)
    assert str(refused.value) == (
        "Permission conflict on node 'f0': permissions 'write' are both required by node "
        "'r0' (uses node 'f0' as 'file' child) and unshared by node 'q' (uses node 'f0' as "
        "'file' child)."
    )
    assert [c.holder for c in locking.claims(node)] == ["node 'r0'"]  # nothing half-done
    locking.release(node, "node 'r0'", "file")
    locking.claim(node, unsharing)
    assert locking.demand(node) == (Perm.CONSISTENT_READ, SHARED_READ)


def test_qcow2_locks_its_file_and_a_second_open_conflicts(qcow2: Path) -> None:
    node = open_image(str(qcow2), "qcow2", read_only=False)
    assert held(qcow2) == WRITTEN
    with pytest.raises(LockConflict) as writer:
        open_image(str(qcow2), "qcow2", read_only=False)
    assert str(writer.value) == 'Failed to get "write" lock'
    assert writer.value.hint == f"Is another process using the image [{qcow2}]?"
    with pytest.raises(LockConflict, match=r'^Failed to get shared "write" lock$'):
        open_image(str(qcow2), "qcow2")
    shared = open_image(str(qcow2), "qcow2", force_share=True)
    assert held(qcow2) == WRITTEN  # the shared reader adds consistent read only
    shared.close()
    node.close()
    assert held(qcow2) == []


def test_readers_share_and_keep_writers_out(qcow2: Path) -> None:
    first, second = open_image(str(qcow2), "qcow2"), open_image(str(qcow2), "qcow2")
    assert held(qcow2) == READ
    with pytest.raises(LockConflict, match='"write" lock'):
        open_image(str(qcow2), "qcow2", read_only=False)
    assert held(qcow2) == READ  # the refused writer left no byte behind
    first.close()
    second.close()


def test_locking_off_takes_and_checks_nothing(qcow2: Path) -> None:
    options = {"driver": "qcow2", "file": {"driver": "file", "filename": str(qcow2),
                                           "locking": "off"}}  # fmt: skip
    node = open_node(options)
    assert held(qcow2) == []
    other = open_image(str(qcow2), "qcow2", read_only=False)
    second = open_node(options)  # not even another writer stops it
    for n in (second, other, node):
        n.close()
    with pytest.raises(ConfigError, match=r"^Parameter 'locking' does not accept value 'x'$"):
        open_node({"driver": "file", "filename": str(qcow2), "locking": "x"})


def test_force_share_needs_read_only(qcow2: Path) -> None:
    with pytest.raises(ConfigError, match=r"^force-share=on can only be used with read-only"):
        open_image(str(qcow2), "qcow2", read_only=False, force_share=True)
    graph = Graph()
    with pytest.raises(ConfigError, match="force-share=on"):
        graph.open({"driver": "qcow2", "node-name": "q", "force-share": True,
                    "file": {"driver": "file", "filename": str(qcow2)}})  # fmt: skip
    graph.open({"driver": "qcow2", "node-name": "q", "force-share": True, "read-only": True,
                "file": {"driver": "file", "filename": str(qcow2)}})  # fmt: skip
    assert held(qcow2) == [100]
    graph.close_all()


def test_a_referenced_file_node_lets_go_when_its_parent_goes(qcow2: Path) -> None:
    graph = Graph()
    graph.open({"driver": "file", "node-name": "f0", "filename": str(qcow2)})
    assert held(qcow2) == []  # nobody uses it yet, as in QEMU
    graph.open({"driver": "qcow2", "node-name": "q", "file": "f0"})
    assert held(qcow2) == WRITTEN
    graph.remove("q")
    assert held(qcow2) == []
    raw = graph.open({"driver": "raw", "node-name": "r", "file": "f0"})
    locking.claim(raw, Claim("node 'user'", "root", Perm.CONSISTENT_READ | Perm.WRITE, ALL))
    assert held(qcow2) == [100, 101]  # raw passes its users' claims down
    with pytest.raises(PermissionConflict, match="required by node 'r'"):
        graph.open({"driver": "qcow2", "node-name": "q2", "file": "f0"})
    graph.close_all()
    assert held(qcow2) == []


def test_a_fault_node_passes_claims_to_its_image(qcow2: Path) -> None:
    node = open_node({"driver": "qcow2", "file": {"driver": "fault", "rules": [],
                      "image": {"driver": "file", "filename": str(qcow2)}}})  # fmt: skip
    assert held(qcow2) == WRITTEN
    node.close()
    assert held(qcow2) == []


def test_a_refused_change_restores_the_bytes_held(qcow2: Path) -> None:
    node = FileNode("f", str(qcow2), read_only=False)
    node.permissions_changed(Perm.CONSISTENT_READ, ALL)
    reader = open_image(str(qcow2), "qcow2")  # unshares write
    with pytest.raises(LockConflict, match='"write" lock'):
        node.permissions_changed(Perm.CONSISTENT_READ | Perm.WRITE, NONE)
    reader.close()
    assert held(qcow2) == [100]  # not 101, nor the 20x bytes the refused change applied
    node.close()


def test_creating_an_image_in_use_leaves_it_alone(qcow2: Path) -> None:
    before = qcow2.read_bytes()
    node = open_image(str(qcow2), "qcow2")
    with pytest.raises(LockConflict, match=r'^Failed to get "write" lock$'):
        locking.open_for_create(str(qcow2))
    assert qcow2.read_bytes() == before
    node.close()
    fd = locking.open_for_create(str(qcow2))
    try:
        assert os.fstat(fd).st_size == 0 and held(qcow2) == [101, 103, 203]
    finally:
        os.close(fd)
