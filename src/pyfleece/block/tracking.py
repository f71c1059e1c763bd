"""In-flight request tracking, one tracker per node.

Every I/O request a node serves is registered here for its lifetime, so that one request can
wait for the overlapping requests that started before it (QEMU's "serialising requests").
qcow2 uses it to keep a cluster it frees from being reused under a read in flight; the
copy-before-write layer builds its own cluster locks on top of the same idea.

Cost matters: this sits on every request of the data path, so ``begin``/``end`` are one lock
round-trip each, and waiters are only woken when someone is waiting.
"""

from __future__ import annotations

import threading
from enum import Enum


class ReqKind(Enum):
    READ = "read"
    WRITE = "write"
    ZERO = "write-zeroes"
    DISCARD = "discard"
    FLUSH = "flush"


class TrackedRequest:
    """One request in flight on a node; ``seq`` orders requests by start.

    A plain class, not a dataclass: importing ``dataclasses`` (and ``inspect`` with it)
    costs every short-lived command milliseconds, and every node needs this module.
    """

    __slots__ = ("done", "kind", "length", "offset", "seq", "thread")

    def __init__(self, seq: int, offset: int, length: int, kind: ReqKind) -> None:
        self.seq = seq
        self.offset = offset
        self.length = length
        self.kind = kind
        self.done = False
        #: The thread serving the request (``threading.get_ident``): a write hook, which
        #: runs in that thread, finds its own request by it.
        self.thread = threading.get_ident()

    def __repr__(self) -> str:
        return (
            f"TrackedRequest(seq={self.seq}, offset={self.offset}, length={self.length}, "
            f"kind={self.kind}, done={self.done})"
        )

    def overlaps(self, offset: int, length: int) -> bool:
        return self.offset < offset + length and offset < self.offset + self.length


class RequestTracker:
    """The set of requests in flight on one node."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._inflight: dict[int, TrackedRequest] = {}
        self._seq = 0
        self._waiters = 0

    def begin(self, offset: int, length: int, kind: ReqKind) -> TrackedRequest:
        with self._cond:
            self._seq += 1
            req = TrackedRequest(self._seq, offset, length, kind)
            self._inflight[req.seq] = req
            return req

    def end(self, req: TrackedRequest) -> None:
        with self._cond:
            req.done = True
            del self._inflight[req.seq]
            if self._waiters:
                self._cond.notify_all()

    def in_flight(self) -> list[TrackedRequest]:
        """A snapshot of the requests in flight, oldest first."""
        with self._cond:
            return sorted(self._inflight.values(), key=lambda r: r.seq)

    def current(self, kinds: frozenset[ReqKind]) -> TrackedRequest | None:
        """The request of one of ``kinds`` the calling thread has in flight here, if any
        (a thread serves one write of a node at a time)."""
        me = threading.get_ident()
        with self._cond:
            for req in self._inflight.values():
                if req.thread == me and req.kind in kinds:
                    return req
        return None

    def wait_overlapping(
        self,
        offset: int,
        length: int,
        *,
        before: TrackedRequest | None = None,
        kinds: frozenset[ReqKind] | None = None,
        timeout: float | None = None,
    ) -> bool:
        """Waits until no request overlapping [offset, offset+length) is in flight.

        Args:
            before: only wait for requests that started before this one (and never for it).
            kinds: only wait for requests of these kinds.
            timeout: give up after this many seconds.

        Returns:
            True when no overlapping request remains, False on timeout.
        """

        def blocking() -> bool:
            limit = before.seq if before is not None else None
            for req in self._inflight.values():
                if limit is not None and req.seq >= limit:
                    continue
                if kinds is not None and req.kind not in kinds:
                    continue
                if req.overlaps(offset, length):
                    return True
            return False

        with self._cond:
            self._waiters += 1
            try:
                return self._cond.wait_for(lambda: not blocking(), timeout)
            finally:
                self._waiters -= 1

    def drain(self, timeout: float | None = None) -> bool:
        """Waits until no request at all is in flight."""
        with self._cond:
            self._waiters += 1
            try:
                return self._cond.wait_for(lambda: not self._inflight, timeout)
            finally:
                self._waiters -= 1
