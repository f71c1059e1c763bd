"""Checking and repairing a qcow2 image's refcounts, as ``qemu-img check`` does.

Works on the image's file node directly (no qcow2 node needed, nothing cached):

1. compute the refcount every host cluster should have, from everything that references
   clusters (qemu-docs-interop-qcow2.rst: header, L1/L2 tables and data clusters of the
   active state and of internal snapshots, the snapshot table, the refcount table and
   blocks, the bitmap directory, tables and data);
2. compare with the refcounts on disk: a cluster referenced more often than its refcount
   says is a corruption, one with a refcount nobody references is a leak; a referenced
   cluster whose on-disk refcount is 0 (or a broken refcount table) needs the refcount
   structure rebuilt;
3. check OFLAG_COPIED: set exactly on L1 and L2 entries whose cluster has refcount 1.

Repair follows QEMU's policy: ``Fix.LEAKS`` lowers refcounts of leaked clusters (and
punches them out of the file), ``Fix.ERRORS`` raises refcounts that are too low, fixes
OFLAG_COPIED, and rebuilds the refcount structure when needed. A rebuild writes new
refcount blocks and a new table into clusters nobody references (first fit), then switches
the header to them with one synced write, so a crash leaves either structure in force.
The counts reported (corruptions, leaks, ``*_fixed``, fragmentation, image end offset)
and the messages printed are qemu-img's, so ``pyfleece img check`` reports what it does.

The driver's entry point for dirty (lazy-refcounts) images is ``repair_dirty``.
"""

from __future__ import annotations

import struct
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntFlag

from pyfleece.block.node import Node
from pyfleece.block.qcow2.bitmaps import read_bitmaps
from pyfleece.block.qcow2.format import (
    L1_RESERVED,
    L2_RESERVED_STANDARD,
    OFFSET_MASK,
    OFLAG_COPIED,
    OFLAG_ZERO,
    REFT_RESERVED,
    Cluster,
    Header,
    Incompat,
    RefcountCodec,
    decode_compressed,
    decode_header,
    l2_kind,
)
from pyfleece.errors import CorruptImage, ImageError

#: Bits of a bitmap table entry that must be zero; bit 0 means "all ones" (no cluster).
BME_RESERVED = 0xFF000000000001FE
BME_OFFSET_MASK = 0x00FFFFFFFFFFFE00
# Snapshot table entry: l1_table_offset u64 | l1_size u32 | id_str_size u16 |
#  name_size u16 | date_sec u32 | date_nsec u32 | vm_clock_nsec u64 | vm_state_size u32 |
#  extra_data_size u32 | extra data | id string | name | padding to 8 bytes
SNAPSHOT_ENTRY = struct.Struct(">QIHHIIQII")
MAX_SNAPSHOTS = 65536
INCOMPAT_AT = 72  # header bytes 72..79: incompatible feature bits
REFTABLE_AT = 48  # header bytes 48..59: refcount table offset and clusters
MAX_L1_ENTRIES = (32 << 20) // 8


class Fix(IntFlag):
    """What ``check`` may repair (QEMU's BDRV_FIX_*)."""

    NONE = 0
    LEAKS = 1
    ERRORS = 2


@dataclass
class CheckResult:
    """The outcome, in qemu-img's terms (its ``check --output=json`` keys)."""

    corruptions: int = 0
    leaks: int = 0
    check_errors: int = 0
    corruptions_fixed: int = 0
    leaks_fixed: int = 0
    image_end_offset: int = 0
    total_clusters: int = 0
    allocated_clusters: int = 0
    fragmented_clusters: int = 0
    compressed_clusters: int = 0
    messages: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Snapshot:
    """One internal snapshot's table entry (qemu-docs-interop-qcow2.rst, "Snapshots")."""

    l1_table_offset: int
    l1_size: int
    id: str
    name: str
    date_sec: int
    date_nsec: int
    vm_clock_nsec: int
    vm_state_size: int
    icount: int | None


