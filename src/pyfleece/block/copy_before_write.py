"""Copy-before-write: the one place the snapshot invariant's locking lives.

THE SNAPSHOT INVARIANT (DESIGN.md, invariant 1): from the moment a fleecing job starts, every
byte read from the snapshot equals the byte on the live disk at that moment, whatever the
guest does.

How it is kept:

- The disk (``source``) is cut into *units* of max(64 KiB, target cluster size), aligned.
  Each unit is *copied* (its snapshot-time bytes are on the target), *claimed* (a copy is in
  flight: the exclusive lock) or neither. ``copied`` only goes from 0 to 1.
- A guest write, write-zeroes or discard on the source runs ``_hook`` first (a write hook:
  inside the source's tracked request, before the driver). It claims every unit it touches
  that is not copied, waits until no snapshot reader holds any of them, copies them, marks
  them copied, and only then lets the guest request reach the driver. Two writers of one
  unit: the second waits for the first's claim and finds the unit copied, so a unit is copied
  at most once. A copy that fails fails the guest request (BlockError, BLOCK_IO_ERROR) and
  leaves the unit uncopied, so the next writer tries again: the snapshot is never silently
  wrong.
- Zeros are copied as explicit zeros (``write_zeroes`` without may-unmap), so the target
  allocates them and never reads through to the live disk for that unit again.
- A snapshot read that falls through the target to the live disk goes through a
  ``SnapshotGuard``, put in place of the source as the ``backing`` child of the target, or of
  the node in the target's filter chain (a fault node's ``image``...) whose backing the
  source is: every path from the target down to the source passes the guard. For each
  unit it waits until no claim is in flight, then either reads the target's own copy (unit
  copied: the target allocates it) or takes the unit's *shared* lock and reads the source,
  which cannot change meanwhile because copying (and so writing) needs the exclusive claim,
  and claiming waits for shared holders. New readers wait for a pending claim (writers
  first), so neither side starves.
- Attaching installs the guard, then the hook, then waits for the source's write requests
  that began before the hook was installed: when ``attach`` returns, the snapshot is taken.
  Those writes are part of it: their hook (if they run it) copies nothing, and a copy that
  would read a unit one of them is still writing waits for it first.
- Detaching first gives the target its source back (new snapshot reads see the live disk)
  and waits for the reads in flight through the guard, hook still installed, so a read that
  began while the snapshot stood returns snapshot bytes; only then does copying stop
  (``_claim`` claims nothing once detached, even for a hook a write already started) and
  the copies in flight finish.

Lock order: a thread never waits for anything while it holds a shared lock; a claimer takes
all its units at once, only when no other claim on them is in flight, and then waits only
for readers; so there are no cycles. Nothing sleeps to synchronise: every wait is on
``self._cond`` (or on the source's request tracker, for writes older than the snapshot,
which wait for nothing here).
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable, Iterator

from pyfleece.block.node import Extent, Node
from pyfleece.block.snapshot_guard import (
    FILTER_DRIVERS,
    SnapshotGuard,
    backed_by,
    cluster_size_of,
)
from pyfleece.block.tracking import ReqKind, TrackedRequest
from pyfleece.errors import BlockError
from pyfleece.events import EventBus

__all__ = [
    "FILTER_DRIVERS",
    "MIN_UNIT",
    "CopyBeforeWrite",
    "CopyFailed",
    "SnapshotGuard",
    "backed_by",
    "cluster_size_of",
    "unit_size",
]

#: The smallest copy unit (QEMU's block-copy granularity floor).
MIN_UNIT = 64 * 1024
#: Largest single read/write a copy issues (bounds the per-thread buffer).
MAX_PIECE = 4 * 1024 * 1024

_WRITE_KINDS = frozenset({ReqKind.WRITE, ReqKind.ZERO, ReqKind.DISCARD})
#: Guards every read-modify-write of a node's ``write_hooks``: jobs on one source start (a
#: monitor thread) and end (their own thread) independently, and a list read before the
#: other's change and stored after it would drop a hook, leaving a snapshot unguarded.
_hooks_lock = threading.Lock()
_NONE: set[int] = set()


class CopyFailed(BlockError):
    """A copy-before-write copy failed.

    Attributes:
        operation: "read" when reading the source failed, "write" when writing the target
            did (QEMU's IoOperationType, for BLOCK_JOB_ERROR).
    """

    def __init__(self, err: int, message: str, operation: str) -> None:
        super().__init__(err, message)
        self.operation = operation


def unit_size(target_cluster_size: int = 0) -> int:
    """The copy unit for a target with this cluster size: max(64 KiB, cluster size)."""
    return max(MIN_UNIT, target_cluster_size)


class CopyBeforeWrite:
    """Keeps a point-in-time copy of ``source`` on ``target`` while the guest writes.

    Args:
        source: the live disk (the node the guest writes through).
        target: where snapshot-time data is copied; same size as the source.
        unit: the copy unit (see ``unit_size``).
        device: the source's device name, for BLOCK_IO_ERROR ("" if none).
        bus: where BLOCK_IO_ERROR goes (None: no events).
        skip_unallocated: only copy units the source's top layer allocates (sync=top);
            ignored while a guard is installed, because readers then need every unit.
        on_copy_error: told about each failed guest-path copy (the job's error policy).
    """

    def __init__(
        self,
        source: Node,
        target: Node,
        *,
        unit: int = MIN_UNIT,
        device: str = "",
        bus: EventBus | None = None,
        skip_unallocated: bool = False,
        on_copy_error: Callable[[CopyFailed], None] | None = None,
    ) -> None:
        if unit < MIN_UNIT or unit & (unit - 1):
            raise ValueError(f"copy unit must be a power of two >= 64 KiB, not {unit}")
        self.source = source
        self.target = target
        self.unit = unit
        self.device = device
        self.bus = bus
        self.skip_unallocated = skip_unallocated
        self.on_copy_error = on_copy_error
        self.size = source.size
        self.units = -(-self.size // unit)
        self._cond = threading.Condition(threading.Lock())
        self._copied = bytearray(self.units)  # 1: copied (or skipped as not needed)
        self._claimed = bytearray(self.units)  # 1: a copy is in flight (exclusive)
        self._readers: dict[int, int] = {}  # unit -> shared holders
        self._local = threading.local()
        self.bytes_copied = 0
        self.bytes_skipped = 0
        self.units_copied = 0
        #: Threads blocked right now: claimers waiting for readers or other claims, and
        #: readers waiting for claims (for tests that stage races, and for debugging).
        self.waiting_claims = 0
        self.waiting_readers = 0
        self.guard: SnapshotGuard | None = None
        self._backing_owned = False
        self._attached = False  # guarded by _cond
        #: The snapshot instant: writes the source began before it are part of the snapshot.
        self._marker: TrackedRequest | None = None
        self._settled = False  # no write that began before the marker is in flight

    # -- lifecycle --------------------------------------------------------------------------

    def attach(self) -> None:
        """Takes the snapshot: guard, hook, then waits out writes that began before it.

        Those writes are part of the snapshot: their own hook runs copy nothing, and a copy
        that would read a unit one of them is still writing waits for it first.
        """
        overlay = backed_by(self.target, self.source)
        if overlay is not None:
            self._backing_owned = overlay.children["backing"].owned
            self.guard = SnapshotGuard(self, overlay)
            self.skip_unallocated = False
            overlay.attach_child("backing", self.guard, owned=True)
        with self._cond:
            self._attached = True
        with _hooks_lock:
            self.source.write_hooks = [*self.source.write_hooks, self._hook]
        tracker = self.source.tracker
        marker = tracker.begin(0, 0, ReqKind.FLUSH)
        with self._cond:
            self._marker = marker
            self._cond.notify_all()
        try:
            tracker.wait_overlapping(0, self.size, before=marker, kinds=_WRITE_KINDS)
        finally:
            tracker.end(marker)
        self._settled = True

    def detach(self) -> None:
        """Ends the snapshot: new snapshot reads go to the live disk, reads in flight
        finish (still guarded: the hook stays until they have), then copying stops and
        copies in flight finish, so the target may be deleted once this returns."""
        with self._cond:
            if not self._attached:
                return
        guard = self.guard
        if guard is not None and guard.overlay.child("backing") is guard:
            guard.overlay.attach_child("backing", self.source, owned=self._backing_owned)
            guard.tracker.drain()
        with self._cond:
            self._attached = False  # from now on ``_claim`` claims nothing
        with _hooks_lock:
            self.source.write_hooks = [h for h in self.source.write_hooks if h != self._hook]
        with self._cond:
            while self._claimed.find(1) >= 0:
                self._cond.wait()

    # -- progress ---------------------------------------------------------------------------

    @property
    def bytes_needed(self) -> int:
        """Bytes a complete copy writes: the size, less what was skipped as unallocated."""
        return self.size - self.bytes_skipped

    def is_copied(self, unit: int) -> bool:
        return bool(self._copied[unit])

    def is_claimed(self, unit: int) -> bool:
        return bool(self._claimed[unit])

    def next_uncopied(self, offset: int) -> int | None:
        """Offset of the first unit at or after ``offset`` not copied yet, or None."""
        index = self._copied.find(0, offset // self.unit)
        return None if index < 0 else index * self.unit

    # -- the guest path ---------------------------------------------------------------------

    def _hook(self, node: Node, offset: int, length: int, kind: ReqKind) -> None:
        """Before-write hook on the source: copy what the request is about to change."""
        if length <= 0 or offset >= self.size:
            return
        if not self._settled and self._before_snapshot():
            return  # part of the snapshot: ``attach`` waits for it, copies wait for it
        first = offset // self.unit
        last = min((offset + length - 1) // self.unit, self.units - 1)
        if self._copied.find(0, first, last + 1) < 0:
            return  # all copied: ``copied`` never goes back to 0, so no lock is needed
        try:
            self._copy_units(first, last)
        except CopyFailed as err:
            self._report_io_error(err)
            if self.on_copy_error is not None:
                self.on_copy_error(err)
            raise

    def _snapshot_marker(self) -> TrackedRequest | None:
        """The snapshot instant, once ``attach`` has taken it (None if detached first)."""
        with self._cond:
            while self._marker is None and self._attached:
                self._cond.wait()
            return self._marker

    def _before_snapshot(self) -> bool:
        """Whether the calling thread's write of the source began before the snapshot."""
        marker = self._snapshot_marker()
        mine = self.source.tracker.current(_WRITE_KINDS)
        return marker is not None and mine is not None and mine.seq < marker.seq

    def _wait_for_snapshot(self, first: int, last: int) -> None:
        """Waits until no write that began before the snapshot is still changing units
        [first, last] (they belong to the snapshot: a copy must see them whole)."""
        marker = self._snapshot_marker()
        if marker is None:
            return
        start, end = first * self.unit, min((last + 1) * self.unit, self.size)
        with self._cond:
            self.waiting_claims += 1
        try:
            self.source.tracker.wait_overlapping(
                start, end - start, before=marker, kinds=_WRITE_KINDS
            )
        finally:
            with self._cond:
                self.waiting_claims -= 1

    def _report_io_error(self, err: CopyFailed) -> None:
        if self.bus is None:
            return
        self.bus.emit(
            "BLOCK_IO_ERROR",
            {
                "device": self.device,
                "node-name": self.source.node_name,
                "operation": "write",
                "action": "report",
                "nospace": err.errno == errno.ENOSPC,
                "reason": os.strerror(err.errno),
            },
        )

    # -- the background path ----------------------------------------------------------------

    def copy(self, offset: int, length: int) -> int:
        """Copies every unit of the range not copied yet; returns the bytes it copied.

        Raises:
            CopyFailed: reading the source or writing the target failed.
        """
        if length <= 0 or offset >= self.size:
            return 0
        first = offset // self.unit
        last = min((offset + length - 1) // self.unit, self.units - 1)
        return self._copy_units(first, last)

    # -- claims (exclusive) -----------------------------------------------------------------

    def _copy_units(self, first: int, last: int) -> int:
        if not self._settled:
            self._wait_for_snapshot(first, last)
        mine = self._claim(first, last)
        if not mine:
            return 0
        done: list[int] = []
        copied = 0
        try:
            for run_first, run_last in _runs(mine):
                copied += self._copy_run(run_first, run_last, done)
        finally:
            self._release(mine, done)
        return copied

    def _claim(self, first: int, last: int) -> list[int]:
        """Claims the uncopied units of [first, last] all at once, when no other claim on
        them is in flight; returns them once no reader holds them. Nothing once detached.

        All at once: a claimer that held some units while it waited for another's claim
        could wait for a claimer waiting for it (after a failed copy freed a unit).
        """
        copied, claimed, readers = self._copied, self._claimed, self._readers
        with self._cond:
            while True:
                if not self._attached:
                    return []
                mine = [u for u in range(first, last + 1) if not copied[u]]
                if not any(claimed[u] for u in mine):
                    break
                self._wait_as_claimer()
            for u in mine:
                claimed[u] = 1
            while readers and any(u in readers for u in mine):
                self._wait_as_claimer()
            self._local.mine = set(mine)
            return mine

    def _wait_as_claimer(self) -> None:
        self.waiting_claims += 1
        try:
            self._cond.wait()
        finally:
            self.waiting_claims -= 1

    def _release(self, mine: list[int], done: list[int]) -> None:
        self._local.mine = _NONE
        with self._cond:
            for u in done:
                self._copied[u] = 1
            for u in mine:
                self._claimed[u] = 0
            self._cond.notify_all()

    def _copy_run(self, first: int, last: int, done: list[int]) -> int:
        """Copies units [first, last] (claimed by this thread), appending each unit it
        finishes (copied, or skipped as unallocated) to ``done``; returns bytes copied."""
        copied = 0
        if self.skip_unallocated:
            wanted = self._allocated_units(first, last)
        else:
            wanted = list(range(first, last + 1))
        for run_first, run_last in _runs(wanted):
            s = run_first * self.unit
            e = min((run_last + 1) * self.unit, self.size)
            self._copy_bytes(s, e - s)
            with self._cond:
                self.bytes_copied += e - s
                self.units_copied += run_last - run_first + 1
            copied += e - s
            done.extend(range(run_first, run_last + 1))
        skipped = sorted(set(range(first, last + 1)) - set(wanted))
        if skipped:
            nbytes = sum(min(self.unit, self.size - u * self.unit) for u in skipped)
            with self._cond:
                self.bytes_skipped += nbytes
            done.extend(skipped)
        return copied

    def _allocated_units(self, first: int, last: int) -> list[int]:
        """The units of [first, last] that the source's top layer allocates (any byte)."""
        wanted: list[int] = []
        start, end = first * self.unit, min((last + 1) * self.unit, self.size)
        for ext in self._source_extents(start, end - start):
            if not (ext.allocated and ext.depth == 0):
                continue
            lo = ext.offset // self.unit
            hi = (ext.offset + ext.length - 1) // self.unit
            for u in range(lo, hi + 1):
                if not wanted or wanted[-1] < u:
                    wanted.append(u)
        return wanted

    def _source_extents(self, offset: int, length: int) -> Iterator[Extent]:
        try:
            yield from self.source.extents(offset, length)
        except BlockError as err:
            raise CopyFailed(err.errno, f"copy-before-write: {err}", "read") from err

    def _copy_bytes(self, offset: int, length: int) -> None:
        """Copies whole units [offset, offset+length) from source to target.

        Units that read as zeros become explicit zeros on the target; the others are
        copied as data. Each target request covers whole units (so whole target clusters):
        a partial-cluster write would make the target read its backing for the rest.
        """
        unit = self.unit
        zero = self._zero_units(offset, length)
        first, last = offset // unit, (offset + length - 1) // unit
        lo = first
        for u in range(first + 1, last + 2):
            if u <= last and (u in zero) == (lo in zero):
                continue
            s, e = lo * unit, min(u * unit, self.size)
            if lo in zero:
                self._write_target(s, e - s, None)
            else:
                piece = max(unit, MAX_PIECE // unit * unit)
                for pos in range(s, e, piece):
                    n = min(piece, e - pos)
                    view = self._buffer(n)
                    try:
                        self.source.readinto(pos, view)
                    except BlockError as err:
                        raise CopyFailed(err.errno, f"copy-before-write: {err}", "read") from err
                    self._write_target(pos, n, view)
            lo = u

    def _zero_units(self, offset: int, length: int) -> set[int]:
        """The units of the range that read entirely as zeros on the source."""
        unit, zero = self.unit, set[int]()
        for ext in self._source_extents(offset, length):
            if ext.zero and not ext.data:
                lo = -(-ext.offset // unit)
                hi = (ext.offset + ext.length) // unit
                if ext.offset + ext.length >= self.size:
                    hi = self.units
                zero.update(range(lo, hi))
        return zero

    def _write_target(self, offset: int, length: int, data: memoryview | None) -> None:
        try:
            if data is None:
                self.target.write_zeroes(offset, length)
            else:
                self.target.write(offset, data)
        except BlockError as err:
            raise CopyFailed(err.errno, f"copy-before-write: {err}", "write") from err

    def _buffer(self, n: int) -> memoryview:
        buf: bytearray | None = getattr(self._local, "buf", None)
        if buf is None or len(buf) < n:
            buf = bytearray(max(n, 1 << 20))
            self._local.buf = buf
        return memoryview(buf)[:n]

    # -- shared locks (snapshot readers) ----------------------------------------------------

    def share(self, first: int, last: int) -> list[int]:
        """Waits until no claim on [first, last] is in flight, then holds the uncopied
        units shared; returns them (pass the list to ``unshare``)."""
        copied, claimed, readers = self._copied, self._claimed, self._readers
        mine: set[int] = getattr(self._local, "mine", _NONE)
        with self._cond:
            while claimed.find(1, first, last + 1) >= 0 and not all(
                u in mine for u in range(first, last + 1) if claimed[u]
            ):
                self.waiting_readers += 1
                try:
                    self._cond.wait()
                finally:
                    self.waiting_readers -= 1
            held = [u for u in range(first, last + 1) if not copied[u]]
            for u in held:
                readers[u] = readers.get(u, 0) + 1
            return held

    def unshare(self, held: list[int]) -> None:
        if not held:
            return
        with self._cond:
            wake = False
            for u in held:
                count = self._readers[u] - 1
                if count:
                    self._readers[u] = count
                else:
                    del self._readers[u]
                    wake = wake or bool(self._claimed[u])
            if wake:
                self._cond.notify_all()


def _runs(units: list[int]) -> Iterator[tuple[int, int]]:
    """Contiguous runs [first, last] of a sorted list of units."""
    if not units:
        return
    lo = prev = units[0]
    for u in units[1:]:
        if u != prev + 1:
            yield lo, prev
            lo = u
        prev = u
    yield lo, prev
