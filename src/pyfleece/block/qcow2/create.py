"""Creating empty qcow2 images laid out exactly as ``qemu-img create`` 7.2 lays them out.

QEMU creates an image in steps: it writes a header cluster, a refcount table cluster and
one refcount block (the table's first entry pointing at it), opens the result, allocates
the first three clusters through its ordinary allocator, rewrites the full header, then
grows the L1 table to the image size through the same allocator, and finally records the
backing file. For small clusters and large images the L1 allocation needs more refcount
blocks, or a bigger refcount table, which the allocator places by rules of its own.

``plan_image`` replays those steps against a small in-memory model of that allocator
(``_Allocator``: free-cluster search, refcount updates that restart when a refcount block
had to be placed, refcount-table growth into a self-describing area) and returns the
writes; ``create_image`` performs them. The result is byte-identical to what qemu-img
writes, at every cluster size from 512 B to 2 MiB and every refcount width (the tests
compare the files), so ``qemu-img check`` and ``qemu-img info`` see a QEMU image.

``write_refcount_structure`` writes a whole new refcount structure for given refcounts
(first fit into unreferenced clusters, self-describing, switched in by one header write):
``check`` rebuilds broken refcounts with it and ``convert`` gives its new images theirs.

Invariants: every cluster the plan references has refcount 1; the L1 table holds only
zero entries; the file ends where QEMU's would (after the L1 table, or after the last
refcount block if the allocator placed one later).
"""

from __future__ import annotations

import os
import struct
from array import array
from collections.abc import Iterator
from typing import NamedTuple

from pyfleece.block import locking
from pyfleece.block.node import Node
from pyfleece.block.qcow2.format import (
    MAX_CLUSTER_BITS,
    MAX_L1_BYTES,
    MIN_CLUSTER_BITS,
    V2_HEADER_LENGTH,
    V3_HEADER_LENGTH_WITH_COMPRESSION,
    Compat,
    CompressionType,
    Header,
    Incompat,
    RefcountCodec,
    encode_header,
    l1_entries_needed,
)
from pyfleece.errors import ConfigError

#: QEMU's limit on the refcount table (in entries): 8 MiB of table.
MAX_REFTABLE_ENTRIES = (8 << 20) // 8

REFTABLE_AT = 48  # header bytes 48..59: refcount table offset u64 | clusters u32
V3_SUFFIX = " (use version=v3 or greater)"


class CreateOptions(NamedTuple):
    """What ``qemu-img create -f qcow2`` accepts (its ``-o`` options, already typed)."""

    size: int
    cluster_size: int = 65536
    version: int = 3
    lazy_refcounts: bool = False
    refcount_bits: int = 16
    compression_type: str = "zlib"
    backing_file: str | None = None
    backing_format: str | None = None
    extended_l2: bool = False


def validate(opts: CreateOptions) -> None:
    """Checks the options in the order QEMU does, with its messages.

    Raises:
        ConfigError: an option is invalid or conflicts with another.
    """
    cs = opts.cluster_size
    if cs < (1 << MIN_CLUSTER_BITS) or cs > (1 << MAX_CLUSTER_BITS) or cs & (cs - 1):
        raise ConfigError("Cluster size must be a power of two between 512 and 2048k")
    if opts.extended_l2:
        if cs < 16384:
            raise ConfigError(
                "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes"
            )
        raise ConfigError("pyfleece does not support extended L2 entries (extended_l2=on)")
    if opts.backing_format and not opts.backing_file:
        raise ConfigError("Backing format cannot be used without backing file")
    if opts.version < 3 and opts.lazy_refcounts:
        raise ConfigError(
            "Lazy refcounts only supported with compatibility level 1.1 and above" + V3_SUFFIX
        )
    bits = opts.refcount_bits
    if bits < 1 or bits > 64 or bits & (bits - 1):
        raise ConfigError("Refcount width must be a power of two and may not exceed 64 bits")
    if opts.version < 3 and bits != 16:
        raise ConfigError(
            "Different refcount widths than 16 bits require compatibility level 1.1 or above"
            + V3_SUFFIX
        )
    if opts.compression_type not in ("zlib", "zstd"):
        raise ConfigError(
            f"Parameter 'compression-type' does not accept value '{opts.compression_type}'"
        )
    if opts.version < 3 and opts.compression_type != "zlib":
        raise ConfigError(
            "Non-zlib compression type is only supported with compatibility level 1.1 "
            "and above" + V3_SUFFIX
        )
    cluster_bits = cs.bit_length() - 1
    if opts.size < 0 or l1_entries_needed(opts.size, cluster_bits) * 8 > MAX_L1_BYTES:
        raise ConfigError(
            "The image size is too large for file format 'qcow2' (try using a larger cluster size)"
        )