def read_snapshots(file: Node, header: Header) -> tuple[list[Snapshot], int]:
    """The internal snapshots, and the snapshot table's size in bytes.

    Raises:
        CorruptImage: the table is too long or lies past the end of the file.
    """
    if not header.nb_snapshots:
        return [], 0
    if header.nb_snapshots > MAX_SNAPSHOTS:
        raise CorruptImage(f"qcow2: too many snapshots ({header.nb_snapshots})")
    found = []
    pos = header.snapshots_offset
    for _ in range(header.nb_snapshots):
        if pos + SNAPSHOT_ENTRY.size > file.size:
            raise CorruptImage("qcow2: snapshot table lies past the end of the file")
        fields = SNAPSHOT_ENTRY.unpack(file.read(pos, SNAPSHOT_ENTRY.size))
        l1_off, l1_size, id_len, name_len, sec, nsec, clock, state, extra_len = fields
        tail = pos + SNAPSHOT_ENTRY.size
        if tail + extra_len + id_len + name_len > file.size:
            raise CorruptImage("qcow2: snapshot table lies past the end of the file")
        extra = file.read(tail, extra_len)
        strings = file.read(tail + extra_len, id_len + name_len)
        if len(extra) >= 8:
            state = int.from_bytes(extra[:8], "big")
        icount = int.from_bytes(extra[16:24], "big") if len(extra) >= 24 else None
        found.append(
            Snapshot(
                l1_off,
                l1_size,
                strings[:id_len].decode(errors="replace"),
                strings[id_len:].decode(errors="replace"),
                sec,
                nsec,
                clock,
                state,
                None if icount == (1 << 64) - 1 else icount,
            )
        )
        pos = (tail + extra_len + id_len + name_len + 7) & ~7
    return found, pos - header.snapshots_offset


class CheckFailed(ImageError):
    """The check could not complete (qemu-img's "Check failed: <reason>")."""


Log = Callable[[str], None]


