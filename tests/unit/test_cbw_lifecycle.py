"""Copy-before-write at its edges: writes in flight when the snapshot is taken, reads and
hooks in flight when it ends, claims that meet after a failed copy, and the copy unit of a
target behind a filter. Staged with fault-node pause rules and events (no sleeps).
"""

from __future__ import annotations

import errno
import threading

import pytest

from pyfleece.block import copy_before_write as cbw_module
from pyfleece.block.copy_before_write import CopyBeforeWrite
from pyfleece.block.fault import FaultNode, Rule
from pyfleece.block.memory import MemoryNode
from pyfleece.block.node import WriteHook
from pyfleece.block.tracking import ReqKind, RequestTracker, TrackedRequest
from pyfleece.errors import BlockError
from pyfleece.jobs import JobManager
from tests.jobaids import wait_until
from tests.overlay import OverlayNode
from tests.unit.test_cbw_races import OLD, SIZE, UNIT, Worker

NEW, NEWER = b"\xab", b"\xcd"

pytestmark = pytest.mark.timeout(60)


def live_disk() -> tuple[MemoryNode, FaultNode]:
    disk = MemoryNode("disk", SIZE)
    disk.write(0, OLD * SIZE)
    return disk, FaultNode("src", disk, owned=True, rules=[])


def test_a_write_in_flight_at_the_snapshot_is_in_it_even_when_its_unit_is_copied_early() -> None:
    """W1 began before the snapshot and is still in the driver; W2 (after the hook) touches
    the same unit. The snapshot is taken once W1 is done, so it must hold W1: W2's copy may
    not read the unit before W1 has landed."""
    disk, src = live_disk()
    release = threading.Event()
    rule = src.add_rule(Rule("write", offset=0, length=10, pause=release))
    snap = OverlayNode("snap", SIZE, backing=src)
    first = Worker(lambda: src.write(0, NEW * 10))
    assert rule.reached.wait(10)  # W1 is inside the source, its bytes not yet on the disk
    cbw = CopyBeforeWrite(src, snap, unit=UNIT)
    attacher = Worker(cbw.attach)
    wait_until(lambda: cbw._hook in src.write_hooks, what="the hook")
    second = Worker(lambda: src.write(100, NEWER * 10))
    wait_until(lambda: cbw.waiting_claims == 1 or not second.is_alive(), what="W2")
    release.set()
    first.finish()
    attacher.finish()
    second.finish()
    assert disk.read(0, 110) == NEW * 10 + OLD * 90 + NEWER * 10
    assert snap.read(0, 110) == NEW * 10 + OLD * 100  # W1 is in the snapshot, W2 is not


class PausingTracker(RequestTracker):
    """Holds the first write request right after it is registered, before its node reads
    its write hooks (the window in which a snapshot may be taken under it)."""

    def __init__(self) -> None:
        super().__init__()
        self.reached = threading.Event()
        self.release = threading.Event()

    def begin(self, offset: int, length: int, kind: ReqKind) -> TrackedRequest:
        req = super().begin(offset, length, kind)
        if kind is ReqKind.WRITE and not self.reached.is_set():
            self.reached.set()
            self.release.wait()
        return req


def test_a_write_begun_before_the_snapshot_that_runs_the_hook_is_in_it() -> None:
    """W1 is registered before the snapshot but reads the hook list after the hook went in:
    it runs the hook, yet belongs to the snapshot, which ``attach`` waits for. Its hook must
    neither copy (W1 would be missing from the snapshot) nor wait for W1 (itself)."""
    disk, src = live_disk()
    src.tracker = tracker = PausingTracker()
    snap = OverlayNode("snap", SIZE, backing=src)
    first = Worker(lambda: src.write(0, NEW * 10))
    assert tracker.reached.wait(10)
    cbw = CopyBeforeWrite(src, snap, unit=UNIT)
    attacher = Worker(cbw.attach)
    wait_until(lambda: cbw._marker is not None, what="the snapshot marker")
    tracker.release.set()
    first.finish()
    attacher.finish()
    src.write(100, NEWER * 10)
    assert disk.read(0, 110) == NEW * 10 + OLD * 90 + NEWER * 10
    assert snap.read(0, 110) == NEW * 10 + OLD * 100


