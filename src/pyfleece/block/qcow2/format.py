"""qcow2 on-disk structures (qemu-docs-interop-qcow2.rst): pure encoding, no I/O.

The header, header extensions, L1/L2 entries, refcount entries and the offset arithmetic
that maps guest offsets to table indexes. The driver, ``create`` and ``check`` all build on
these definitions; nothing here reads or writes a file.
"""

from __future__ import annotations

import struct
from enum import IntEnum, IntFlag
from typing import Any, NamedTuple

from pyfleece.errors import CorruptImage, UnsupportedImage

MAGIC = 0x514649FB  # "QFI\xfb"
MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21  # QEMU's limit: 2 MiB clusters
V2_HEADER_LENGTH = 72
V3_HEADER_LENGTH = 104
#: QEMU writes v3 headers with the compression_type byte and padding: 112 bytes.
V3_HEADER_LENGTH_WITH_COMPRESSION = 112
MAX_BACKING_FILE_NAME = 1023
#: QEMU's implementation limits: 32 MiB of L1 table, 8 MiB of refcount table.
MAX_L1_BYTES = 32 << 20
MAX_REFCOUNT_TABLE_BYTES = 8 << 20

# Big endian. Version 2 header, 72 bytes:
#  magic u32 | version u32 | backing_file_offset u64 | backing_file_size u32 |
#  cluster_bits u32 | size u64 | crypt_method u32 | l1_size u32 | l1_table_offset u64 |
#  refcount_table_offset u64 | refcount_table_clusters u32 | nb_snapshots u32 |
#  snapshots_offset u64
HEADER_V2 = struct.Struct(">IIQIIQIIQQIIQ")
# Version 3 additions, bytes 72..103:
#  incompatible_features u64 | compatible_features u64 | autoclear_features u64 |
#  refcount_order u32 | header_length u32
HEADER_V3_EXTRA = struct.Struct(">QQQII")
# Header extension: type u32 | length u32 | data, padded to 8 bytes.
EXTENSION = struct.Struct(">II")
# Bitmaps extension data: nb_bitmaps u32 | reserved u32 | directory_size u64 |
#  directory_offset u64
BITMAPS_EXTENSION = struct.Struct(">IIQQ")


class Incompat(IntFlag):
    DIRTY = 1 << 0
    CORRUPT = 1 << 1
    DATA_FILE = 1 << 2
    COMPRESSION = 1 << 3
    EXTL2 = 1 << 4


class Compat(IntFlag):
    LAZY_REFCOUNTS = 1 << 0


class Autoclear(IntFlag):
    BITMAPS = 1 << 0
    DATA_FILE_RAW = 1 << 1


class Ext(IntEnum):
    """Header extension types."""

    END = 0x00000000
    BACKING_FORMAT = 0xE2792ACA
    FEATURE_TABLE = 0x6803F857
    BITMAPS = 0x23852875
    CRYPTO = 0x0537BE77
    DATA_FILE = 0x44415441


class CompressionType(IntEnum):
    ZLIB = 0
    ZSTD = 1


KNOWN_INCOMPAT = Incompat.DIRTY | Incompat.CORRUPT | Incompat.COMPRESSION
KNOWN_AUTOCLEAR = Autoclear(0)  # bitmaps come in a later issue: cleared on first write

# L1/L2/refcount-table entry bits.
OFFSET_MASK = 0x00FFFFFFFFFFFE00  # bits 9-55
L1_RESERVED = 0x7F000000000001FF
L2_RESERVED_STANDARD = 0x3F000000000001FE
REFT_RESERVED = 0x1FF
OFLAG_COPIED = 1 << 63
OFLAG_COMPRESSED = 1 << 62
OFLAG_ZERO = 1 << 0

#: Names of the feature bits, as the feature name table QEMU writes lists them.
FEATURE_NAMES: tuple[tuple[int, int, str], ...] = (
    (0, 0, "dirty bit"),
    (0, 1, "corrupt bit"),
    (0, 2, "external data file"),
    (0, 3, "compression type"),
    (0, 4, "extended L2 entries"),
    (1, 0, "lazy refcounts"),
    (2, 0, "bitmaps"),
    (2, 1, "raw external data"),
)
FEATURE_ENTRY = struct.Struct(">BB46s")


