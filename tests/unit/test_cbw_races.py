"""Copy-before-write races, staged with the fault node's pause rules (no sleeps).

A pause rule holds one request inside the source until the test releases it, so each test
puts two threads in the exact interleaving it wants, then checks who waited for whom.
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from pyfleece.block.copy_before_write import CopyBeforeWrite
from pyfleece.block.fault import FaultNode, Rule
from pyfleece.block.memory import MemoryNode
from pyfleece.errors import BlockError
from pyfleece.events import EventBus
from pyfleece.jobs import JobManager
from tests.jobaids import Recorder, wait_until
from tests.overlay import OverlayNode

UNIT = 65536
SIZE = 16 * UNIT
OLD, NEW, NEWER = b"\x5d", b"\xab", b"\xcd"

pytestmark = pytest.mark.timeout(30)


@dataclass
class Fleece:
    disk: MemoryNode  # the bytes of the live disk
    src: FaultNode  # the node the guest writes through (hooks live here)
    snap: OverlayNode  # the snapshot target, backed by the source
    cbw: CopyBeforeWrite
    rec: Recorder


@pytest.fixture
def fleece() -> Fleece:
    bus = EventBus()
    rec = Recorder(bus)
    disk = MemoryNode("disk", SIZE)
    disk.write(0, OLD * SIZE)
    src = FaultNode("src", disk, owned=True, rules=[])
    snap = OverlayNode("snap", SIZE, backing=src)
    cbw = CopyBeforeWrite(src, snap, unit=UNIT, device="ide0-hd0", bus=bus)
    cbw.attach()
    return Fleece(disk, src, snap, cbw, rec)


class Worker(threading.Thread):
    """Runs ``fn`` once, keeping its result or exception."""

    def __init__(self, fn: Callable[[], object]) -> None:
        super().__init__(daemon=True)
        self.fn = fn
        self.result: object = None
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        try:
            self.result = self.fn()
        except BaseException as err:
            self.error = err

    def finish(self) -> object:
        self.join(10)
        assert not self.is_alive(), "worker did not finish"
        if self.error is not None:
            raise self.error
        return self.result


def hold_first_read(src: FaultNode, offset: int = 0) -> tuple[Rule, threading.Event]:
    release = threading.Event()
    rule = src.add_rule(Rule("read", offset=offset, length=UNIT, pause=release))
    return rule, release


def test_snapshot_read_in_flight_blocks_the_copy(fleece: Fleece) -> None:
    rule, release = hold_first_read(fleece.src)
    reader = Worker(lambda: fleece.snap.read(0, 4096))
    assert rule.reached.wait(10)  # the reader is inside the source, holding unit 0 shared
    writer = Worker(lambda: fleece.src.write(0, NEW * 4096))
    wait_until(lambda: fleece.cbw.waiting_claims == 1 or not writer.is_alive(), what="writer")
    assert writer.is_alive() and fleece.cbw.is_claimed(0) and not fleece.cbw.is_copied(0)
    assert fleece.snap.writes[0] == 0 and fleece.disk.read(0, 4096) == OLD * 4096
    release.set()
    assert reader.finish() == OLD * 4096
    writer.finish()
    assert fleece.disk.read(0, 4096) == NEW * 4096
    assert fleece.snap.read(0, UNIT) == OLD * UNIT
    assert dict(fleece.snap.writes) == {0: 1}


def test_snapshot_read_waits_for_a_copy_in_flight(fleece: Fleece) -> None:
    rule, release = hold_first_read(fleece.src)
    writer = Worker(lambda: fleece.src.write(4096, NEW * 100))
    assert rule.reached.wait(10)  # the copy's read of unit 0 is held: unit 0 is claimed
    reader = Worker(lambda: fleece.snap.read(0, 2 * UNIT))
    wait_until(lambda: fleece.cbw.waiting_readers == 1 or not reader.is_alive(), what="reader")
    assert reader.is_alive()
    release.set()
    writer.finish()
    assert reader.finish() == OLD * 2 * UNIT


def test_two_writers_of_one_unit_copy_it_once(fleece: Fleece) -> None:
    rule, release = hold_first_read(fleece.src, UNIT)
    first = Worker(lambda: fleece.src.write(UNIT + 10, NEW * 10))
    assert rule.reached.wait(10)  # the first writer's copy is in flight
    second = Worker(lambda: fleece.src.write(2 * UNIT - 10, NEWER * 20))  # crosses into unit 2
    wait_until(lambda: fleece.cbw.waiting_claims == 1 or not second.is_alive(), what="second")
    assert second.is_alive()
    release.set()
    first.finish()
    second.finish()
    assert dict(fleece.snap.writes) == {1: 1, 2: 1}
    assert fleece.cbw.units_copied == 2 and fleece.cbw.bytes_copied == 2 * UNIT
    assert fleece.snap.read(UNIT, 2 * UNIT) == OLD * 2 * UNIT
    live = fleece.disk.read(UNIT, 2 * UNIT)
    assert live[10:20] == NEW * 10 and live[UNIT - 10 : UNIT + 10] == NEWER * 20


def test_failing_copy_fails_the_guest_write_and_reports_it() -> None:
    bus = EventBus()
    rec = Recorder(bus)
    disk = MemoryNode("disk", SIZE)
    disk.write(0, OLD * SIZE)
    overlay = OverlayNode("ov", SIZE)
    target = FaultNode("snap", overlay, owned=True, rules=[Rule("write", errno.ENOSPC)])
    failures: list[BlockError] = []
    cbw = CopyBeforeWrite(disk, target, device="ide0-hd0", bus=bus, on_copy_error=failures.append)
    cbw.attach()
    with pytest.raises(BlockError) as err:
        disk.write(0, NEW * 512)
    assert err.value.errno == errno.ENOSPC
    assert disk.read(0, 512) == OLD * 512  # the guest's write never reached the disk
    assert rec.named("BLOCK_IO_ERROR") == [{
        "device": "ide0-hd0", "node-name": "disk", "operation": "write", "action": "report",
        "nospace": True, "reason": "No space left on device",
    }]  # fmt: skip
    assert [f.operation for f in failures] == ["write"] and not cbw.is_copied(0)
    disk.write(0, NEW * 512)  # the rule fired once: the retry copies, then writes
    assert cbw.is_copied(0) and overlay.read(0, UNIT) == OLD * UNIT
    assert disk.read(0, 512) == NEW * 512


@pytest.mark.parametrize("policy", ["report", "stop", "ignore"])
def test_failing_copy_under_a_job_leaves_the_job_running(policy: str) -> None:
    """The guest's write fails, so nothing the snapshot needs is lost: the job goes on
    (QEMU's break-guest-write); failing it would drop the guard under the snapshot."""
    bus = EventBus()
    rec = Recorder(bus)
    jobs = JobManager(bus, verb_timeout=10)
    disk = MemoryNode("disk", SIZE)
    disk.write(0, OLD * SIZE)
    overlay = OverlayNode("ov", SIZE, backing=disk)
    target = FaultNode("snap", overlay, owned=True, rules=[Rule("write", errno.ENOSPC)])
    jobs.start_backup(disk, target, sync="none", job_id="j0", device="ide0-hd0",
                      on_target_error=policy)  # fmt: skip
    with pytest.raises(BlockError):
        disk.write(0, NEW)
    assert rec.named("BLOCK_JOB_ERROR") == []
    assert [e["reason"] for e in rec.named("BLOCK_IO_ERROR")] == ["No space left on device"]
    info = jobs.query_block_jobs()[0]
    assert (info["status"], info["io-status"], info["offset"]) == ("running", "ok", 0)
    assert target.read(0, 512) == OLD * 512  # the snapshot still reads the old data
    disk.write(0, NEW)  # the rule fired once: this copy works
    assert jobs.query_block_jobs()[0]["offset"] == UNIT
    assert target.read(0, 512) == OLD * 512 and disk.read(0, 1) == NEW
    jobs.block_job_cancel("j0")
    assert rec.summary()[-3:] == ["BLOCK_JOB_CANCELLED", "concluded", "null"]


def test_writes_in_flight_when_the_job_starts_are_waited_for() -> None:
    disk = MemoryNode("disk", SIZE)
    release = threading.Event()
    src = FaultNode("src", disk, owned=True, rules=[])
    rule = src.add_rule(Rule("write", pause=release))
    snap = OverlayNode("snap", SIZE, backing=src)
    writer = Worker(lambda: src.write(0, NEW * 10))
    assert rule.reached.wait(10)
    cbw = CopyBeforeWrite(src, snap)
    attacher = Worker(cbw.attach)
    attacher.join(0.2)  # a bounded look: attach must still be waiting for the write
    assert attacher.is_alive()
    release.set()
    writer.finish()
    attacher.finish()
    src.write(0, NEWER * 10)
    assert snap.read(0, 10) == NEW * 10  # the snapshot holds the write that began before it


def test_job_end_waits_for_a_copy_in_flight_and_queries_still_answer() -> None:
    bus = EventBus()
    rec = Recorder(bus)
    jobs = JobManager(bus, verb_timeout=10)
    disk = MemoryNode("disk", SIZE)
    disk.write(0, OLD * SIZE)
    src = FaultNode("src", disk, owned=True, rules=[])
    snap = OverlayNode("snap", SIZE, backing=src)
    jobs.start_backup(src, snap, sync="none", job_id="j0")
    rule, release = hold_first_read(src)
    writer = Worker(lambda: src.write(0, NEW * 10))
    assert rule.reached.wait(10)  # the guest's copy is in flight
    canceller = Worker(lambda: jobs.block_job_cancel("j0"))
    rec.wait_for("JOB_STATUS_CHANGE", status="aborting")
    assert canceller.is_alive()  # the job is waiting for the copy before letting go
    assert jobs.query_block_jobs()[0]["status"] == "aborting"
    assert any("block job" in r.reason for r in snap.refs())
    release.set()
    writer.finish()
    canceller.finish()
    assert rec.named("BLOCK_JOB_CANCELLED")[0]["offset"] == UNIT
    assert [r.reason for r in snap.refs()] == []
    assert snap.read(0, UNIT) == OLD * UNIT and snap.child("backing") is src


def test_a_filter_target_guards_the_overlay_under_it() -> None:
    """The target is a fault filter over the overlay whose backing is the source: the guard
    goes under the overlay, so a snapshot read holding a unit still blocks its copy."""
    disk = MemoryNode("disk", SIZE)
    disk.write(0, OLD * SIZE)
    src = FaultNode("src", disk, owned=True, rules=[])
    overlay = OverlayNode("ov", SIZE, backing=src)
    target = FaultNode("snap", overlay, owned=True, rules=[])
    cbw = CopyBeforeWrite(src, target, unit=UNIT)
    cbw.attach()
    rule, release = hold_first_read(src)
    reader = Worker(lambda: target.read(0, 4096))
    assert rule.reached.wait(10)  # the snapshot reader is inside the source, unit 0 shared
    writer = Worker(lambda: src.write(0, NEW * 4096))
    wait_until(lambda: cbw.waiting_claims == 1 or not writer.is_alive(), what="writer")
    assert writer.is_alive() and disk.read(0, 4096) == OLD * 4096
    release.set()
    assert reader.finish() == OLD * 4096
    writer.finish()
    assert disk.read(0, 4096) == NEW * 4096 and target.read(0, UNIT) == OLD * UNIT
    assert overlay.child("backing") is cbw.guard
    cbw.detach()
    assert overlay.child("backing") is src
    assert [r.reason for r in src.refs()] == ["node is used as backing hd of 'ov'"]
