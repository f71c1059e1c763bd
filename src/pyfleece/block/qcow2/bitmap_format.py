"""qcow2 persistent bitmaps: the bitmaps header extension and the bitmap directory
(qemu-docs-interop-qcow2.rst, "Bitmaps extension", "Bitmap directory"): pure decoding,
no I/O. Validation follows QEMU's limits, so a hostile directory cannot make a reader
allocate without bound.
"""

from __future__ import annotations

import struct
from enum import IntFlag
from typing import NamedTuple

from pyfleece.block.qcow2.format import BITMAPS_EXTENSION, align_up
from pyfleece.errors import CorruptImage


class BitmapFlag(IntFlag):
    IN_USE = 1 << 0
    AUTO = 1 << 1
    EXTRA_DATA_COMPATIBLE = 1 << 2


# Bitmap directory entry: bitmap_table_offset u64 | bitmap_table_size u32 | flags u32 |
#  type u8 | granularity_bits u8 | name_size u16 | extra_data_size u32 |
#  extra_data | name | padding to 8 bytes
BITMAP_DIR_ENTRY = struct.Struct(">QIIBBHI")
BITMAP_FLAGS_OFFSET = 12  # where ``flags`` lies inside an entry
MAX_BITMAPS = 65535
#: QEMU's limit on the directory size: 1 KiB per bitmap.
MAX_BITMAP_DIRECTORY = MAX_BITMAPS * 1024


class BitmapsExtension(NamedTuple):
    nb_bitmaps: int
    directory_size: int
    directory_offset: int


class BitmapEntry(NamedTuple):
    """One bitmap directory entry; ``position`` is its byte offset inside the directory."""

    position: int
    table_offset: int
    table_size: int
    flags: int
    type: int
    granularity_bits: int
    name: str


def decode_bitmaps_extension(data: bytes, cluster_size: int) -> BitmapsExtension:
    """Decodes and validates the bitmaps header extension.

    Raises:
        CorruptImage: the extension is malformed or out of QEMU's limits.
    """
    if len(data) < BITMAPS_EXTENSION.size:
        raise CorruptImage(f"qcow2: bitmaps extension is too short ({len(data)} bytes)")
    nb, _reserved, size, offset = BITMAPS_EXTENSION.unpack_from(data)
    if not 1 <= nb <= MAX_BITMAPS:
        raise CorruptImage(f"qcow2: invalid number of bitmaps ({nb})")
    if size > MAX_BITMAP_DIRECTORY or size < nb * BITMAP_DIR_ENTRY.size:
        raise CorruptImage(f"qcow2: invalid bitmap directory size ({size})")
    if offset == 0 or offset % cluster_size:
        raise CorruptImage(f"qcow2: invalid bitmap directory offset {offset:#x}")
    return BitmapsExtension(nb, size, offset)


def decode_bitmap_directory(data: bytes, nb_bitmaps: int) -> list[BitmapEntry]:
    """Decodes ``nb_bitmaps`` entries from the directory bytes.

    Raises:
        CorruptImage: an entry overruns the directory or is malformed.
    """
    entries = []
    pos = 0
    for _ in range(nb_bitmaps):
        if pos + BITMAP_DIR_ENTRY.size > len(data):
            raise CorruptImage("qcow2: bitmap directory entry overruns the directory")
        table_off, table_size, flags, kind, gran, name_size, extra = BITMAP_DIR_ENTRY.unpack_from(
            data, pos
        )
        name_at = pos + BITMAP_DIR_ENTRY.size + extra
        end = align_up(name_at + name_size, 8)
        if name_size == 0 or end > len(data):
            raise CorruptImage("qcow2: bitmap directory entry overruns the directory")
        name = _name(bytes(data[name_at : name_at + name_size]))
        entries.append(BitmapEntry(pos, table_off, table_size, flags, kind, gran, name))
        pos = end
    return entries


def _name(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise CorruptImage("qcow2: bitmap name is not valid UTF-8") from err
