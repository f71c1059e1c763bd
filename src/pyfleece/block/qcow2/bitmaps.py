"""Header state before the first write: autoclear bits and persistent bitmaps
(qemu-docs-interop-qcow2.rst, "autoclear_features", "Bitmaps extension", "Bitmap directory").

We do not maintain bitmaps yet, so before the first change to an image:
- autoclear bits we do not know are cleared (the spec's rule for writers);
- every *enabled* (``auto``) bitmap is marked ``in_use``: it no longer reflects every write.
  Disabled bitmaps do not track writes, so they stay valid. The extension, the directory and
  the bitmap clusters are left in place and keep their refcounts, so ``qemu-img check``
  stays clean and ``qemu-img info`` shows the bitmaps as ``in-use``. (Clearing the bitmaps
  autoclear bit instead would make QEMU drop the extension and report the bitmap clusters
  as leaks.) As QEMU does when it rewrites a directory in place, the autoclear bit is
  cleared (and synced) while the flags change, so a torn directory write is never trusted.
"""

from __future__ import annotations

import struct
from typing import Any

from pyfleece.block.node import Node
from pyfleece.block.qcow2.bitmap_format import (
    BITMAP_FLAGS_OFFSET,
    BitmapEntry,
    BitmapFlag,
    BitmapsExtension,
    decode_bitmap_directory,
    decode_bitmaps_extension,
)
from pyfleece.block.qcow2.format import Autoclear, Ext, Header
from pyfleece.errors import CorruptImage

AUTOCLEAR_AT = 88  # header bytes 88..95
U64 = struct.Struct(">Q")
U32 = struct.Struct(">I")
#: The autoclear bits a writer may leave set: we keep bitmaps consistent (as in use).
KEPT_AUTOCLEAR = int(Autoclear.BITMAPS)


def read_bitmaps(
    file: Node, header: Header, *, inconsistent: bool = False
) -> tuple[BitmapsExtension, list[BitmapEntry]] | None:
    """The bitmaps extension and directory, when the image has consistent bitmaps (or
    any bitmaps, with ``inconsistent``).

    Raises:
        CorruptImage: the extension or directory is malformed.
    """
    ext = header.extension(Ext.BITMAPS)
    if ext is None or header.version < 3:
        return None
    if not inconsistent and not header.autoclear & Autoclear.BITMAPS:
        return None
    bitmaps = decode_bitmaps_extension(ext.data, header.cluster_size)
    if bitmaps.directory_offset + bitmaps.directory_size > file.size:
        raise CorruptImage("qcow2: bitmap directory lies past the end of the file")
    data = bytearray(bitmaps.directory_size)
    file.readinto(bitmaps.directory_offset, memoryview(data))
    return bitmaps, decode_bitmap_directory(bytes(data), bitmaps.nb_bitmaps)


def bitmaps_info(file: Node, header: Header) -> list[dict[str, Any]] | None:
    """The bitmaps as ``qemu-img info`` lists them, or None without (consistent) bitmaps."""
    found = read_bitmaps(file, header)
    if found is None:
        return None
    out = []
    for entry in found[1]:
        flags = []
        if entry.flags & BitmapFlag.IN_USE:
            flags.append("in-use")
        if entry.flags & BitmapFlag.AUTO:
            flags.append("auto")
        out.append({"flags": flags, "name": entry.name, "granularity": 1 << entry.granularity_bits})
    return out


def prepare_for_writes(file: Node, header: Header) -> Header:
    """Makes the header safe to write under; returns it as it now is on disk.

    Raises:
        CorruptImage: the bitmaps extension is malformed.
    """
    if header.version < 3:
        return header
    found = read_bitmaps(file, header)
    keep = KEPT_AUTOCLEAR if header.extension(Ext.BITMAPS) is not None else 0
    autoclear = header.autoclear & keep
    if found is not None:
        bitmaps, entries = found
        mask = BitmapFlag.AUTO | BitmapFlag.IN_USE
        stale = [e for e in entries if e.flags & mask == BitmapFlag.AUTO]
        if stale:
            _write_autoclear(file, header.autoclear & ~Autoclear.BITMAPS & keep)
            for entry in stale:
                at = bitmaps.directory_offset + entry.position + BITMAP_FLAGS_OFFSET
                file.write(at, U32.pack(entry.flags | BitmapFlag.IN_USE))
            file.flush()
            _write_autoclear(file, autoclear)
            return header.with_changes(autoclear=autoclear)
    if autoclear != header.autoclear:
        _write_autoclear(file, autoclear)
    return header.with_changes(autoclear=autoclear)


def _write_autoclear(file: Node, value: int) -> None:
    file.write(AUTOCLEAR_AT, U64.pack(value))
    file.flush()


def bitmap_metadata(file: Node, header: Header) -> list[tuple[int, int]]:
    """Where the bitmap directory and bitmap tables lie, as (offset, bytes); nothing when
    they cannot be read (the first write reports a malformed extension)."""
    try:
        found = read_bitmaps(file, header, inconsistent=True)
    except CorruptImage:
        return []
    if found is None:
        return []
    bitmaps, entries = found
    ranges = [(bitmaps.directory_offset, bitmaps.directory_size)]
    ranges += [(e.table_offset, e.table_size * 8) for e in entries if e.table_offset]
    return ranges
