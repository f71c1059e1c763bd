"""A test-only overlay node: qcow2's allocation behaviour in memory, for fleecing tests.

Clusters written here are allocated here (data or explicit zero clusters); everything else
reads from the ``backing`` child, looked up at I/O time as the real qcow2 driver does, so a
job can swap the edge. It records every cluster it allocates or overwrites (``writes``), so
tests can check that copy-before-write copies each unit at most once. Tests written against
it use only the Node interface, so they run unchanged with a qcow2 target.
"""

from __future__ import annotations

import threading
from collections import Counter

from pyfleece.block.node import Extent, Node

_ZERO = None  # marker of an explicit zero cluster in ``_clusters``


class OverlayNode(Node):
    driver = "test-overlay"

    def __init__(
        self,
        node_name: str,
        size: int,
        *,
        cluster_size: int = 65536,
        backing: Node | None = None,
        owned: bool = False,
    ) -> None:
        super().__init__(node_name, read_only=False)
        self._size = size
        self.cluster_size = cluster_size
        self._clusters: dict[int, bytearray | None] = {}
        self._lock = threading.Lock()
        #: cluster index -> how many write/zero operations reached it
        self.writes: Counter[int] = Counter()
        if backing is not None:
            self.attach_child("backing", backing, owned=owned)

    @property
    def size(self) -> int:
        return self._size

    def allocated(self) -> dict[int, bool]:
        """cluster index -> True for data, False for an explicit zero cluster."""
        with self._lock:
            return {i: c is not None for i, c in self._clusters.items()}

    def _spans(self, offset: int, length: int) -> list[tuple[int, int, int]]:
        """(cluster index, offset within it, byte count) pieces of a range."""
        cs, out, pos, end = self.cluster_size, [], offset, offset + length
        while pos < end:
            index, within = divmod(pos, cs)
            n = min(cs - within, end - pos)
            out.append((index, within, n))
            pos += n
        return out

    def _readinto(self, offset: int, buf: memoryview) -> None:
        cs = self.cluster_size
        for index, within, n in self._spans(offset, len(buf)):
            part = buf[index * cs + within - offset :][:n]
            with self._lock:
                present = index in self._clusters
                data = self._clusters.get(index)
                if present:
                    part[:] = data[within : within + n] if data is not None else bytes(n)
            if not present:
                backing = self.child("backing")
                pos = index * cs + within
                avail = 0 if backing is None else max(0, min(n, backing.size - pos))
                if avail:
                    assert backing is not None
                    backing.readinto(pos, part[:avail])
                part[avail:] = bytes(n - avail)

    def _write(self, offset: int, data: memoryview, fua: bool) -> None:
        cs = self.cluster_size
        for index, within, n in self._spans(offset, len(data)):
            piece = data[index * cs + within - offset :][:n]
            base = None
            with self._lock:
                allocated = index in self._clusters
            if not allocated and n < cs:  # copy-on-write of a partial cluster
                base = bytearray(cs)
                backing = self.child("backing")
                if backing is not None:
                    avail = max(0, min(cs, backing.size - index * cs))
                    backing.readinto(index * cs, memoryview(base)[:avail])
            with self._lock:
                cluster = self._clusters.get(index)
                if index not in self._clusters:
                    cluster = base if base is not None else bytearray(cs)
                elif cluster is None:
                    cluster = bytearray(cs)
                assert cluster is not None
                cluster[within : within + n] = piece
                self._clusters[index] = cluster
                self.writes[index] += 1

    def _write_zeroes(self, offset: int, length: int, may_unmap: bool, fua: bool) -> None:
        for index, within, n in self._spans(offset, length):
            if n < self.cluster_size:
                self._write(index * self.cluster_size + within, memoryview(bytes(n)), fua)
                continue
            with self._lock:
                if may_unmap and self.child("backing") is None:
                    self._clusters.pop(index, None)
                else:
                    self._clusters[index] = _ZERO
                self.writes[index] += 1

    def _discard(self, offset: int, length: int) -> None:
        for index, _within, n in self._spans(offset, length):
            if n == self.cluster_size:
                with self._lock:
                    if self.child("backing") is None:
                        self._clusters.pop(index, None)
                    else:
                        self._clusters[index] = _ZERO

    def _flush(self) -> None:
        pass

    def _block_status(self, offset: int, length: int) -> Extent:
        cs = self.cluster_size
        index = offset // cs
        with self._lock:
            state = self._state(index)
            end = min(offset + length, self._size)
            nxt = (index + 1) * cs
            while nxt < end and self._state(nxt // cs) == state:
                nxt += cs
        n = min(nxt, end) - offset
        if state == "data":
            return Extent(offset, n, True, False, True, 0)
        if state == "zero":
            return Extent(offset, n, False, True, True, 0)
        backing = self.child("backing")
        if backing is None:
            return Extent(offset, n, False, True, False, 1)
        ext = backing.block_status(offset, n)
        return ext._replace(depth=ext.depth + 1)

    def _state(self, index: int) -> str:
        if index not in self._clusters:
            return "none"
        return "data" if self._clusters[index] is not None else "zero"