class _Image:
    """The on-disk refcount structure as the check reads (and repairs) it."""

    def __init__(self, file: Node, header: Header) -> None:
        self.file = file
        self.header = header
        self.cb = header.cluster_bits
        self.cs = header.cluster_size
        self.codec = RefcountCodec(header.refcount_order)
        self.rb_bits = self.cb + 3 - header.refcount_order
        self.rb_entries = 1 << self.rb_bits
        entries = header.refcount_table_clusters * self.cs // 8
        self.reftable_offset = header.refcount_table_offset
        self.reftable = self._read_u64s(self.reftable_offset, entries)
        self.blocks: dict[int, bytearray] = {}
        self.l1 = self._read_u64s(header.l1_table_offset, header.l1_size)

    def _read_u64s(self, offset: int, count: int) -> array[int]:
        data = bytearray(count * 8)
        if count:
            self.file.readinto(offset, memoryview(data))
        table = array("Q", bytes(data))
        table.byteswap()
        return table

    @property
    def size(self) -> int:
        return self.file.size

    def read_l2(self, offset: int) -> array[int]:
        return self._read_u64s(offset, self.cs // 8)

    def _block(self, offset: int) -> bytearray:
        block = self.blocks.get(offset)
        if block is None:
            block = bytearray(self.cs)
            self.file.readinto(offset, memoryview(block))
            if len(self.blocks) > 256:
                self.blocks.clear()
            self.blocks[offset] = block
        return block

    def refcount(self, cluster: int) -> int:
        """The on-disk refcount of a host cluster.

        Raises:
            CorruptImage: its refcount block offset is not cluster-aligned.
        """
        index = cluster >> self.rb_bits
        if index >= len(self.reftable):
            return 0
        offset = self.reftable[index] & ~REFT_RESERVED
        if offset == 0:
            return 0
        if offset & (self.cs - 1):
            raise CorruptImage(f"Refblock offset {offset:#x} unaligned (reftable index {index:#x})")
        return self.codec.get(self._block(offset), cluster & (self.rb_entries - 1))

    def set_refcount(self, cluster: int, value: int) -> None:
        """Writes one refcount in place (its refcount block must exist)."""
        offset = self.reftable[cluster >> self.rb_bits] & ~REFT_RESERVED
        block = self._block(offset)
        index = cluster & (self.rb_entries - 1)
        self.codec.set(block, index, value)
        start = (index * self.codec.bits // 8) & ~511
        self.file.write(offset + start, memoryview(block)[start : start + 512])


class _Checker:
    """One run of the check over an image (QEMU's qcow2_check_refcounts)."""

    def __init__(self, img: _Image, res: CheckResult, log: Log) -> None:
        self.img = img
        self.res = res
        self.log = log
        self.refs: array[int] = array("Q")

    # -- computing the refcounts the image should have --------------------------------------

    def inc(self, offset: int, size: int) -> None:
        """Counts one reference to each cluster of [offset, offset + size)."""
        if size <= 0:
            return
        img, res = self.img, self.res
        if offset + size - img.size >= img.cs:
            self.log(
                "ERROR: counting reference for region exceeding the end of the file by one "
                f"cluster or more: offset 0x{offset:x} size 0x{size:x}"
            )
            res.corruptions += 1
            return
        first, last = offset >> img.cb, (offset + size - 1) >> img.cb
        refs = self.refs
        if last >= len(refs):
            refs.extend(array("Q", [0]) * (last + 1 - len(refs)))
        top = img.codec.max
        for k in range(first, last + 1):
            if refs[k] == top:
                self.log(f"ERROR: overflow cluster offset=0x{k << img.cb:x}")
                self.log(
                    "Use qemu-img amend to increase the refcount entry width or qemu-img "
                    "convert to create a clean copy if the image cannot be opened for writing"
                )
                res.corruptions += 1
                continue
            refs[k] += 1

    def calculate(self, fix: Fix) -> bool:
        """Fills ``refs``; returns whether the refcount structure must be rebuilt."""
        img, h = self.img, self.img.header
        nb = -(-img.size // img.cs)
        self.refs = array("Q", [0]) * nb
        self.inc(0, img.cs)
        self.check_l1(h.l1_table_offset, h.l1_size, active=True, fix=fix)
        for l1_offset, l1_size, ident in self.snapshots():
            if l1_offset & (img.cs - 1):
                self.log(
                    f"ERROR snapshot {ident} l1_offset={l1_offset:#x}: L1 table is not "
                    "cluster aligned; snapshot table entry corrupted"
                )
                self.res.corruptions += 1
                continue
            if l1_size > MAX_L1_ENTRIES:
                self.log(
                    f"ERROR snapshot {ident} l1_size={l1_size:#x}: L1 table is too large; "
                    "snapshot table entry corrupted"
                )
                self.res.corruptions += 1
                continue
            self.check_l1(l1_offset, l1_size, active=False, fix=fix)
        self.inc(h.snapshots_offset, self.snapshots_size)
        self.inc(img.reftable_offset, len(img.reftable) * 8)
        self.check_bitmaps()
        return self.check_refblocks(fix)

    snapshots_size = 0

    def snapshots(self) -> list[tuple[int, int, str]]:
        """(L1 offset, L1 size, "id (name)") of each internal snapshot."""
        found, self.snapshots_size = read_snapshots(self.img.file, self.img.header)
        return [(sn.l1_table_offset, sn.l1_size, f"{sn.id} ({sn.name})") for sn in found]

    def check_l1(self, offset: int, size: int, *, active: bool, fix: Fix) -> None:
        if not size:
            return
        img = self.img
        self.inc(offset, size * 8)
        l1 = img.l1 if active else img._read_u64s(offset, size)
        for entry in l1:
            if not entry:
                continue
            if entry & L1_RESERVED:
                self.log(f"ERROR found L1 entry with reserved bits set: {entry:x}")
                self.res.corruptions += 1
            l2_offset = entry & OFFSET_MASK
            self.inc(l2_offset, img.cs)
            if l2_offset & (img.cs - 1):
                self.log(
                    f"ERROR l2_offset={l2_offset:x}: Table is not cluster aligned; "
                    "L1 entry corrupted"
                )
                self.res.corruptions += 1
            self.check_l2(l2_offset, frag_info=active, fix=fix)

    def check_l2(self, offset: int, *, frag_info: bool, fix: Fix) -> None:
        img, res = self.img, self.res
        next_contiguous = 0
        table = img.read_l2(offset)
        for index, entry in enumerate(table):
            kind = l2_kind(entry)
            if kind != Cluster.COMPRESSED and entry & L2_RESERVED_STANDARD:
                self.log(f"ERROR found l2 entry with reserved bits set: {entry:x}")
                res.corruptions += 1
            if kind == Cluster.COMPRESSED:
                if entry & OFLAG_COPIED:
                    desc = decode_compressed(entry & ~OFLAG_COPIED, img.cb)
                    self.log(
                        f"ERROR: coffset=0x{desc.host_offset:x}: copied flag must never be "
                        "set for compressed clusters"
                    )
                    entry &= ~OFLAG_COPIED
                    res.corruptions += 1
                desc = decode_compressed(entry, img.cb)
                self.inc(desc.host_offset, desc.length)
                if frag_info:
                    res.allocated_clusters += 1
                    res.compressed_clusters += 1
                    res.fragmented_clusters += 1
            elif kind in (Cluster.NORMAL, Cluster.ZERO_ALLOC):
                host = entry & OFFSET_MASK
                if host & (img.cs - 1):
                    res.corruptions += 1
                    self._misaligned(offset, index, entry, host, fix)
                if frag_info:
                    res.allocated_clusters += 1
                    if next_contiguous and host != next_contiguous:
                        res.fragmented_clusters += 1
                    next_contiguous = host + img.cs
                self.inc(host, img.cs)

    def _misaligned(self, l2_offset: int, index: int, entry: int, host: int, fix: Fix) -> None:
        if not entry & OFLAG_ZERO:
            self.log(
                f"ERROR offset={host:x}: Data cluster is not properly aligned; L2 entry corrupted."
            )
            return
        repair = bool(fix & Fix.ERRORS)
        self.log(
            f"{'Repairing' if repair else 'ERROR'} offset={host:x}: Preallocated cluster is "
            "not properly aligned; L2 entry corrupted."
        )
        if repair:
            self.img.file.write(l2_offset + index * 8, OFLAG_ZERO.to_bytes(8, "big"))
            self.res.corruptions -= 1
            self.res.corruptions_fixed += 1

    def check_bitmaps(self) -> None:
        img = self.img
        try:
            found = read_bitmaps(img.file, img.header)
        except CorruptImage:
            self.res.corruptions += 1
            return
        if found is None:
            return
        ext, entries = found
        self.inc(ext.directory_offset, ext.directory_size)
        for bitmap in entries:
            self.inc(bitmap.table_offset, bitmap.table_size * 8)
            for entry in img._read_u64s(bitmap.table_offset, bitmap.table_size):
                host = entry & BME_OFFSET_MASK
                if entry & BME_RESERVED or host & (img.cs - 1) or (entry & 1 and host):
                    self.res.corruptions += 1
                    continue
                if host:
                    self.inc(host, img.cs)

    def check_refblocks(self, fix: Fix) -> bool:
        img, res = self.img, self.res
        rebuild = False
        for index, entry in enumerate(img.reftable):
            offset = entry & ~REFT_RESERVED
            cluster = offset >> img.cb
            if entry & REFT_RESERVED:
                self.log(f"ERROR refcount table entry {index} has reserved bits set")
                res.corruptions += 1
                rebuild = True
                continue
            if offset & (img.cs - 1):
                self.log(
                    f"ERROR refcount block {index} is not cluster aligned; refcount table "
                    "entry corrupted"
                )
                res.corruptions += 1
                rebuild = True
                continue
            if offset and cluster >= len(self.refs):
                res.corruptions += 1
                self.log(f"ERROR refcount block {index} is outside image")
                if fix & Fix.ERRORS:
                    rebuild = True
                continue
            if offset:
                self.inc(offset, img.cs)
                if self.refs[cluster] != 1:
                    self.log(f"ERROR refcount block {index} refcount={self.refs[cluster]}")
                    res.corruptions += 1
                    rebuild = True
        return rebuild

    # -- comparing with the image ------------------------------------------------------------

    def compare(self, fix: Fix, res: CheckResult) -> tuple[bool, int]:
        """Compares ``refs`` with the refcounts on disk; returns (rebuild, highest cluster)."""
        img = self.img
        rebuild = False
        highest = 0
        for i, wanted in enumerate(self.refs):
            try:
                on_disk = img.refcount(i)
            except CorruptImage:
                self.log(f"Can't get refcount for cluster {i}: Input/output error")
                res.check_errors += 1
                continue
            if on_disk or wanted:
                highest = i
            if on_disk == wanted:
                continue
            fixed: str | None = None
            if on_disk == 0:
                rebuild = True
            elif on_disk > wanted and fix & Fix.LEAKS:
                fixed = "leaks_fixed"
            elif on_disk < wanted and fix & Fix.ERRORS:
                fixed = "corruptions_fixed"
            word = "Repairing" if fixed else ("ERROR" if on_disk < wanted else "Leaked")
            self.log(f"{word} cluster {i} refcount={on_disk} reference={wanted}")
            if fixed:
                img.set_refcount(i, wanted)
                if wanted == 0:
                    img.file.discard(i << img.cb, img.cs)
                setattr(res, fixed, getattr(res, fixed) + 1)
                continue
            if on_disk < wanted:
                res.corruptions += 1
            else:
                res.leaks += 1
        return rebuild, highest

    def check_copied(self, fix: Fix) -> None:
        """OFLAG_COPIED must be set exactly where the refcount is 1."""
        img, res = self.img, self.res
        if fix & Fix.ERRORS:
            repair = True
        elif fix & Fix.LEAKS:
            repair = not (res.check_errors or res.corruptions or res.leaks)
        else:
            repair = False
        word = "Repairing" if repair else "ERROR"
        for i, l1_entry in enumerate(img.l1):
            l2_offset = l1_entry & OFFSET_MASK
            if not l2_offset:
                continue
            try:
                refcount = img.refcount(l2_offset >> img.cb)
            except CorruptImage:
                continue
            if (refcount == 1) != bool(l1_entry & OFLAG_COPIED):
                res.corruptions += 1
                self.log(
                    f"{word} OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={l1_entry:x} "
                    f"refcount={refcount}"
                )
                if repair:
                    fixed = l1_entry | OFLAG_COPIED if refcount == 1 else l1_entry & ~OFLAG_COPIED
                    img.l1[i] = fixed
                    where = img.header.l1_table_offset + i * 8
                    img.file.write(where, fixed.to_bytes(8, "big"))
                    res.corruptions -= 1
                    res.corruptions_fixed += 1
            self._check_copied_l2(l2_offset, repair, word)

    def _check_copied_l2(self, l2_offset: int, repair: bool, word: str) -> None:
        img, res = self.img, self.res
        table = img.read_l2(l2_offset)
        dirty = 0
        for j, entry in enumerate(table):
            if l2_kind(entry) not in (Cluster.NORMAL, Cluster.ZERO_ALLOC):
                continue
            try:
                refcount = img.refcount((entry & OFFSET_MASK) >> img.cb)
            except CorruptImage:
                continue
            if (refcount == 1) != bool(entry & OFLAG_COPIED):
                res.corruptions += 1
                self.log(
                    f"{word} OFLAG_COPIED data cluster: l2_entry={entry:x} refcount={refcount}"
                )
                if repair:
                    table[j] = entry | OFLAG_COPIED if refcount == 1 else entry & ~OFLAG_COPIED
                    dirty += 1
        if dirty:
            table.byteswap()
            img.file.write(l2_offset, table.tobytes())
            res.corruptions -= dirty
            res.corruptions_fixed += dirty


# -- the whole check -------------------------------------------------------------------------


def read_header(file: Node) -> Header:
    """Decodes the header of the image in ``file`` (see ``format.decode_header``)."""
    head = bytearray(min(file.size, 2 << 20))
    file.readinto(0, memoryview(head))
    return decode_header(bytes(head), file.size)


def check(
    file: Node, fix: Fix = Fix.NONE, *, log: Log | None = None, header: Header | None = None
) -> CheckResult:
    """Checks (and with ``fix``, repairs) the qcow2 image in ``file``.

    ``log`` receives each message qemu-img would print while checking (default: they are
    collected in ``CheckResult.messages``). A repair needs ``file`` writable; it is flushed
    before this returns.

    Raises:
        CheckFailed: the check could not complete (qemu-img: "Check failed").
        CorruptImage, UnsupportedImage: the header cannot be decoded.
        BlockError: an I/O error.
    """
    header = header or read_header(file)
    res = CheckResult()
    log = log or res.messages.append
    img = _Image(file, header)
    res.total_clusters = -(-header.size // img.cs)
    checker = _Checker(img, res, log)
    rebuild = checker.calculate(fix)
    before = _copy(res)
    again, highest = checker.compare(Fix.NONE, res)
    rebuild = rebuild or again
    if rebuild and fix & Fix.ERRORS:
        highest = _rebuild_and_recount(img, checker, fix, log)
    elif fix:
        if rebuild:
            log("ERROR need to rebuild refcount structures")
            res.check_errors += 1
            raise CheckFailed("Input/output error")
        if res.leaks or res.corruptions:
            _assign(res, before)
            _, highest = checker.compare(fix, res)
    checker.check_copied(fix)
    res.image_end_offset = (highest + 1) * img.cs
    if fix and not res.check_errors and not res.corruptions:
        _mark_clean(img)
    if fix:
        file.flush()
    return res


def _rebuild_and_recount(img: _Image, checker: _Checker, fix: Fix, log: Log) -> int:
    """Rebuilds the refcount structure, counts again and frees the old structure."""
    res = checker.res
    old = _copy(res)
    log("Rebuilding refcount structure")
    rebuild_refcounts(img, checker.refs)
    res.corruptions = res.leaks = 0
    fresh = _Checker(img, res, log)
    fresh.calculate(Fix.NONE)
    fresh_leaks, highest = 0, 0
    if fix & Fix.LEAKS:
        saved = _copy(res)
        scratch = CheckResult()
        still_broken, highest = fresh.compare(Fix.LEAKS, scratch)
        if still_broken:
            log("ERROR rebuilt refcount structure is still broken")
        fresh_leaks = scratch.leaks
        _assign(res, saved)
    if res.corruptions < old.corruptions:
        res.corruptions_fixed += old.corruptions - res.corruptions
    if res.leaks < old.leaks:
        res.leaks_fixed += old.leaks - res.leaks
    res.leaks += fresh_leaks
    checker.refs = fresh.refs
    return highest


def rebuild_refcounts(img: _Image, refs: array[int]) -> None:
    """Writes a new refcount structure holding ``refs`` and switches the header to it.

    The old structure is counted in ``refs``, so it stays intact until the header
    switches; afterwards it is left behind as leaks.
    """
    img.header = write_refcount_structure(img.file, img.header, refs)
    img.reftable_offset = img.header.refcount_table_offset
    entries = img.header.refcount_table_clusters * img.cs // 8
    img.reftable = img._read_u64s(img.reftable_offset, entries)
    img.blocks.clear()


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


def _mark_clean(img: _Image) -> None:
    """Clears the dirty and corrupt bits, as QEMU does after a successful repair."""
    h = img.header
    if h.version < 3:
        return
    cleared = h.incompatible & ~(Incompat.DIRTY | Incompat.CORRUPT)
    if cleared != h.incompatible:
        img.file.flush()
        img.file.write(INCOMPAT_AT, cleared.to_bytes(8, "big"))
        img.header = h.with_changes(incompatible=cleared)


def _copy(res: CheckResult) -> CheckResult:
    return CheckResult(**{k: v for k, v in res.__dict__.items() if k != "messages"})


def _assign(res: CheckResult, other: CheckResult) -> None:
    for key, value in other.__dict__.items():
        if key != "messages":
            setattr(res, key, value)


def repair_dirty(file: Node, *, log: Log | None = None) -> CheckResult:
    """Repairs an image left with the dirty bit (lazy refcounts): the qcow2 driver calls
    this on a read-write open, before reading any metadata, then re-reads the header.

    Runs the full check with ``Fix.LEAKS | Fix.ERRORS`` (rebuilding the refcount structure
    if needed, fixing OFLAG_COPIED), clears the dirty bit, and flushes.

    Raises:
        CorruptImage: the image could not be repaired ("Could not repair dirty image").
        BlockError: an I/O error.
    """
    try:
        res = check(file, Fix.LEAKS | Fix.ERRORS, log=log)
    except CheckFailed as err:
        raise CorruptImage(f"Could not repair dirty image: {err}") from err
    if res.check_errors or res.corruptions:
        raise CorruptImage(
            f"Could not repair dirty image: {res.corruptions} corruptions and "
            f"{res.check_errors} errors remain"
        )
    return res


def count_referenced(file: Node, header: Header, limit: int) -> int:
    """How many host clusters of the file have a nonzero refcount, counting up to ``limit``.

    QEMU uses this to guess whether an image had its metadata preallocated (it then looks
    at the file's holes when reporting block status); ``pyfleece img map`` does the same.
    """
    img = _Image(file, header)
    count = 0
    for cluster in range(-(-file.size // img.cs)):
        if count >= limit:
            break
        try:
            count += img.refcount(cluster) != 0
        except CorruptImage:
            break
    return count
