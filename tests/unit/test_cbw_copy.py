"""What copy-before-write copies, and how: units, explicit zeros, one copy per run, the
guard on the target's backing edge, and the references fleecing holds."""

from __future__ import annotations

import errno

import pytest

from pyfleece.block.copy_before_write import CopyBeforeWrite, SnapshotGuard, unit_size
from pyfleece.block.fault import FaultNode, Rule
from pyfleece.block.graph import Graph
from pyfleece.block.memory import MemoryNode
from pyfleece.errors import NodeBusy
from pyfleece.events import EventBus
from pyfleece.jobs import JobManager
from tests.overlay import OverlayNode

KiB, MiB = 1 << 10, 1 << 20
UNIT = 64 * KiB
SIZE = 2 * MiB

pytestmark = pytest.mark.timeout(30)

# (pattern, offset, length) on the disk before the snapshot; the rest is holes.
BEFORE = [(0x5D, 0, 64 * KiB), (0xD5, 1 * MiB, 64 * KiB), (0xCD, 2 * MiB - 64 * KiB, 64 * KiB)]


def disk_with_patterns() -> tuple[MemoryNode, bytes]:
    disk = MemoryNode("disk", SIZE)
    for byte, offset, length in BEFORE:
        disk.write(offset, bytes([byte]) * length)
    return disk, disk.read(0, SIZE)


@pytest.mark.parametrize(
    ("cluster", "unit"),
    [(0, 64 * KiB), (4 * KiB, 64 * KiB), (64 * KiB, 64 * KiB), (2 * MiB, 2 * MiB)],
)
def test_unit_is_max_of_64k_and_cluster_size(cluster: int, unit: int) -> None:
    assert unit_size(cluster) == unit


# The image-fleecing overwrites (scaled to 2 MiB): (byte, offset, length) and the units each
# one makes the job copy.
OVERWRITES = [
    (0xAB, 0, 64 * KiB, {0}),
    (0xAD, 0xF8000, 64 * KiB, {15, 16}),
    (0x1D, 0x108000, 16 * KiB, {16}),
    (0xEA, 2 * MiB - 96 * KiB, 64 * KiB, {30, 31}),
]


def test_guest_writes_copy_each_touched_unit_once() -> None:
    disk, frozen = disk_with_patterns()
    snap = OverlayNode("snap", SIZE, backing=disk)
    cbw = CopyBeforeWrite(disk, snap)
    cbw.attach()
    expected: set[int] = set()
    for byte, offset, length, units in OVERWRITES:
        disk.write(offset, bytes([byte]) * length)
        expected |= units
        assert set(snap.writes) == expected
        assert snap.read(0, SIZE) == frozen
    assert all(n == 1 for n in snap.writes.values())
    assert (cbw.units_copied, cbw.bytes_copied) == (len(expected), len(expected) * UNIT)


def test_zeros_are_copied_as_explicit_zero_clusters() -> None:
    disk, _ = disk_with_patterns()
    src = FaultNode("src", disk, owned=True, rules=[])
    snap = OverlayNode("snap", SIZE, backing=src)
    CopyBeforeWrite(src, snap).attach()
    src.write(5 * UNIT + 7, b"\x01" * 9)  # unit 5 was a hole
    assert snap.allocated() == {5: False}  # allocated, as a zero cluster
    src.add_rule(Rule("read", offset=5 * UNIT, length=UNIT, once=False))
    assert snap.read(5 * UNIT, UNIT) == bytes(UNIT)  # never reads through to the disk again
    assert snap.block_status(5 * UNIT, UNIT)[2:5] == (False, True, True)  # zero, allocated


@pytest.mark.parametrize("kind", ["write-zeroes", "discard"])
def test_zeroes_and_discards_copy_first(kind: str) -> None:
    disk, frozen = disk_with_patterns()
    snap = OverlayNode("snap", SIZE, backing=disk)
    CopyBeforeWrite(disk, snap).attach()
    if kind == "write-zeroes":
        disk.write_zeroes(0, 2 * UNIT, may_unmap=True)
    else:
        disk.discard(0, 2 * UNIT)
    assert disk.read(0, UNIT) == bytes(UNIT)
    assert snap.read(0, SIZE) == frozen and set(snap.writes) == {0, 1}


def test_contiguous_units_copy_with_one_read() -> None:
    disk = MemoryNode("disk", SIZE)
    disk.write(0, b"\x11" * SIZE)
    counter = Rule("read", nth=1 << 40)  # never fires: counts the reads of the disk
    src = FaultNode("src", disk, owned=True, rules=[counter])
    snap = OverlayNode("snap", SIZE, backing=src)
    CopyBeforeWrite(src, snap).attach()
    src.write(0, b"\x22" * MiB)
    assert counter.hits == 1 and len(snap.writes) == 16


def test_unit_follows_the_target_cluster_size() -> None:
    disk, frozen = disk_with_patterns()
    snap = OverlayNode("snap", SIZE, backing=disk, cluster_size=128 * KiB)
    jobs = JobManager(EventBus())
    job = jobs.start_backup(disk, snap, sync="none", job_id="j0")
    disk.write(70 * KiB, b"\xee" * 4096)
    assert job.cbw.unit == 128 * KiB and dict(snap.writes) == {0: 1}
    assert job.progress() == (128 * KiB, SIZE)
    assert snap.read(0, SIZE) == frozen
    jobs.shutdown()


