"""The qcow2 write paths: write, write-zeroes and discard, with QEMU 7.2's semantics.

- write: clusters mapped plainly with OFLAG_COPIED are written in place; any other cluster
  gets a new host cluster (contiguous with its neighbours where possible), filled with the
  write's data and, around it, the cluster's old contents (from the backing file, a
  compressed or shared cluster, or zeros). The L2 entry changes only once the data is
  written, and the old reference is dropped afterwards. A guest cluster being allocated is
  *busy*: any other request that would change its L2 entry waits, so two writers never
  both allocate it and neither's data is lost.
- write-zeroes on v3: whole clusters become zero clusters (keeping their host cluster
  unless ``may_unmap``; compressed clusters are always released); a partial cluster is
  zeroed whole when the rest of it already reads as zeros and it holds no data, and written
  with explicit zeros otherwise. v2 has no zero flag: without a backing file zeroing
  deallocates, with one it writes explicit zeros.
- discard (whole clusters only, or the partial last one): v3 turns allocated clusters, and
  every cluster when there is a backing file, into zero clusters, so the backing never
  shows through; v2 deallocates without a backing file and ignores discards with one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from pyfleece.block.qcow2 import bitmaps
from pyfleece.block.qcow2.core import Qcow2Core
from pyfleece.block.qcow2.format import (
    OFFSET_MASK,
    OFLAG_COPIED,
    OFLAG_ZERO,
    Cluster,
    l2_host,
    l2_kind,
)
from pyfleece.block.qcow2.refcounts import Refcounts

#: old L2 entry -> (new entry, whether the old entry's clusters are released)
Rule = Callable[[int], tuple[int, bool]]

_ALLOCATED = (Cluster.NORMAL, Cluster.ZERO_ALLOC, Cluster.COMPRESSED)
_READS_ZERO_OR_BELOW = (Cluster.UNALLOCATED, Cluster.ZERO_PLAIN, Cluster.ZERO_ALLOC)
_CONCAT_LIMIT = 1 << 20


class _InPlace(NamedTuple):
    host: int  # host offset of the first cluster
    clusters: int


class _Alloc(NamedTuple):
    first: int  # first guest cluster
    clusters: int
    host: int  # host offset of the first new cluster
    reuse: bool  # the host cluster is the old entry's own (a zero cluster with one)
    old: list[int]  # the old L2 entries


def _in_place(entry: int) -> bool:
    return entry & OFLAG_COPIED != 0 and l2_kind(entry) == Cluster.NORMAL


class Qcow2Writer(Qcow2Core):
    """Adds the write paths to the qcow2 node."""

    _prepared = False

    def _rc(self) -> Refcounts:
        if self.rc is None:  # the Node base class refuses writes to read-only nodes
            raise RuntimeError("write to a read-only qcow2 node")
        return self.rc

    def _prepare(self) -> None:
        """Before the first change: clear unknown autoclear bits, mark bitmaps in use."""
        if self._prepared:
            return
        with self._flush_lock:
            if not self._prepared:
                self.header = bitmaps.prepare_for_writes(self.file, self.header)
                self._prepared = True

    def _finish(self, fua: bool) -> None:
        if fua or self.map.needs_writeback():
            self._writeback()

    # -- write ----------------------------------------------------------------------------------

    def _write(self, offset: int, data: memoryview, fua: bool) -> None:
        with self._errors():
            self._prepare()
            self._write_data(offset, data)
            self._finish(fua)

    def _write_data(self, offset: int, data: memoryview) -> None:
        done = 0
        while done < len(data):
            done += self._write_step(offset + done, data[done:])

    def _write_step(self, offset: int, data: memoryview) -> int:
        """Writes a prefix of ``data`` that lies in one L2 table; returns its length."""
        cb, cs = self.cluster_bits, self.cluster_size
        cluster = offset >> cb
        per_table = 1 << self.l2_bits
        l1_index, l2_index = cluster >> self.l2_bits, cluster & (per_table - 1)
        last = (offset + len(data) - 1) >> cb
        count = min(last - cluster + 1, per_table - l2_index)
        with self._lock:
            plan = self._plan_write(l1_index, l2_index, count)
        run_end = (cluster + plan.clusters) << cb
        n = min(len(data), run_end - offset)
        if isinstance(plan, _InPlace):
            self.file.write(plan.host + (offset & (cs - 1)), data[:n])
            return n
        self._allocating_write(plan, offset, data[:n])
        return n

    def _plan_write(self, l1_index: int, l2_index: int, count: int) -> _InPlace | _Alloc:
        """Decides how the next clusters are written (under _lock); may wait for others."""
        cb = self.cluster_bits
        first = (l1_index << self.l2_bits) + l2_index
        while True:
            self.map.trim()
            table = self.map.table(l1_index)
            entries = list(table.entries[l2_index : l2_index + count]) if table else [0] * count
            if _in_place(entries[0]):
                host = l2_host(entries[0], cb)
                n = 1
                while (
                    n < count
                    and _in_place(entries[n])
                    and entries[n] & OFFSET_MASK == host + (n << cb)
                ):
                    n += 1
                return _InPlace(host, n)
            n = 1
            while n < count and not _in_place(entries[n]):
                n += 1
            if self._busy and any(c in self._busy for c in range(first, first + n)):
                self._cond.wait()
                continue
            if table is None or not self.map.l1[l1_index] & OFLAG_COPIED:
                self.map.writable(l1_index, self._rc(), self._free_later)
                continue
            return self._reserve(first, entries[:n])

    def _reserve(self, first: int, old: list[int]) -> _Alloc:
        entry = old[0]
        if l2_kind(entry) == Cluster.ZERO_ALLOC and entry & OFLAG_COPIED:
            host, count, reuse = l2_host(entry, self.cluster_bits), 1, True
        else:
            start, count = self._rc().alloc(len(old))
            host, reuse = start << self.cluster_bits, False
        self._busy.update(range(first, first + count))
        return _Alloc(first, count, host, reuse, list(old[:count]))

    def _allocating_write(self, plan: _Alloc, offset: int, data: memoryview) -> None:
        cb, cs = self.cluster_bits, self.cluster_size
        start = plan.first << cb
        end = offset + len(data)
        run_end = (plan.first + plan.clusters) << cb
        try:
            bufs: list[bytes | bytearray | memoryview] = []
            if offset > start:
                bufs.append(self._guest_bytes(plan.old[0], start, offset - start))
            bufs.append(data)
            if end < run_end:
                bufs.append(self._guest_bytes(plan.old[-1], end, run_end - end))
            self._write_host(plan.host, bufs)
        except BaseException:
            with self._lock:
                self._abandon(plan)
            raise
        with self._lock:
            try:
                # The table may have left the cache since the plan: reloading it can fail.
                table = self.map.table(plan.first >> self.l2_bits)
                if table is None:
                    raise RuntimeError("qcow2: L2 table vanished during an allocating write")
            except BaseException:
                self._abandon(plan)
                raise
            l2_index = plan.first & ((1 << self.l2_bits) - 1)
            mark = self._grace_mark()
            for i, old in enumerate(plan.old):
                table.entries[l2_index + i] = (plan.host + i * cs) | OFLAG_COPIED
                if not plan.reuse:
                    self._drop_entry(old, mark)
            self.map.changed(table)
            self._busy.difference_update(range(plan.first, plan.first + plan.clusters))
            self._cond.notify_all()

    def _abandon(self, plan: _Alloc) -> None:
        """An allocating write failed before its L2 entries changed (under _lock): the new
        host clusters, referenced by no table, are released, and the guest clusters stop
        being busy, or every later request to them would wait for ever."""
        self._busy.difference_update(range(plan.first, plan.first + plan.clusters))
        self._cond.notify_all()
        if not plan.reuse:
            self._rc().release(plan.host >> self.cluster_bits, plan.clusters)

    def _write_host(self, host: int, bufs: list[bytes | bytearray | memoryview]) -> None:
        total = sum(len(b) for b in bufs)
        if len(bufs) > 1 and total <= _CONCAT_LIMIT:
            self.file.write(host, b"".join(bufs))
            return
        for buf in bufs:
            self.file.write(host, buf)
            host += len(buf)

    # -- write-zeroes ---------------------------------------------------------------------------

    def _write_zeroes(self, offset: int, length: int, may_unmap: bool, fua: bool) -> None:
        with self._errors():
            self._prepare()
            cs, size, end = self.cluster_size, self.size, offset + length
            while offset < end:
                start = offset & ~(cs - 1)
                if offset == start and (end >= start + cs or end == size):
                    body_end = end if end == size else end & ~(cs - 1)
                    self._zero_clusters(offset, body_end - offset, may_unmap)
                    offset = body_end
                else:
                    piece_end = min(end, start + cs)
                    self._zero_partial(offset, piece_end - offset, may_unmap)
                    offset = piece_end
            self._finish(fua)

    def _zero_partial(self, offset: int, length: int, may_unmap: bool) -> None:
        """Zeroes part of one cluster: the whole cluster if that changes nothing else."""
        start = offset & ~(self.cluster_size - 1)
        end = min(start + self.cluster_size, self.size)
        if (
            self._zero_flag_usable()
            and self._reads_zero(start, offset - start)
            and self._reads_zero(offset + length, end - offset - length)
            and self._zero_clusters(start, end - start, may_unmap, only=_READS_ZERO_OR_BELOW)
        ):
            return
        zeros = bytearray(length)
        self._write_data(offset, memoryview(zeros))

    def _zero_flag_usable(self) -> bool:
        return self.header.version >= 3 or self.child("backing") is None

    def _reads_zero(self, offset: int, length: int) -> bool:
        return all(ext.zero for ext in self.extents(offset, length)) if length else True

    def _zero_clusters(
        self,
        offset: int,
        length: int,
        may_unmap: bool,
        only: tuple[Cluster, ...] | None = None,
    ) -> bool:
        """Zeroes whole clusters; with ``only``, changes nothing unless every cluster is of
        those kinds and returns whether it did it."""
        if self.header.version < 3:
            if self.child("backing") is not None:
                if only is not None:
                    return False
                self._explicit_zeroes(offset, length)
                return True
            return self._rewrite(offset, length, _deallocate, only)

        def rule(entry: int) -> tuple[int, bool]:
            kind = l2_kind(entry)
            unmap = kind == Cluster.COMPRESSED or (may_unmap and kind in _ALLOCATED)
            return (0 if unmap else entry) | OFLAG_ZERO, unmap

        return self._rewrite(offset, length, rule, only)

    def _explicit_zeroes(self, offset: int, length: int) -> None:
        chunk = bytearray(min(length, 1 << 20))
        end = offset + length
        while offset < end:
            n = min(len(chunk), end - offset)
            self._write_data(offset, memoryview(chunk)[:n])
            offset += n

    # -- discard --------------------------------------------------------------------------------

    def _discard(self, offset: int, length: int) -> None:
        cs, size = self.cluster_size, self.size
        end = offset + length
        start = -(-offset // cs) * cs
        stop = size if end == size else end & ~(cs - 1)
        if start >= stop:
            return
        has_backing = self.child("backing") is not None
        if self.header.version < 3 and has_backing:
            return  # v2 cannot keep the backing file from showing through
        with self._errors():
            self._prepare()
            if self.header.version < 3:
                self._rewrite(start, stop - start, _deallocate)
            else:

                def rule(entry: int) -> tuple[int, bool]:
                    allocated = l2_kind(entry) in _ALLOCATED
                    if allocated or has_backing:
                        return OFLAG_ZERO, allocated
                    return entry, False

                self._rewrite(start, stop - start, rule)
            self._finish(False)

    # -- rewriting L2 entries -------------------------------------------------------------------

    def _rewrite(
        self,
        offset: int,
        length: int,
        rule: Rule,
        only: tuple[Cluster, ...] | None = None,
    ) -> bool:
        """Applies ``rule`` to the L2 entry of every cluster in the range (cluster aligned,
        or ending at the image's end), one L2 table at a time."""
        per_table = 1 << self.l2_bits
        cluster = offset >> self.cluster_bits
        last = -(-(offset + length) >> self.cluster_bits)
        while cluster < last:
            l2_index = cluster & (per_table - 1)
            count = min(last - cluster, per_table - l2_index)
            with self._lock:
                if not self._rewrite_table(cluster, count, rule, only):
                    return False
            cluster += count
            if self.map.needs_writeback():
                self._writeback()
        return True

    def _rewrite_table(
        self, first: int, count: int, rule: Rule, only: tuple[Cluster, ...] | None
    ) -> bool:
        l1_index, l2_index = first >> self.l2_bits, first & ((1 << self.l2_bits) - 1)
        while self._busy and any(c in self._busy for c in range(first, first + count)):
            self._cond.wait()
        self.map.trim()
        table = self.map.table(l1_index)
        old = list(table.entries[l2_index : l2_index + count]) if table else [0] * count
        if only is not None and any(l2_kind(e) not in only for e in old):
            return False
        if all(rule(e)[0] == e for e in old):
            return True
        table = self.map.writable(l1_index, self._rc(), self._free_later)
        mark = self._grace_mark()
        for i in range(count):
            entry = table.entries[l2_index + i]
            new, release = rule(entry)
            if new != entry:
                table.entries[l2_index + i] = new
                if release:
                    self._drop_entry(entry, mark)
        self.map.changed(table)
        return True


def _deallocate(entry: int) -> tuple[int, bool]:
    """v2 zeroing and discard without a backing file: unallocated reads as zeros."""
    if l2_kind(entry) in _ALLOCATED:
        return 0, True
    return entry, False