def test_job_end_waits_for_snapshot_reads_in_flight() -> None:
    """A snapshot read holds unit 0 shared, reading the live disk, when the job ends. The
    read began while the snapshot stood: it must return snapshot bytes, so the guest's write
    to unit 0 must still wait for it."""
    disk, src = live_disk()
    snap = OverlayNode("snap", SIZE, backing=src)
    cbw = CopyBeforeWrite(src, snap, unit=UNIT)
    cbw.attach()
    release = threading.Event()
    rule = src.add_rule(Rule("read", offset=0, length=UNIT, pause=release))
    reader = Worker(lambda: snap.read(0, 4096))
    assert rule.reached.wait(10)
    detacher = Worker(cbw.detach)
    wait_until(lambda: snap.child("backing") is src, what="the backing edge back")
    writer = Worker(lambda: src.write(0, NEW * 4096))
    wait_until(lambda: cbw.waiting_claims == 1 or not writer.is_alive(), what="the writer")
    release.set()
    assert reader.finish() == OLD * 4096
    writer.finish()
    detacher.finish()
    assert disk.read(0, 4096) == NEW * 4096 and snap.child("backing") is src


def test_a_hook_that_runs_after_the_job_ended_copies_nothing() -> None:
    """Two jobs on one source: a guest write is inside the first job's copy when the second
    job ends. The write then runs the second job's hook (the hook list it iterates was read
    before): that hook must not write to a target its job has let go (it may be deleted)."""
    disk, src = live_disk()
    first_target = FaultNode("t1", OverlayNode("ov1", SIZE), owned=True, rules=[])
    second_target = OverlayNode("snap2", SIZE, backing=src)
    first = CopyBeforeWrite(src, first_target, unit=UNIT)
    first.attach()
    second = CopyBeforeWrite(src, second_target, unit=UNIT)
    second.attach()
    release = threading.Event()
    rule = first_target.add_rule(Rule("write", pause=release))
    writer = Worker(lambda: src.write(0, NEW * 10))
    assert rule.reached.wait(10)  # inside the first job's copy; the second hook comes next
    second.detach()
    release.set()
    writer.finish()
    assert dict(second_target.writes) == {} and second.units_copied == 0
    assert disk.read(0, 10) == NEW * 10 and first_target.read(0, 10) == OLD * 10


class GatedCondition(threading.Condition):
    """A condition that holds one chosen thread after it wakes, until the test opens the
    gate: the test picks who re-checks first, as a scheduler may."""

    def __init__(self) -> None:
        super().__init__(threading.Lock())
        self.held: threading.Thread | None = None
        self.at_gate = threading.Event()
        self.gate = threading.Event()

    def wait(self, timeout: float | None = None) -> bool:
        woke = super().wait(timeout)
        if threading.current_thread() is self.held and not self.gate.is_set():
            self.at_gate.set()
            self.release()
            try:
                self.gate.wait()
            finally:
                self.acquire()
        return woke


def test_claimers_meeting_after_a_failed_copy_do_not_deadlock() -> None:
    """Y's copy of unit 1 fails and leaves it unclaimed; B (units 1-2) and A (units 1-2)
    then race for it. Whatever order they re-check in, both must finish."""
    disk, src = live_disk()
    target = FaultNode("snap", OverlayNode("ov", SIZE), owned=True, rules=[])
    cbw = CopyBeforeWrite(src, target, unit=UNIT)
    gated = GatedCondition()
    cbw._cond = gated  # staging only: lets the test order the wake-ups
    cbw.attach()
    release = threading.Event()
    rule = src.add_rule(Rule("read", offset=UNIT, length=UNIT, pause=release))
    target.add_rule(Rule("write", errno.ENOSPC))
    failing = Worker(lambda: src.write(UNIT, NEW))
    assert rule.reached.wait(10)  # Y holds unit 1; its copy will fail
    b = Worker(lambda: src.write(2 * UNIT - 10, NEWER * 20))
    gated.held = b
    wait_until(lambda: cbw.waiting_claims == 1, what="B waiting for unit 1")
    release.set()
    with pytest.raises(BlockError):
        failing.finish()
    assert gated.at_gate.wait(10)  # B woke up and waits at the gate before re-checking
    a = Worker(lambda: src.write(2 * UNIT - 10, NEW * 20))
    wait_until(lambda: not a.is_alive() or cbw.waiting_claims == 2, what="A")
    gated.gate.set()
    a.finish()
    b.finish()
    assert target.read(UNIT, 2 * UNIT) == OLD * 2 * UNIT
    assert disk.read(2 * UNIT - 10, 20) == NEWER * 20  # B wrote last: it left the gate after A


