"""Where a qcow2 source's guest ranges lie, read straight from its tables: convert's fast
path from a qcow2 image (qcow2 spec, "Cluster mapping").

The driver answers block status one segment at a time (walking the L2 entries, then asking
the host file whether the data is a hole) and walks the entries again for each read; for a
whole image that was two thirds of convert's reading time. Convert reads a source once,
front to back, opened read-only, so this module reads each L2 table once and turns it into
runs: data at a host offset (which ``copy`` then reads straight from the image's file,
with the same call the driver would make), zeros, unallocated ranges (which the backing
chain provides, or zeros without one) and compressed clusters (read through the node).

The checks are the driver's, with its wording (``core._errors``): reserved bits in an L1
entry, an L2 table unaligned or past the end of the file, a data cluster unaligned, a zero
cluster in a version 2 image: ``BlockError(EIO, "<node>: qcow2: ...")``. Images with an
external data file, encryption or extended L2 entries never get here (the driver refuses
to open them). A data cluster that is a hole in the host file is read (as zeros, which the
zero scan then leaves out), as qemu-img does for images it does not think preallocated.
"""

from __future__ import annotations

import errno
from array import array
from collections.abc import Iterator

from pyfleece.block.node import Node
from pyfleece.block.qcow2.format import (
    L1_RESERVED,
    OFFSET_MASK,
    OFLAG_COMPRESSED,
    OFLAG_ZERO,
    Header,
)
from pyfleece.block.qcow2.tables import be_array
from pyfleece.errors import BlockError

#: ``where`` of a run that reads as zeros
ZERO = -1
#: ``where`` of a run no cluster of this image allocates (the backing chain provides it)
UNALLOCATED = -2
#: ``where`` of a run of compressed clusters (read through the node, which decompresses)
COMPRESSED = -3

Run = tuple[int, int, int]  # (guest offset, length, host offset | ZERO | UNALLOCATED | ...)

#: host offsets from which a run of one L2 table's clusters could overflow the offset field
_TOP = OFFSET_MASK - (1 << 39)  # 2 MiB clusters * 2^18 entries: the largest table span


def qcow2_runs(node: Node, header: Header, file: Node) -> Iterator[Run]:
    """The runs covering ``node`` (a qcow2 node over ``file``), in guest order; neighbours
    of a kind are merged (data only where their host ranges continue each other).

    Raises:
        BlockError: EIO for malformed tables (see the module docstring), or the I/O error
            met reading them.
    """
    merged: Run | None = None
    for run in _table_runs(node, header, file):
        if merged is not None:
            start, length, where = merged
            if start + length == run[0] and (
                where == run[2] if where < 0 else where + length == run[2]
            ):
                merged = (start, length + run[1], where)
                continue
            yield merged
        merged = run
    if merged is not None:
        yield merged


def _table_runs(node: Node, header: Header, file: Node) -> Iterator[Run]:
    cb = header.cluster_bits
    cs = 1 << cb
    span = cs << (cb - 3)  # guest bytes one L2 table maps
    size = node.size
    l1 = be_array("Q", _read(file, header.l1_table_offset, header.l1_size * 8))
    for index in range(-(-size // span)):
        base = index * span
        end = min(size, base + span)
        entry = l1[index] if index < len(l1) else 0
        if entry & L1_RESERVED:
            raise _corrupt(node, f"reserved bits set in L1 entry {index}: {entry:#x}")
        offset = entry & OFFSET_MASK
        if offset == 0:
            yield base, end - base, UNALLOCATED
            continue
        if offset % cs or offset + cs > file.size:
            raise _corrupt(
                node,
                f"L2 table at {offset:#x} (L1 index {index}) is unaligned or past the end "
                "of the file",
            )
        entries = be_array("Q", _read(file, offset, cs))
        yield from _entry_runs(node, entries, base, end, cb, header.version >= 3)


def _entry_runs(
    node: Node, entries: array[int], base: int, end: int, cb: int, v3: bool
) -> Iterator[Run]:
    """Runs of one L2 table's entries, for guest [base, end).

    The loop is the hot path: an entry that continues the current run (the next host
    cluster of a data run, or the same value for zeros and unallocated) costs one compare.
    """
    cs = 1 << cb
    start = pos = base
    where = UNALLOCATED
    expect = -1  # the entry that would continue the current run (-1: none can)
    step = 0  # how ``expect`` moves from one cluster to the next
    for entry in entries[: -(-(end - base) // cs)]:
        if entry == expect:
            expect += step
            pos += cs
            continue
        if pos > start:
            yield start, pos - start, where
        start = pos
        where, step = _classify(node, entry, cb, v3)
        expect = entry + step if step >= 0 else -1
        pos += cs
    if end > start:
        yield start, end - start, where


def _classify(node: Node, entry: int, cb: int, v3: bool) -> tuple[int, int]:
    """(where, step) for one L2 entry; step -1: no entry continues it (see ``_entry_runs``).

    Compressed clusters stand alone; so do host offsets so high that a following cluster
    could carry into the flag bits (the driver masks those, and so does the next call).
    """
    if entry & OFLAG_COMPRESSED:
        return COMPRESSED, -1
    host = entry & OFFSET_MASK
    cs = 1 << cb
    step = cs if host < _TOP else -1
    if host & (cs - 1):
        raise _corrupt(node, f"cluster allocation offset {host:#x} unaligned")
    if entry & OFLAG_ZERO:
        if not v3:
            raise _corrupt(node, f"zero cluster entry in a version 2 image: {entry:#x}")
        return ZERO, step if host else 0
    if host == 0:
        return UNALLOCATED, 0
    return host, step


def _read(file: Node, offset: int, length: int) -> bytearray:
    buf = bytearray(length)
    if length:
        file.readinto(offset, memoryview(buf))
    return buf


def _corrupt(node: Node, message: str) -> BlockError:
    return BlockError(errno.EIO, f"{node.node_name}: qcow2: {message}")
