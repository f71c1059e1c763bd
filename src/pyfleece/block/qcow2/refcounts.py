"""qcow2 host cluster management: the refcount table, refcount blocks, allocation and growth
(qemu-docs-interop-qcow2.rst, "Host cluster management").

Everything here runs under the owning node's metadata lock.

Invariants kept:
- a cluster is handed out only when its refcount is 0, and its refcount is 1 before the
  caller may write to it or reference it;
- the in-memory refcounts are never below what any table on disk references: the owner
  applies a decrement only once the reference it drops is durably gone. So writing a refcount
  block (or all of them) is safe at any instant, which is what lets eviction write them;
- a refcount block is written before the refcount table entry that points to it (with a
  sync in between), and a grown refcount table is complete and synced before the header
  points to it, so every prefix of the writes leaves a consistent image (leaks allowed);
- new refcount blocks are placed in the region they describe and count themselves; a grown
  table and the blocks it needs go together at the end of the file and count themselves.
"""

from __future__ import annotations

import errno
import struct
from array import array
from collections.abc import Callable

from pyfleece.block.node import Node
from pyfleece.block.qcow2.format import MAX_REFCOUNT_TABLE_BYTES, REFT_RESERVED, Header
from pyfleece.block.qcow2.tables import LRU, OffsetSet, RefBlock, array_be, be_array
from pyfleece.errors import BlockError, CorruptImage

# Header bytes 48..59: refcount_table_offset u64 | refcount_table_clusters u32
REFTABLE_FIELDS = struct.Struct(">QI")
REFTABLE_FIELDS_AT = 48