class Extension(NamedTuple):
    """A header extension kept as raw bytes (unknown ones are preserved verbatim)."""

    type: int
    data: bytes


class Header(NamedTuple):
    """The decoded qcow2 header and its extensions (immutable: ``with_changes`` makes a
    changed copy).

    ``extensions`` holds every extension except the backing format and the feature table,
    which are decoded into fields, in file order; ``feature_table`` is re-generated on write.
    The value classes of this module are named tuples rather than dataclasses: the
    ``dataclasses`` module (with ``inspect``) costs short-lived commands milliseconds.
    """

    version: int
    cluster_bits: int
    size: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    backing_file: str | None = None
    backing_format: str | None = None
    crypt_method: int = 0
    nb_snapshots: int = 0
    snapshots_offset: int = 0
    incompatible: int = 0
    compatible: int = 0
    autoclear: int = 0
    refcount_order: int = 4
    header_length: int = V3_HEADER_LENGTH_WITH_COMPRESSION
    compression_type: int = CompressionType.ZLIB
    extra_fields: bytes = b""  # unknown additional header fields past byte 105, preserved
    extensions: tuple[Extension, ...] = ()
    has_feature_table: bool = True

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def refcount_bits(self) -> int:
        return 1 << self.refcount_order

    def with_changes(self, **changes: Any) -> Header:
        return self._replace(**changes)

    def extension(self, kind: int) -> Extension | None:
        for ext in self.extensions:
            if ext.type == kind:
                return ext
        return None