def test_guard_replaces_the_backing_edge_and_the_references_name_qemus_holders() -> None:
    graph = Graph()
    disk, _ = disk_with_patterns()
    snap = OverlayNode("target0", SIZE, backing=disk)
    graph.add(disk)
    graph.add(snap)
    jobs = JobManager(EventBus())
    jobs.start_backup(disk, snap, sync="none", device="ide0-hd0")
    guard = snap.child("backing")
    assert (
        isinstance(guard, SnapshotGuard) and guard.filtered is disk and guard.host_map(0, 1) is None
    )
    with pytest.raises(NodeBusy) as err:
        graph.remove("target0", release_soft=True)  # drive_del target0 during the job
    assert str(err.value) == "Node 'target0' is busy: block device is in use by block job: backup"
    with pytest.raises(NodeBusy) as err:
        graph.remove("disk")
    assert str(err.value) == "Node 'disk' is busy: node is used as backing hd of 'target0'"
    jobs.block_job_complete("ide0-hd0")
    assert snap.child("backing") is disk and guard.closed
    assert [r.reason for r in disk.refs()] == ["node is used as backing hd of 'target0'"]
    graph.remove("target0", release_soft=True)
    assert disk.refs() == []


def test_busy_target_and_bad_pairs_are_refused() -> None:
    from pyfleece.errors import CommandError

    disk, _ = disk_with_patterns()
    snap = OverlayNode("tgt", SIZE, backing=disk)
    jobs = JobManager(EventBus())
    jobs.start_backup(disk, snap, sync="none", job_id="j0")
    with pytest.raises(CommandError, match=r"^Node 'tgt' is busy: block device is in use by"):
        jobs.start_backup(disk, snap, sync="none", job_id="j1")
    other = MemoryNode("other", SIZE)
    with pytest.raises(CommandError, match=r"^Job ID 'j0' already in use$"):
        jobs.start_backup(disk, other, sync="none", job_id="j0")
    with pytest.raises(CommandError, match=r"^Source and target cannot be the same$"):
        jobs.start_backup(other, other, sync="full", job_id="j2")
    with pytest.raises(CommandError, match=r"^Source and target image have different sizes$"):
        jobs.start_backup(other, MemoryNode("small", UNIT), sync="full", job_id="j2")
    with pytest.raises(CommandError, match=r"^Parameter 'sync' does not accept value 'bitmap'$"):
        jobs.start_backup(other, MemoryNode("t", SIZE), sync="bitmap", job_id="j2")
    assert [r.holder for r in other.refs()] == []
    jobs.shutdown()


@pytest.mark.timeout(10)
def test_a_partial_cluster_copy_reads_its_own_claim_through_the_guard() -> None:
    size = 3 * UNIT + 4096  # the last unit is partial, so its copy is a partial-cluster write
    disk = MemoryNode("disk", size)
    disk.write(0, b"\x77" * size)
    snap = OverlayNode("snap", size, backing=disk)
    CopyBeforeWrite(disk, snap).attach()
    disk.write(3 * UNIT, b"\x88" * 10)  # the target's copy-on-write reads the claimed unit
    assert snap.read(0, size) == b"\x77" * size and dict(snap.writes) == {3: 1}


def test_guard_refuses_a_target_that_lost_a_copied_unit() -> None:
    disk, _ = disk_with_patterns()
    snap = OverlayNode("snap", SIZE, backing=disk)
    CopyBeforeWrite(disk, snap).attach()
    disk.write(0, b"\x01")
    snap.discard(0, UNIT)  # a broken target: the copy is gone
    snap._clusters.pop(0)
    with pytest.raises(Exception) as err:
        snap.read(0, 10)
    assert getattr(err.value, "errno", None) == errno.EIO


# QEMU's image-fleecing scenario on a 64 MiB disk: (byte, offset, length).
FLEECE_PATTERNS = [(0x5D, 0, 0x10000), (0xD5, 0x100000, 0x10000), (0xDC, 0x2000000, 0x10000),
                   (0xCD, 0x3FF0000, 0x10000)]  # fmt: skip
FLEECE_OVERWRITES = [(0xAB, 0, 0x10000), (0xAD, 0xF8000, 0x10000), (0x1D, 0x2008000, 0x10000),
                     (0xEA, 0x3FE0000, 0x10000)]  # fmt: skip


def test_image_fleecing_scenario_copies_six_units() -> None:
    size = 64 * MiB
    disk = MemoryNode("drive0", size)
    for byte, offset, length in FLEECE_PATTERNS:
        disk.write(offset, bytes([byte]) * length)
    fleece = OverlayNode("fleece", size, backing=disk)
    bus = EventBus()
    jobs = JobManager(bus)
    events: list[dict[str, object]] = []
    bus.subscribe(lambda e: events.append(e.data) if e.name == "BLOCK_JOB_CANCELLED" else None)
    jobs.start_backup(disk, fleece, sync="none", job_id="fleecing")
    for byte, offset, length in FLEECE_PATTERNS:
        assert fleece.read(offset, length) == bytes([byte]) * length
    for byte, offset, length in FLEECE_OVERWRITES:
        disk.write(offset, bytes([byte]) * length)
    for byte, offset, length in FLEECE_PATTERNS:
        assert fleece.read(offset, length) == bytes([byte]) * length
    assert fleece.read(0xF8000, 0x8000) == bytes(0x8000)  # zero at snapshot time
    jobs.block_job_cancel("fleecing")
    assert events == [{"type": "backup", "device": "fleecing", "len": size, "offset": 393216,
                       "speed": 0}]  # fmt: skip
    assert sorted(fleece.allocated()) == [0, 15, 16, 512, 513, 1022]