def test_the_copy_unit_follows_a_cluster_size_behind_a_filter(jobs: JobManager) -> None:
    """The target is a fault filter over an overlay with 128 KiB clusters: the unit must be
    the cluster, or copies write half clusters and the target fills the other half from its
    backing, the guard, from inside a copy (qcow2 then deadlocks two writers of one
    cluster: one waits for the other's claim, the other for the cluster the first
    allocates)."""
    disk, src = live_disk()
    overlay = OverlayNode("ov", SIZE, cluster_size=2 * UNIT, backing=src)
    target = FaultNode("snap", overlay, owned=True, rules=[])
    job = jobs.start_backup(src, target, sync="none", job_id="j0")
    assert job.cbw.unit == 2 * UNIT
    src.write(0, NEW)
    src.write(UNIT, NEW)
    assert dict(overlay.writes) == {0: 1}  # one whole-cluster copy, not two halves
    assert disk.read(UNIT - 1, 2) == OLD + NEW
    assert target.read(0, 2 * UNIT) == OLD * 2 * UNIT
    jobs.block_job_cancel("j0")


class SlowHooksNode(FaultNode):
    """A source whose hook list one named thread reads slowly: it stops in the read until
    the test releases it (the window between reading the list and storing a new one)."""

    def __init__(self, name: str, image: MemoryNode, slow_thread: str) -> None:
        self._hooks: list[WriteHook] = []
        self.slow_thread = slow_thread
        self.reached = threading.Event()
        self.release = threading.Event()
        super().__init__(name, image, owned=True, rules=[])

    @property  # type: ignore[override]
    def write_hooks(self) -> list[WriteHook]:
        hooks = self._hooks
        if threading.current_thread().name == self.slow_thread and not self.release.is_set():
            self.reached.set()
            self.release.wait()
        return hooks

    @write_hooks.setter
    def write_hooks(self, hooks: list[WriteHook]) -> None:
        self._hooks = hooks


class CountingLock:
    """A lock that counts the threads blocked on it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.waiting = 0

    def __enter__(self) -> None:
        if not self._lock.acquire(blocking=False):
            self.waiting += 1
            self._lock.acquire()
            self.waiting -= 1

    def __exit__(self, *exc: object) -> None:
        self._lock.release()


def test_a_job_ending_while_another_starts_on_its_source_keeps_the_new_hook(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Job 1 ends (its thread rewrites the source's hook list without its hook) while job 2
    starts on the same source (the monitor adds its hook): neither may write back a list
    read before the other's change, or job 2's snapshot goes unguarded."""
    disk = MemoryNode("disk", SIZE)
    disk.write(0, OLD * SIZE)
    src = SlowHooksNode("src", disk, slow_thread="detacher")
    first = CopyBeforeWrite(src, OverlayNode("t1", SIZE), unit=UNIT)
    first.attach()
    lock = CountingLock()
    monkeypatch.setattr(cbw_module, "_hooks_lock", lock, raising=False)
    detacher = threading.Thread(target=first.detach, name="detacher", daemon=True)
    detacher.start()
    assert src.reached.wait(10)  # job 1 has read the list and not yet stored the new one
    snap = OverlayNode("snap", SIZE, backing=src)
    second = CopyBeforeWrite(src, snap, unit=UNIT)
    attacher = Worker(second.attach)
    wait_until(lambda: not attacher.is_alive() or lock.waiting == 1, what="job 2's attach")
    src.release.set()
    detacher.join(10)
    assert not detacher.is_alive()
    attacher.finish()
    assert src.write_hooks == [second._hook]
    src.write(0, NEW * 10)
    assert snap.read(0, 10) == OLD * 10