def _cstring(data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise CorruptImage(f"qcow2: {what} is not valid UTF-8") from err


def decode_header(cluster0: bytes, file_size: int) -> Header:
    """Decodes and validates the header from the image's first cluster (or more).

    ``cluster0`` must hold at least the header, its extensions and the backing file name;
    callers read ``min(file size, 2 MiB)`` bytes, which always suffices.

    Raises:
        CorruptImage: the header is malformed or points outside any sane range.
        UnsupportedImage: valid, but uses features we do not implement.
    """
    if len(cluster0) < V2_HEADER_LENGTH:
        raise CorruptImage("qcow2: image is too short to hold a header")
    fields = HEADER_V2.unpack_from(cluster0)
    (magic, version, backing_off, backing_len, cluster_bits, size, crypt, l1_size, l1_off,
     reft_off, reft_clusters, nb_snapshots, snapshots_off) = fields  # fmt: skip
    if magic != MAGIC:
        raise CorruptImage("Image is not in qcow2 format")
    if version not in (2, 3):
        raise UnsupportedImage(f"qcow2: unsupported qcow2 version {version}")
    if not MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
        raise CorruptImage(f"qcow2: unsupported cluster size: 2^{cluster_bits}")
    incompat = compat = autoclear = 0
    refcount_order, header_length, compression = 4, V2_HEADER_LENGTH, 0
    extra = b""
    if version >= 3:
        if len(cluster0) < V3_HEADER_LENGTH:
            raise CorruptImage("qcow2: image is too short to hold a version 3 header")
        incompat, compat, autoclear, refcount_order, header_length = HEADER_V3_EXTRA.unpack_from(
            cluster0, V2_HEADER_LENGTH
        )
        if header_length < V3_HEADER_LENGTH or header_length % 8:
            raise CorruptImage(f"qcow2: invalid header length {header_length}")
        if header_length > len(cluster0) or header_length > (1 << cluster_bits):
            raise CorruptImage("qcow2: header length exceeds the first cluster")
        if header_length > V3_HEADER_LENGTH:
            compression = cluster0[V3_HEADER_LENGTH]
            extra = bytes(cluster0[V3_HEADER_LENGTH + 1 : header_length])
    _check_features(incompat, compression, refcount_order, crypt)
    cluster_size = 1 << cluster_bits
    _check_table("L1 table", l1_off, l1_size * 8, cluster_size, file_size, MAX_L1_BYTES)
    _check_table(
        "refcount table",
        reft_off,
        reft_clusters * cluster_size,
        cluster_size,
        file_size,
        MAX_REFCOUNT_TABLE_BYTES,
    )
    if reft_clusters == 0:
        raise CorruptImage("qcow2: image has no refcount table")
    if l1_size < l1_entries_needed(size, cluster_bits):
        raise CorruptImage(f"qcow2: L1 table is too small ({l1_size}) for the image size")
    if nb_snapshots and snapshots_off % cluster_size:
        raise CorruptImage("qcow2: snapshot table offset invalid")
    ext_start = header_length if version >= 3 else V2_HEADER_LENGTH
    ext_end = backing_off if backing_off else min(len(cluster0), cluster_size)
    backing_format, extensions, has_table = _decode_extensions(cluster0, ext_start, ext_end)
    backing = None
    if backing_off:
        if backing_len > MAX_BACKING_FILE_NAME or backing_len == 0:
            raise CorruptImage(f"qcow2: backing file name too long ({backing_len} bytes)")
        if backing_off + backing_len > min(len(cluster0), cluster_size):
            raise CorruptImage("qcow2: backing file name lies outside the first cluster")
        backing = _cstring(cluster0[backing_off : backing_off + backing_len], "backing file")
    return Header(
        version=version,
        cluster_bits=cluster_bits,
        size=size,
        l1_size=l1_size,
        l1_table_offset=l1_off,
        refcount_table_offset=reft_off,
        refcount_table_clusters=reft_clusters,
        backing_file=backing,
        backing_format=backing_format,
        crypt_method=crypt,
        nb_snapshots=nb_snapshots,
        snapshots_offset=snapshots_off,
        incompatible=incompat,
        compatible=compat,
        autoclear=autoclear,
        refcount_order=refcount_order,
        header_length=header_length,
        compression_type=compression,
        extra_fields=extra,
        extensions=tuple(extensions),
        has_feature_table=has_table,
    )


def _check_features(incompat: int, compression: int, refcount_order: int, crypt: int) -> None:
    unknown = incompat & ~int(KNOWN_INCOMPAT)
    if unknown:
        names = [name for kind, bit, name in FEATURE_NAMES if kind == 0 and unknown & (1 << bit)]
        bits = [f"bit {b}" for b in range(64) if unknown & (1 << b)]
        raise UnsupportedImage(
            "qcow2: Unsupported incompatible features: " + ", ".join(names or bits)
        )
    if incompat & Incompat.COMPRESSION:
        if compression not in (CompressionType.ZSTD,):
            raise UnsupportedImage(f"qcow2: unknown compression type {compression}")
    elif compression != 0:
        raise CorruptImage("qcow2: compression type set without the compression-type bit")
    if refcount_order > 6:
        raise CorruptImage(f"qcow2: refcount order {refcount_order} is larger than 6")
    if crypt:
        raise UnsupportedImage("qcow2: encrypted images are not supported")


def _check_table(
    what: str, offset: int, length: int, cluster_size: int, file_size: int, limit: int
) -> None:
    if length > limit:
        raise CorruptImage(f"qcow2: {what} is too large ({length} bytes)")
    if offset % cluster_size:
        raise CorruptImage(f"qcow2: {what} offset {offset:#x} is not cluster-aligned")
    if length and (offset == 0 or offset + length > max(file_size, 0) + cluster_size):
        raise CorruptImage(f"qcow2: {what} at {offset:#x} lies past the end of the file")


def _decode_extensions(
    data: bytes, start: int, end: int
) -> tuple[str | None, list[Extension], bool]:
    backing_format = None
    has_table = False
    extensions: list[Extension] = []
    pos = start
    while pos + EXTENSION.size <= end:
        kind, length = EXTENSION.unpack_from(data, pos)
        if kind == Ext.END:
            break
        body_start = pos + EXTENSION.size
        if body_start + length > end:
            raise CorruptImage(f"qcow2: header extension {kind:#x} overruns the header")
        body = bytes(data[body_start : body_start + length])
        if kind == Ext.BACKING_FORMAT:
            backing_format = _cstring(body, "backing format")
        elif kind == Ext.FEATURE_TABLE:
            has_table = True
        elif kind == Ext.DATA_FILE:
            raise UnsupportedImage("qcow2: external data files are not supported")
        else:
            extensions.append(Extension(kind, body))
        pos = body_start + align_up(length, 8)
    return backing_format, extensions, has_table


def encode_header(header: Header, cluster_size: int | None = None) -> bytes:
    """Encodes the header, its extensions and the backing file name (in that order).

    Raises:
        CorruptImage: the encoded header would not fit in the first cluster.
    """
    limit = cluster_size or header.cluster_size
    body = bytearray()
    backing = header.backing_file.encode() if header.backing_file else b""
    head = bytearray(HEADER_V2.size)
    fixed_len = V2_HEADER_LENGTH if header.version == 2 else header.header_length
    body += bytes(fixed_len - V2_HEADER_LENGTH)
    if header.version >= 3:
        HEADER_V3_EXTRA.pack_into(
            body,
            0,
            header.incompatible,
            header.compatible,
            header.autoclear,
            header.refcount_order,
            header.header_length,
        )
        if header.header_length > V3_HEADER_LENGTH:
            body[V3_HEADER_LENGTH - V2_HEADER_LENGTH] = header.compression_type
            extra = header.extra_fields[: header.header_length - V3_HEADER_LENGTH - 1]
            at = V3_HEADER_LENGTH - V2_HEADER_LENGTH + 1
            body[at : at + len(extra)] = extra
    fmt_ext = b""
    if header.backing_format:
        fmt_ext = _extension(Ext.BACKING_FORMAT, header.backing_format.encode())
    others = b"".join(_extension(ext.type, ext.data) for ext in header.extensions)
    end_ext = EXTENSION.pack(Ext.END, 0)
    table = _extension(Ext.FEATURE_TABLE, feature_table())
    # Like QEMU, carry the (informative) feature name table only where it fits with room
    # to spare: 512-byte-cluster images go without.
    used = HEADER_V2.size + len(body) + len(fmt_ext) + len(others) + len(end_ext) + len(backing)
    if header.version < 3 or not header.has_feature_table or used + len(table) >= limit:
        table = b""
    exts = fmt_ext + table + others + end_ext
    backing_offset = HEADER_V2.size + len(body) + len(exts) if backing else 0
    HEADER_V2.pack_into(
        head,
        0,
        MAGIC,
        header.version,
        backing_offset,
        len(backing),
        header.cluster_bits,
        header.size,
        header.crypt_method,
        header.l1_size,
        header.l1_table_offset,
        header.refcount_table_offset,
        header.refcount_table_clusters,
        header.nb_snapshots,
        header.snapshots_offset,
    )
    encoded = bytes(head + body + exts + backing)
    if len(encoded) > limit:
        raise CorruptImage(f"qcow2: the header ({len(encoded)} bytes) does not fit in a cluster")
    return encoded


def _extension(kind: int, data: bytes) -> bytes:
    pad = align_up(len(data), 8) - len(data)
    return EXTENSION.pack(kind, len(data)) + data + bytes(pad)


def feature_table() -> bytes:
    """The feature name table extension body QEMU-compatible images carry."""
    return b"".join(FEATURE_ENTRY.pack(k, b, n.encode()) for k, b, n in FEATURE_NAMES)


# -- offset arithmetic --------------------------------------------------------------------


def align_up(value: int, alignment: int) -> int:
    return (value + alignment - 1) // alignment * alignment


def align_down(value: int, alignment: int) -> int:
    return value // alignment * alignment


def l2_entries(cluster_bits: int) -> int:
    """Entries per L2 table (8-byte entries; extended L2 is not supported)."""
    return 1 << (cluster_bits - 3)


def l1_entries_needed(size: int, cluster_bits: int) -> int:
    """L1 entries needed to map ``size`` guest bytes."""
    per_l2_bytes = l2_entries(cluster_bits) << cluster_bits
    return (size + per_l2_bytes - 1) // per_l2_bytes


def split_guest_offset(offset: int, cluster_bits: int) -> tuple[int, int, int]:
    """Guest offset -> (L1 index, L2 index, offset within the cluster)."""
    cluster = offset >> cluster_bits
    shift = cluster_bits - 3
    return cluster >> shift, cluster & ((1 << shift) - 1), offset & ((1 << cluster_bits) - 1)


def refcount_entries(cluster_bits: int, refcount_order: int) -> int:
    """Refcount entries per refcount block."""
    return 1 << (cluster_bits + 3 - refcount_order)


def split_host_cluster(host_offset: int, cluster_bits: int, refcount_order: int) -> tuple[int, int]:
    """Host offset -> (refcount table index, index in the refcount block)."""
    cluster = host_offset >> cluster_bits
    shift = cluster_bits + 3 - refcount_order
    return cluster >> shift, cluster & ((1 << shift) - 1)


class CompressedDescriptor(NamedTuple):
    """Where a compressed cluster's data lies: its host offset and the bytes to read."""

    host_offset: int
    length: int


def decode_compressed(entry: int, cluster_bits: int) -> CompressedDescriptor:
    """Decodes a compressed L2 entry (bit 62 set) into offset and maximal length."""
    x = 62 - (cluster_bits - 8)
    offset = entry & ((1 << x) - 1)
    sectors = (entry >> x) & ((1 << (cluster_bits - 8)) - 1)
    length = (sectors + 1) * 512 - (offset & 511)
    return CompressedDescriptor(offset, length)


def encode_compressed(host_offset: int, length: int, cluster_bits: int) -> int:
    """Encodes a compressed L2 entry for ``length`` bytes of data at ``host_offset``."""
    x = 62 - (cluster_bits - 8)
    last_sector = (host_offset + length - 1) >> 9
    extra_sectors = last_sector - (host_offset >> 9)
    return OFLAG_COMPRESSED | (extra_sectors << x) | host_offset


class RefcountCodec:
    """Reads and writes refcount entries of any width (1 to 64 bits) in a block buffer."""

    def __init__(self, refcount_order: int) -> None:
        self.order = refcount_order
        self.bits = 1 << refcount_order
        self.max = (1 << self.bits) - 1

    def get(self, block: bytes | bytearray | memoryview, index: int) -> int:
        bits = self.bits
        if bits >= 8:
            width = bits // 8
            start = index * width
            return int.from_bytes(block[start : start + width], "big")
        per_byte = 8 // bits
        byte = block[index // per_byte]
        shift = (index % per_byte) * bits
        return (byte >> shift) & self.max

    def set(self, block: bytearray, index: int, value: int) -> None:
        if not 0 <= value <= self.max:
            raise CorruptImage(f"qcow2: refcount {value} overflows {self.bits} bits")
        bits = self.bits
        if bits >= 8:
            width = bits // 8
            start = index * width
            block[start : start + width] = value.to_bytes(width, "big")
            return
        per_byte = 8 // bits
        shift = (index % per_byte) * bits
        pos = index // per_byte
        block[pos] = (block[pos] & ~(self.max << shift) & 0xFF) | (value << shift)


# -- L2 entries -----------------------------------------------------------------------------


class Cluster(IntEnum):
    """What a standard (non-extended) L2 entry describes ("Cluster mapping")."""

    UNALLOCATED = 0  # reads from the backing file (zeros without one)
    ZERO_PLAIN = 1  # reads as zeros, no host cluster
    ZERO_ALLOC = 2  # reads as zeros, keeps a (preallocated) host cluster
    NORMAL = 3  # data in the host cluster
    COMPRESSED = 4  # compressed data, see decode_compressed


def l2_kind(entry: int) -> Cluster:
    """Classifies an L2 entry; alignment is checked by ``l2_host``."""
    if entry & OFLAG_COMPRESSED:
        return Cluster.COMPRESSED
    host = entry & OFFSET_MASK
    if entry & OFLAG_ZERO:
        return Cluster.ZERO_ALLOC if host else Cluster.ZERO_PLAIN
    return Cluster.NORMAL if host else Cluster.UNALLOCATED


def l2_host(entry: int, cluster_bits: int) -> int:
    """The host offset of a standard entry.

    Raises:
        CorruptImage: the offset is not aligned to a cluster.
    """
    host = entry & OFFSET_MASK
    if host & ((1 << cluster_bits) - 1):
        raise CorruptImage(f"qcow2: cluster allocation offset {host:#x} unaligned")
    return host


def compressed_clusters(entry: int, cluster_bits: int) -> tuple[int, int]:
    """Host clusters a compressed entry holds a reference on: (first index, count).

    The referenced range is the sectors of the descriptor, as ``qemu-img check`` counts it.
    """
    desc = decode_compressed(entry, cluster_bits)
    start = desc.host_offset & ~511
    end = desc.host_offset + desc.length
    first = start >> cluster_bits
    return first, ((end - 1) >> cluster_bits) - first + 1
