"""The active L1 table and the L2 table cache (qemu-docs-interop-qcow2.rst, "Cluster mapping").

Everything here runs under the owning node's metadata lock, except writing a ``Snapshot``
out, which the owner does with its flush lock only.

Invariants kept:
- a table is only changed once it is *writable*: its L1 entry has OFLAG_COPIED (refcount
  1). Writable tables come from a fresh allocation or from copying a shared table, whose
  entries then get OFLAG_COPIED exactly where the cluster's refcount is 1;
- dirty tables stay cached until written; the L1 table is always in memory;
- a snapshot holds the dirty L2 tables and L1 entries as they were at one instant; the
  owner writes the tables, syncs, then writes the L1 entries, so an L1 entry never points to
  an L2 table that is not on disk.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable

from pyfleece.block.node import Node
from pyfleece.block.qcow2.format import (
    L1_RESERVED,
    OFFSET_MASK,
    OFLAG_COPIED,
    Cluster,
    Header,
    l2_kind,
)
from pyfleece.block.qcow2.refcounts import Refcounts
from pyfleece.block.qcow2.tables import LRU, OffsetSet, Table, array_be, be_array
from pyfleece.errors import CorruptImage

#: Called with (first host cluster, count) when a reference is dropped from the tables.
FreeFn = Callable[[int, int], None]


class Snapshot:
    """Dirty metadata copied at one instant, to be written in order."""

    def __init__(
        self,
        tables: list[tuple[Table, int, bytes]] | None = None,
        l1: list[tuple[int, bytes]] | None = None,
    ) -> None:
        self.tables = [] if tables is None else tables
        self.l1 = [] if l1 is None else l1

    def __bool__(self) -> bool:
        return bool(self.tables or self.l1)


class Mapping:
    """Guest cluster -> L2 entry, through the L1 table and cached L2 tables."""

    def __init__(self, file: Node, header: Header, *, cache_bytes: int) -> None:
        self.file = file
        self.cluster_bits = header.cluster_bits
        self.cluster_size = cs = header.cluster_size
        self.l2_bits = header.cluster_bits - 3
        self.l1_offset = header.l1_table_offset
        raw = bytearray(header.l1_size * 8)
        file.readinto(self.l1_offset, memoryview(raw))
        self.l1 = be_array("Q", raw)
        self.l1_dirty: set[int] = set()
        self.cache: LRU[int, Table] = LRU()
        self.capacity = max(16, cache_bytes // cs)
        self.dirty_tables = 0
        self._l2_offsets: OffsetSet | None = None

    # -- lookups ------------------------------------------------------------------------------

    def table(self, l1_index: int) -> Table | None:
        """The L2 table for L1 entry ``l1_index``, or None where there is none.

        Raises:
            CorruptImage: the L1 entry is malformed or points outside the file.
        """
        entry = self.l1[l1_index]
        if entry & L1_RESERVED:
            raise CorruptImage(f"qcow2: reserved bits set in L1 entry {l1_index}: {entry:#x}")
        offset = entry & OFFSET_MASK
        if offset == 0:
            return None
        table = self.cache.get(offset)
        if table is not None:
            return table
        cs = self.cluster_size
        if offset % cs or offset + cs > self.file.size:
            raise CorruptImage(
                f"qcow2: L2 table at {offset:#x} (L1 index {l1_index}) is unaligned or past "
                f"the end of the file"
            )
        data = bytearray(cs)
        self.file.readinto(offset, memoryview(data))
        table = Table(offset, be_array("Q", data))
        self.cache.put(offset, table)
        return table

    def l2_at(self, start: int, end: int) -> int | None:
        """The offset of an active L2 table in [start, end) of the file, if any."""
        if self._l2_offsets is None:
            self._l2_offsets = OffsetSet(e & OFFSET_MASK for e in self.l1 if e & OFFSET_MASK)
        return self._l2_offsets.first_in(start, end)

    def writable(self, l1_index: int, refs: Refcounts, free: FreeFn) -> Table:
        """The L2 table for ``l1_index``, allocated or copied so that it may be changed."""
        entry = self.l1[l1_index]
        old = self.table(l1_index)
        if old is not None and entry & OFLAG_COPIED:
            return old
        first, _ = refs.alloc(1)
        offset = first << self.cluster_bits
        if old is None:
            entries = array("Q", bytes(self.cluster_size))
        else:
            entries = self._copy_entries(old.entries, refs)
            free(old.offset >> self.cluster_bits, 1)
        if self._l2_offsets is not None:
            if old is not None:
                self._l2_offsets.discard(old.offset)
            self._l2_offsets.add(offset)
        table = Table(offset, entries, dirty=True)
        self.dirty_tables += 1
        self.cache.put(offset, table)
        self.l1[l1_index] = offset | OFLAG_COPIED
        self.l1_dirty.add(l1_index)
        return table

    def _copy_entries(self, entries: array[int], refs: Refcounts) -> array[int]:
        """Entries of a shared table, with OFLAG_COPIED set exactly where refcount is 1."""
        copy = array("Q", entries)
        for i, entry in enumerate(copy):
            kind = l2_kind(entry)
            if kind in (Cluster.NORMAL, Cluster.ZERO_ALLOC):
                host = (entry & OFFSET_MASK) >> self.cluster_bits
                single = refs.get(host) == 1
                copy[i] = (entry & ~OFLAG_COPIED) | (OFLAG_COPIED if single else 0)
            elif kind == Cluster.COMPRESSED:
                copy[i] = entry & ~OFLAG_COPIED
        return copy

    def changed(self, table: Table) -> None:
        """Records that ``table`` (a writable table) was changed."""
        if not table.dirty:
            self.dirty_tables += 1
        table.touch()

    # -- cache and write back -----------------------------------------------------------------

    def trim(self) -> None:
        """Evicts clean tables beyond the cache's capacity, least recently used first."""
        excess = len(self.cache) - self.capacity
        if excess <= 0:
            return
        for offset, table in self.cache.oldest():
            if excess <= 0:
                break
            if not table.dirty:
                self.cache.pop(offset)
                excess -= 1

    def needs_writeback(self) -> bool:
        """Whether dirty tables fill more than half of the cache."""
        return self.dirty_tables > self.capacity // 2

    def dirty(self) -> bool:
        return bool(self.dirty_tables or self.l1_dirty)

    def snapshot(self) -> Snapshot:
        snap = Snapshot()
        if self.dirty_tables:
            for table in self.cache.values():
                if table.dirty:
                    snap.tables.append((table, table.version, array_be(table.entries)))
            snap.tables.sort(key=lambda item: item[0].offset)
        if self.l1_dirty:
            indexes = sorted(self.l1_dirty)
            self.l1_dirty.clear()
            start = prev = indexes[0]
            for index in [*indexes[1:], -1]:
                if index == prev + 1:
                    prev = index
                    continue
                data = array_be(self.l1[start : prev + 1])
                snap.l1.append((self.l1_offset + 8 * start, data))
                start = prev = index
        return snap

    def written(self, snap: Snapshot) -> None:
        """Records that a snapshot's tables reached the disk."""
        for table, version, _ in snap.tables:
            was_dirty = table.dirty
            table.written = max(table.written, version)
            if was_dirty and not table.dirty:
                self.dirty_tables -= 1

    def unwritten(self, snap: Snapshot) -> None:
        """A snapshot failed to reach the disk: its L1 entries are dirty again."""
        for offset, data in snap.l1:
            first = (offset - self.l1_offset) // 8
            self.l1_dirty.update(range(first, first + len(data) // 8))
