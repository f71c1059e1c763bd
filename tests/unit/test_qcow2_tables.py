"""Pure parts of the qcow2 driver: L2 entry kinds, compressed references, bitmap directory
entries, refcount blocks of every width, the offset set and the LRU map."""

from __future__ import annotations

import struct

import pytest

from pyfleece.block.qcow2.bitmap_format import (
    BITMAP_DIR_ENTRY,
    decode_bitmap_directory,
    decode_bitmaps_extension,
)
from pyfleece.block.qcow2.format import (
    OFLAG_COMPRESSED,
    OFLAG_COPIED,
    OFLAG_ZERO,
    Cluster,
    RefcountCodec,
    compressed_clusters,
    encode_compressed,
    l2_host,
    l2_kind,
)
from pyfleece.block.qcow2.snapshot_format import SNAPSHOT_ENTRY, snapshot_extents
from pyfleece.block.qcow2.tables import LRU, OffsetSet, RefBlock, array_be, be_array
from pyfleece.errors import CorruptImage


@pytest.mark.parametrize(
    ("entry", "kind"),
    [
        (0, Cluster.UNALLOCATED),
        (OFLAG_COPIED, Cluster.UNALLOCATED),
        (OFLAG_ZERO, Cluster.ZERO_PLAIN),
        (0x50000 | OFLAG_ZERO | OFLAG_COPIED, Cluster.ZERO_ALLOC),
        (0x50000, Cluster.NORMAL),
        (0x50000 | OFLAG_COPIED, Cluster.NORMAL),
        (OFLAG_COMPRESSED | 0x5004F, Cluster.COMPRESSED),
    ],
)
def test_l2_kind(entry: int, kind: Cluster) -> None:
    assert l2_kind(entry) == kind


def test_l2_host_alignment() -> None:
    assert l2_host(0x50000 | OFLAG_COPIED, 16) == 0x50000
    with pytest.raises(CorruptImage, match="0x51000 unaligned"):
        l2_host(0x51000, 16)
    assert l2_host(0x51000, 12) == 0x51000


@pytest.mark.parametrize(
    ("offset", "length", "cluster_bits", "expected"),
    [
        (0x50000, 100, 16, (5, 1)),  # one sector
        (0x5FFF0, 100, 16, (5, 2)),  # spills into the next cluster
        (0x5004F, 65536, 16, (5, 2)),
        (0x200, 512, 9, (1, 1)),
    ],
)
def test_compressed_clusters(
    offset: int, length: int, cluster_bits: int, expected: tuple[int, int]
) -> None:
    assert compressed_clusters(encode_compressed(offset, length, cluster_bits), cluster_bits) == (
        expected
    )


def _dir_entry(table: int, flags: int, name: bytes, extra: bytes = b"") -> bytes:
    body = BITMAP_DIR_ENTRY.pack(table, 1, flags, 1, 16, len(name), len(extra)) + extra + name
    return body + bytes(-len(body) % 8)


def test_bitmap_directory_roundtrip() -> None:
    data = _dir_entry(0x70000, 2, b"first") + _dir_entry(0x80000, 0, b"x" * 9, b"extra!")
    first, second = decode_bitmap_directory(data, 2)
    assert (first.position, first.name, first.flags, first.table_offset) == (0, "first", 2, 0x70000)
    assert (second.position, second.name, second.granularity_bits) == (32, "x" * 9, 16)
    with pytest.raises(CorruptImage, match="overruns"):
        decode_bitmap_directory(data, 3)
    with pytest.raises(CorruptImage, match="overruns"):
        decode_bitmap_directory(data[:40], 2)


def test_bitmaps_extension_validation() -> None:
    ext = decode_bitmaps_extension(struct.pack(">IIQQ", 2, 0, 64, 0x90000), 65536)
    assert (ext.nb_bitmaps, ext.directory_size, ext.directory_offset) == (2, 64, 0x90000)
    for bad in [(0, 0, 64, 0x90000), (1, 0, 8, 0x90000), (1, 0, 64, 0x90001), (1, 0, 1 << 40, 0)]:
        with pytest.raises(CorruptImage):
            decode_bitmaps_extension(struct.pack(">IIQQ", *bad), 65536)


@pytest.mark.parametrize("order", range(7))
def test_refblock_every_width(order: int) -> None:
    entries = 4096 * 8 >> order
    codec = RefcountCodec(order)
    raw = bytearray(4096)
    for i in range(0, entries, 3):
        codec.set(raw, i, min(i % 5, codec.max))
    block = RefBlock(0x10000, order, raw)
    assert [block.get(i) for i in range(entries)] == [codec.get(raw, i) for i in range(entries)]
    assert block.to_bytes() == bytes(raw)
    assert block.next_free(0, entries) == 0 and block.free_run(1, entries) == 2
    assert block.add(1, 3, 1) == 1 and block.dirty
    assert block.next_free(0, entries) == 0 and block.next_free(1, 3) == -1
    with pytest.raises(CorruptImage, match="out of range"):
        block.add(0, 2, -1)  # entry 0 is already 0: nothing may change
    assert block.get(1) == 1
    block.set(entries - 1, codec.max)
    with pytest.raises(CorruptImage):
        block.set(entries - 1, codec.max + 1)
    with pytest.raises(CorruptImage):
        block.add(entries - 1, entries, 1)


def test_big_endian_arrays() -> None:
    values = be_array("Q", struct.pack(">QQ", 1, 0x0102030405060708))
    assert list(values) == [1, 0x0102030405060708]
    assert array_be(values) == struct.pack(">QQ", 1, 0x0102030405060708)


def test_offset_set() -> None:
    offsets = OffsetSet([0x30000, 0x10000, 0x30000])
    assert offsets.first_in(0, 0x10000) is None
    assert offsets.first_in(0, 0x10001) == 0x10000
    assert offsets.first_in(0x10001, 0x40000) == 0x30000
    offsets.add(0x20000)
    offsets.discard(0x10000)
    offsets.discard(0x99999)
    assert offsets.first_in(0, 0x30000) == 0x20000


def test_lru_order() -> None:
    lru: LRU[int, str] = LRU()
    for key in (1, 2, 3):
        lru.put(key, str(key))
    assert lru.get(1) == "1"
    assert [k for k, _ in lru.oldest()] == [2, 3, 1]
    assert lru.pop(3) == "3" and len(lru) == 2 and lru.get(3) is None


def _snapshot_entry(l1: int, l1_size: int, name: bytes, extra: int = 24) -> bytes:
    fixed = SNAPSHOT_ENTRY.pack(l1, l1_size, 1, len(name), 0, 0, 0, 0, extra)
    body = fixed + bytes(extra) + b"1" + name
    return body + bytes(-len(body) % 8)


def test_snapshot_extents() -> None:
    table = _snapshot_entry(0x150000, 1, b"s1") + _snapshot_entry(0x160000, 2, b"second")
    assert snapshot_extents(table, 2) == (len(table), [(0x150000, 8), (0x160000, 16)])
    unpadded = table.rstrip(b"\0")  # QEMU may end the file before the last padding
    assert snapshot_extents(unpadded, 2) == (len(table), [(0x150000, 8), (0x160000, 16)])
    assert snapshot_extents(table[:50], 2) is None
    with pytest.raises(CorruptImage, match="extra data too large"):
        snapshot_extents(_snapshot_entry(0, 1, b"x", extra=4096), 1)
    with pytest.raises(CorruptImage, match="too many"):
        snapshot_extents(b"", 1 << 20)