class Refcounts:
    """Refcounts of one image's host clusters."""

    def __init__(
        self,
        file: Node,
        header: Header,
        *,
        cache_bytes: int,
        protected: list[tuple[int, int]],
        live: Callable[[int, int], int | None] = lambda start, end: None,
    ) -> None:
        self.file = file
        self.cluster_bits = header.cluster_bits
        self.cluster_size = cs = header.cluster_size
        self.order = header.refcount_order
        self.epb_bits = header.cluster_bits + 3 - header.refcount_order
        self.table_offset = header.refcount_table_offset
        self.table_clusters = header.refcount_table_clusters
        raw = bytearray(self.table_clusters * cs)
        file.readinto(self.table_offset, memoryview(raw))
        self.table = be_array("Q", raw)
        self.table_dirty: set[int] = set()
        self.blocks: LRU[int, RefBlock] = LRU()
        self.capacity = max(8, cache_bytes // cs)
        #: Clusters below this are known to be in use (a search hint).
        self.free_hint = 0
        #: One past the highest cluster we know of (the file's end, or an allocation).
        self.top = -(-file.size // cs)
        #: Fixed metadata (header, L1 table, ...) as byte ranges: never handed out.
        self.protected = list(protected)
        #: Where live metadata the owner knows of (L2 tables) lies in [start, end), if any.
        self.live = live
        self.block_offsets = OffsetSet(e for e in self.table if e and not e & REFT_RESERVED)

    # -- lookups ------------------------------------------------------------------------------

    def _block(self, index: int) -> RefBlock | None:
        """The refcount block of table entry ``index``, loaded if needed; None if absent."""
        if index >= len(self.table):
            return None
        entry = self.table[index]
        if entry & REFT_RESERVED:
            raise CorruptImage(f"qcow2: reserved bits set in refcount table entry {index}")
        if entry == 0:
            return None
        block = self.blocks.get(index)
        if block is not None:
            return block
        cs = self.cluster_size
        if entry % cs or entry + cs > self.file.size:
            raise CorruptImage(
                f"qcow2: refcount block {index} at {entry:#x} is unaligned or past the end "
                f"of the file"
            )
        data = bytearray(cs)
        self.file.readinto(entry, memoryview(data))
        block = RefBlock(entry, self.order, data)
        self.blocks.put(index, block)
        return block

    def get(self, cluster: int) -> int:
        """The refcount of host cluster number ``cluster``."""
        block = self._block(cluster >> self.epb_bits)
        if block is None:
            return 0
        return block.get(cluster & ((1 << self.epb_bits) - 1))

    def dirty(self) -> bool:
        return bool(self.table_dirty) or any(b.dirty for b in self.blocks.values())

    # -- allocation ---------------------------------------------------------------------------

    def alloc(self, count: int) -> tuple[int, int]:
        """Allocates up to ``count`` contiguous free clusters with refcount 1.

        Returns:
            (first cluster number, how many): at least one, possibly fewer than asked.

        Raises:
            CorruptImage: the refcounts claim metadata is free.
            BlockError: the refcount table cannot grow any further.
        """
        self._trim()
        epb = 1 << self.epb_bits
        cluster = self.free_hint
        while True:
            index = cluster >> self.epb_bits
            block = self._block(index)
            if block is None:
                self._create_block(index)
                continue
            base = index << self.epb_bits
            at = block.next_free(cluster - base, epb)
            if at < 0:
                cluster = base + epb
                continue
            run = block.free_run(at, min(epb, at + count))
            first = base + at
            self._check_unprotected(first, run)
            block.add(at, at + run, 1)
            self.free_hint = first + run
            self.top = max(self.top, first + run)
            return first, run

    def release(self, first: int, count: int) -> None:
        """Drops one reference from each cluster in [first, first + count).

        Raises:
            CorruptImage: a refcount is already 0.
        """
        epb = 1 << self.epb_bits
        end = first + count
        while first < end:
            index, at = first >> self.epb_bits, first & (epb - 1)
            stop = min(epb, at + end - first)
            block = self._block(index)
            if block is None:
                raise CorruptImage(f"qcow2: refcount of cluster {first} would drop below 0")
            try:
                low = block.add(at, stop, -1)
            except CorruptImage as err:
                raise CorruptImage(
                    f"qcow2: a refcount in clusters {first}..{first + stop - at - 1} "
                    "would drop below 0"
                ) from err
            if low == 0:
                self.free_hint = min(self.free_hint, first)
            first += stop - at

    def _check_unprotected(self, first: int, count: int) -> None:
        """Refuses to hand out clusters holding live metadata, whatever the refcounts say
        (QEMU's "cached" overlap checks): the refcounts of a damaged image must not make
        us overwrite its tables."""
        start = first << self.cluster_bits
        end = (first + count) << self.cluster_bits
        ranges = [*self.protected, (self.table_offset, self.table_clusters * self.cluster_size)]
        hit = next((off for off, n in ranges if off < end and start < off + n), None)
        if hit is None:
            hit = self.block_offsets.first_in(start, end)
        if hit is None:
            hit = self.live(start, end)
        if hit is not None:
            raise CorruptImage(
                f"qcow2: refcounts mark metadata at {hit:#x} as free; "
                "repair the image with 'qemu-img check -r all'"
            )

    def _create_block(self, index: int) -> None:
        """Gives region ``index`` a refcount block placed at its own first cluster."""
        if index >= len(self.table):
            self._grow_table(index)
            return
        base = index << self.epb_bits
        self._check_unprotected(base, 1)
        offset = base << self.cluster_bits
        block = RefBlock(offset, self.order, bytes(self.cluster_size))
        block.set(0, 1)
        self.blocks.put(index, block)
        self.block_offsets.add(offset)
        self.table[index] = offset
        self.table_dirty.add(index)
        self.top = max(self.top, base + 1)

    def _grow_table(self, need: int) -> None:
        """Moves the refcount table to a larger one at the end of the file."""
        start, blocks, clusters = self._plan_growth(need)
        cs = self.cluster_size
        new = array("Q", self.table)
        new.extend(bytes(clusters * cs // 8 - len(new)))
        made: dict[int, RefBlock] = {}
        for i, region in enumerate(blocks):
            offset = (start + i) * cs
            made[region] = RefBlock(offset, self.order, bytes(cs))
            new[region] = offset
        mask = (1 << self.epb_bits) - 1
        for cluster in range(start, start + len(blocks) + clusters):
            region = cluster >> self.epb_bits
            block = made.get(region) or self._block(region)
            if block is None:
                raise CorruptImage(f"qcow2: no refcount block for cluster {cluster}")
            block.set(cluster & mask, block.get(cluster & mask) + 1)
        table_at = (start + len(blocks)) * cs
        for region, block in made.items():
            self.blocks.put(region, block)
            self.block_offsets.add(block.offset)
        self._write_blocks()
        self.file.write(table_at, array_be(new))
        self.file.flush()
        self.file.write(REFTABLE_FIELDS_AT, REFTABLE_FIELDS.pack(table_at, clusters))
        self.file.flush()
        old_first, old_count = self.table_offset >> self.cluster_bits, self.table_clusters
        self.table, self.table_offset, self.table_clusters = new, table_at, clusters
        self.table_dirty.clear()
        self.top = max(self.top, start + len(blocks) + clusters)
        self.release(old_first, old_count)

    def _plan_growth(self, need: int) -> tuple[int, list[int], int]:
        """Where a grown table goes: (first cluster, regions needing new blocks, table size)."""
        old, cs = self.table, self.cluster_size
        start = self.top
        while True:
            blocks: list[int] = []
            clusters = 0
            while True:
                end = start + len(blocks) + clusters
                low, high = start >> self.epb_bits, max(end - 1, start) >> self.epb_bits
                missing = [r for r in range(low, high + 1) if r >= len(old) or old[r] == 0]
                entries = max(need + 1, high + 1, len(old) + len(old) // 2)
                size = -(-entries * 8 // cs)
                if (missing, size) == (blocks, clusters):
                    break
                blocks, clusters = missing, size
            if clusters * cs > MAX_REFCOUNT_TABLE_BYTES:
                raise BlockError(errno.EFBIG, "qcow2: the refcount table cannot grow any further")
            taken = self._first_used(start, start + len(blocks) + clusters)
            if taken < 0:
                return start, blocks, clusters
            start = taken + 1

    def _first_used(self, first: int, end: int) -> int:
        for cluster in range(first, end):
            if self.get(cluster):
                return cluster
        return -1

    # -- write back ---------------------------------------------------------------------------

    def write_dirty(self) -> bool:
        """Writes dirty refcount blocks, then (after a sync) new refcount table entries.

        Returns:
            Whether anything was written.
        """
        wrote = self._write_blocks()
        if not self.table_dirty:
            return wrote
        # The new blocks (written now or by an eviction) must be durable first.
        self.file.flush()
        indexes = sorted(self.table_dirty)
        run_start = prev = indexes[0]
        for index in [*indexes[1:], -1]:
            if index == prev + 1:
                prev = index
                continue
            values = self.table[run_start : prev + 1]
            self.file.write(self.table_offset + 8 * run_start, array_be(values))
            run_start = prev = index
        self.table_dirty.clear()
        return True

    def _write_blocks(self) -> bool:
        wrote = False
        for block in sorted(self.blocks.values(), key=lambda b: b.offset):
            if block.dirty:
                self.file.write(block.offset, block.to_bytes())
                block.dirty = False
                wrote = True
        return wrote

    def _trim(self) -> None:
        """Evicts least recently used blocks beyond the cache's capacity (dirty ones are
        written first, which the invariant above allows)."""
        excess = len(self.blocks) - self.capacity
        if excess <= 0:
            return
        for index, block in self.blocks.oldest():
            if excess <= 0:
                break
            if block.dirty:
                self.file.write(block.offset, block.to_bytes())
                block.dirty = False
            self.blocks.pop(index)
            excess -= 1