class _Again(Exception):
    """QEMU's -EAGAIN: a refcount block was placed; the caller must search again."""


class _Allocator:
    """A model of QEMU's qcow2 cluster allocator over an in-memory image.

    It keeps the refcount table and blocks, the free-cluster cursor, and a log of the
    writes QEMU issues, so that its final state is QEMU's.
    """

    def __init__(self, cluster_bits: int, refcount_order: int) -> None:
        self.cb = cluster_bits
        self.cs = 1 << cluster_bits
        self.codec = RefcountCodec(refcount_order)
        self.rb_bits = cluster_bits + 3 - refcount_order
        self.rb_entries = 1 << self.rb_bits
        cs = self.cs
        # State after QEMU's first raw writes: header cluster, reftable, one refblock.
        self.reftable: list[int] = [0] * (cs // 8)
        self.reftable[0] = 2 * cs
        self.reftable_offset = cs
        self.refblocks: dict[int, list[int]] = {2 * cs: [0] * self.rb_entries}
        self.free_index = 0
        self.writes: list[tuple[int, bytes]] = [(0, bytes(cs)), (cs, self._table_bytes())]
        self.writes.append((2 * cs, bytes(cs)))

    # -- reading the model ---------------------------------------------------------------

    def refcount(self, cluster: int) -> int:
        index = cluster >> self.rb_bits
        if index >= len(self.reftable) or not self.reftable[index]:
            return 0
        return self.refblocks[self.reftable[index]][cluster & (self.rb_entries - 1)]

    def _table_bytes(self) -> bytes:
        return struct.pack(f">{len(self.reftable)}Q", *self.reftable)

    def refblock_bytes(self, offset: int) -> bytes:
        values = self.refblocks[offset]
        if self.codec.bits >= 8:  # whole bytes: one pack (rb_entries * bits / 8 == cs)
            code = {8: "B", 16: "H", 32: "I", 64: "Q"}[self.codec.bits]
            return struct.pack(f">{len(values)}{code}", *values)
        block = bytearray(self.cs)
        for index, value in enumerate(values):
            if value:
                self.codec.set(block, index, value)
        return bytes(block)

    # -- QEMU's allocator ----------------------------------------------------------------

    def alloc_noref(self, size: int) -> int:
        """First fit from the free cursor, which moves past the clusters returned."""
        count = -(-size // self.cs)
        found = 0
        while found < count:
            index = self.free_index
            self.free_index += 1
            found = found + 1 if self.refcount(index) == 0 else 0
        return (self.free_index - count) << self.cb

    def alloc(self, size: int) -> int:
        """Allocates and references clusters for ``size`` bytes, retrying as QEMU does."""
        while True:
            offset = self.alloc_noref(size)
            try:
                self.update(offset, size, 1)
            except _Again:
                continue
            return offset

    def free(self, offset: int, size: int) -> None:
        self.update(offset, size, -1)

    def update(self, offset: int, length: int, addend: int) -> None:
        """Adds ``addend`` to each cluster's refcount; undoes its work on _Again."""
        if length <= 0:
            return
        first = offset >> self.cb
        last = (offset + length - 1) >> self.cb
        done: list[int] = []
        block: list[int] | None = None
        block_index = -1
        try:
            for cluster in range(first, last + 1):
                if cluster >> self.rb_bits != block_index:
                    block_index = cluster >> self.rb_bits
                    block = self.refblocks[self._refblock_for(cluster, first)]
                assert block is not None
                slot = cluster & (self.rb_entries - 1)
                block[slot] += addend
                if block[slot] == 0 and cluster < self.free_index:
                    self.free_index = cluster
                done.append(cluster)
        except _Again:
            for cluster in done:
                self._adjust(cluster, -addend)
            raise

    def _adjust(self, cluster: int, addend: int) -> None:
        block = self.refblocks[self.reftable[cluster >> self.rb_bits]]
        slot = cluster & (self.rb_entries - 1)
        block[slot] += addend
        if block[slot] == 0 and cluster < self.free_index:
            self.free_index = cluster

    def _refblock_for(self, cluster: int, search_start: int) -> int:
        try:
            return self._alloc_refblock(cluster)
        except _Again:
            self.free_index = min(self.free_index, search_start)
            raise

    def _alloc_refblock(self, cluster: int) -> int:
        """The refcount block covering ``cluster``; placing one raises _Again."""
        index = cluster >> self.rb_bits
        if index < len(self.reftable) and self.reftable[index]:
            return self.reftable[index]
        new_block = self.alloc_noref(self.cs)
        new_cluster = new_block >> self.cb
        if new_cluster >> self.rb_bits == index:  # it describes itself
            block = [0] * self.rb_entries
            block[new_cluster & (self.rb_entries - 1)] = 1
            self.refblocks[new_block] = block
        else:
            self.update(new_block, self.cs, 1)
            self.refblocks[new_block] = [0] * self.rb_entries
        if index < len(self.reftable):
            self.reftable[index] = new_block
            raise _Again
        used = -(-max(cluster + 1, new_cluster + 1) // self.rb_entries)
        self._refcount_area(used * self.rb_entries * self.cs, index, new_block)
        raise _Again

    def _refcount_area(self, start: int, new_index: int, new_block: int) -> None:
        """Grows the refcount table into a self-describing area starting at ``start``."""
        cs = self.cs
        total = refcount_blocks_needed(start // cs, cs, self.codec.order, generous=True)
        area_index = (start // cs) // self.rb_entries
        table_size = total + -(-total // 2)
        per_cluster = cs // 8
        table_size = -(-table_size // per_cluster) * per_cluster
        if table_size > MAX_REFTABLE_ENTRIES:
            raise ConfigError("The image size is too large for file format 'qcow2'")
        table = [0] * table_size
        for i, entry in enumerate(self.reftable[:table_size]):
            table[i] = entry
        table[new_index] = new_block
        missing = sum(1 for i in range(area_index, total) if not table[i])
        table_offset = start + missing * cs
        end = table_offset + table_size * 8
        block_offset = start
        for i in range(area_index, total):
            if not table[i]:
                self.refblocks[block_offset] = [0] * self.rb_entries
                table[i] = block_offset
                block_offset += cs
            block = self.refblocks[table[i]]
            covered = i * self.rb_entries * cs
            if covered < end:
                j = (start - covered) // cs if covered < start else 0
                for k in range(j, min((end - covered) // cs, self.rb_entries)):
                    block[k] = 1
        # The old table stays in the file as last written; QEMU does not erase it.
        old_offset, old_size = self.reftable_offset, len(self.reftable)
        self.writes.append((old_offset, self._table_bytes()))
        self.reftable = table
        self.reftable_offset = table_offset
        self.free(old_offset, old_size * 8)


def refcount_blocks_needed(clusters: int, cluster_size: int, order: int, generous: bool) -> int:
    """Refcount blocks covering ``clusters`` plus the refcount structures themselves.

    The fixed point QEMU computes: blocks and table clusters also need refcounts; a
    generous estimate adds room for half the table again.
    """
    per_table_cluster = cluster_size // 8
    per_block = cluster_size * 8 >> order
    table = blocks = 0
    last, n = -1, 0
    while n != last:
        last = n
        blocks = -(-(clusters + table + blocks) // per_block)
        table = -(-blocks // per_table_cluster)
        n = clusters + blocks + table
        if n == last and generous:
            clusters += -(-table // 2)
            n = 0
            generous = False
    return blocks


class Plan(NamedTuple):
    """The writes that make the image, in order, and the header they end with."""

    header: Header
    writes: tuple[tuple[int, bytes], ...]

    @property
    def file_size(self) -> int:
        return max(offset + len(data) for offset, data in self.writes)


def build_header(opts: CreateOptions, l1_size: int, l1_offset: int, alloc: _Allocator) -> Header:
    incompatible = Incompat.COMPRESSION if opts.compression_type == "zstd" else 0
    compression = CompressionType.ZSTD if opts.compression_type == "zstd" else 0
    v3 = opts.version >= 3
    return Header(
        version=opts.version,
        cluster_bits=alloc.cb,
        size=opts.size,
        l1_size=l1_size,
        l1_table_offset=l1_offset,
        refcount_table_offset=alloc.reftable_offset,
        refcount_table_clusters=len(alloc.reftable) * 8 // alloc.cs,
        backing_file=opts.backing_file,
        backing_format=opts.backing_format if opts.backing_file else None,
        incompatible=int(incompatible),
        compatible=int(Compat.LAZY_REFCOUNTS) if opts.lazy_refcounts else 0,
        refcount_order=opts.refcount_bits.bit_length() - 1,
        header_length=V3_HEADER_LENGTH_WITH_COMPRESSION if v3 else V2_HEADER_LENGTH,
        compression_type=int(compression),
        # QEMU writes the (informative) feature name table only with clusters over 4 KiB.
        has_feature_table=v3 and alloc.cs > 4096,
    )


def plan_image(opts: CreateOptions) -> Plan:
    """Computes the writes ``qemu-img create`` would issue for these options.

    Raises:
        ConfigError: invalid options (see ``validate``).
    """
    validate(opts)
    size = -(-opts.size // 512) * 512
    opts = opts._replace(size=size)
    cluster_bits = opts.cluster_size.bit_length() - 1
    alloc = _Allocator(cluster_bits, opts.refcount_bits.bit_length() - 1)
    if alloc.alloc(3 * alloc.cs) != 0:
        raise AssertionError("the first clusters of a new image must be free")
    l1_size = l1_entries_needed(size, cluster_bits)
    l1_offset = 0
    if l1_size:
        l1_offset = alloc.alloc(l1_size * 8)
        alloc.writes.append((l1_offset, bytes(l1_size * 8)))
    for offset in sorted(alloc.refblocks):
        alloc.writes.append((offset, alloc.refblock_bytes(offset)))
    alloc.writes.append((alloc.reftable_offset, alloc._table_bytes()))
    header = build_header(opts, l1_size, l1_offset, alloc)
    encoded = encode_header(header)
    alloc.writes.append((0, encoded + bytes(alloc.cs - len(encoded))))
    return Plan(header, tuple(alloc.writes))


def create_image(path: str, opts: CreateOptions) -> Header:
    """Creates (or truncates and rewrites) ``path`` as an empty qcow2 image.

    Raises:
        ConfigError: invalid options.
        OSError: the file cannot be created or written.
    """
    plan = plan_image(opts)
    write_plan(path, plan, sync=True)
    return plan.header


def write_plan(path: str, plan: Plan, *, sync: bool) -> None:
    """Creates (or truncates) ``path`` and performs the plan's writes; an image another
    process holds is refused, untouched (``locking.open_for_create``).

    Raises:
        LockConflict: the image is in use.
        OSError: the file cannot be created or written.
    """
    fd = locking.open_for_create(path)
    try:
        for offset, data in _coalesce(plan.writes):
            os.pwrite(fd, data, offset)
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


def _coalesce(writes: tuple[tuple[int, bytes], ...]) -> Iterator[tuple[int, bytes]]:
    """Writes in order; large zero writes go out in 4 MiB pieces to bound memory."""
    for offset, data in writes:
        step = 4 << 20
        for start in range(0, len(data), step):
            yield offset + start, data[start : start + step]


# -- a whole refcount structure at once (check's rebuild, convert's new images) ----------


def write_refcount_structure(
    file: Node, header: Header, refs: array[int], *, sync: bool = True
) -> Header:
    """Writes refcount blocks and a table holding ``refs[cluster]`` for each host cluster,
    then points the header at them; returns the header as it now is.

    The new blocks and table go, first fit, into clusters ``refs`` shows unreferenced, and
    count themselves. They are written and synced before the header's refcount-table
    fields change (one synced write), so a crash leaves either structure in force.
    ``convert`` also uses this to give the qcow2 images it writes their refcounts (without
    ``sync``, as qemu-img writes convert targets with cache=unsafe).
    """
    refs = array("Q", refs)
    cb, cs = header.cluster_bits, header.cluster_size
    per = 1 << (cb + 3 - header.refcount_order)
    blocks: dict[int, int] = {}
    table_start, table_clusters = 0, 0
    cursor = [0]
    while True:
        changed = False
        for index in range(-(-len(refs) // per)):
            if index not in blocks and any(refs[index * per : (index + 1) * per]):
                blocks[index] = _alloc(refs, 1, cursor)
                changed = True
        entries = -(-(max(blocks) + 1) // (cs // 8)) * (cs // 8)
        if entries * 8 // cs != table_clusters:
            for k in range(table_start, table_start + table_clusters):
                refs[k] = 0
            cursor[0] = min(cursor[0], table_start) if table_clusters else cursor[0]
            table_clusters = entries * 8 // cs
            table_start = _alloc(refs, table_clusters, cursor)
            changed = True
        if not changed:
            break
    codec = RefcountCodec(header.refcount_order)
    table = array("Q", [0]) * (table_clusters * cs // 8)
    for index, cluster in blocks.items():
        table[index] = cluster << cb
        file.write(cluster << cb, _encode_block(codec, cs, refs[index * per : (index + 1) * per]))
    table.byteswap()
    file.write(table_start << cb, table.tobytes())
    if sync:
        file.flush()
    file.write(REFTABLE_AT, struct.pack(">QI", table_start << cb, table_clusters))
    if sync:
        file.flush()
    return header.with_changes(
        refcount_table_offset=table_start << cb, refcount_table_clusters=table_clusters
    )


def _alloc(refs: array[int], count: int, cursor: list[int]) -> int:
    """First fit from ``cursor[0]`` (below which nothing is free): ``count`` unreferenced
    clusters in a row, marked used; grows ``refs`` as needed."""
    i = cursor[0]
    while i < len(refs) and refs[i]:
        i += 1
    cursor[0] = i
    start, run = i, 0
    while run < count:
        if i >= len(refs):
            refs.extend(array("Q", [0]) * (count - run))
        if refs[i] == 0:
            run += 1
        else:
            start, run = i + 1, 0
        i += 1
    for k in range(start, start + count):
        refs[k] = 1
    if start == cursor[0]:
        cursor[0] = start + count
    return start


_WIDTH_CODES = {8: "B", 16: "H", 32: "I", 64: "Q"}


def _encode_block(codec: RefcountCodec, cs: int, values: array[int]) -> bytes:
    code = _WIDTH_CODES.get(codec.bits)
    if code is not None and array(code).itemsize * 8 == codec.bits:
        block = array(code, values)
        if codec.bits > 8:
            block.byteswap()
        return block.tobytes() + bytes(cs - len(block) * block.itemsize)
    out = bytearray(cs)
    for index, value in enumerate(values):
        if value:
            codec.set(out, index, value)
    return bytes(out)
