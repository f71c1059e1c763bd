"""qcow2 internal snapshot table (qemu-docs-interop-qcow2.rst, "Snapshots"): pure decoding
of where the table and each snapshot's L1 table lie, so that writes never allocate over
them. No I/O; limits follow QEMU's.
"""

from __future__ import annotations

import struct

from pyfleece.block.qcow2.format import align_up
from pyfleece.errors import CorruptImage

# Snapshot table entry: l1_table_offset u64 | l1_size u32 | id_str_size u16 | name_size u16 |
#  date_sec u32 | date_nsec u32 | vm_clock_nsec u64 | vm_state_size u32 |
#  extra_data_size u32 | extra data | id | name | padding to 8 bytes
SNAPSHOT_ENTRY = struct.Struct(">QIHHIIQII")
MAX_SNAPSHOTS = 65536
#: QEMU's limit on the whole table.
MAX_SNAPSHOT_TABLE = 64 << 20
MAX_EXTRA_DATA = 1024


def snapshot_extents(data: bytes, nb_snapshots: int) -> tuple[int, list[tuple[int, int]]] | None:
    """The table's length and each snapshot's L1 table as (offset, bytes).

    Returns:
        None when ``data`` is too short to hold the whole table (read more and retry).

    Raises:
        CorruptImage: too many snapshots, or an entry beyond QEMU's limits.
    """
    if nb_snapshots > MAX_SNAPSHOTS:
        raise CorruptImage(f"qcow2: too many snapshots ({nb_snapshots})")
    pos = 0
    l1_tables = []
    for _ in range(nb_snapshots):
        if pos + SNAPSHOT_ENTRY.size > len(data):
            return None
        l1_offset, l1_size, id_size, name_size, *_, extra = SNAPSHOT_ENTRY.unpack_from(data, pos)
        if extra > MAX_EXTRA_DATA:
            raise CorruptImage(f"qcow2: snapshot extra data too large ({extra} bytes)")
        end = pos + SNAPSHOT_ENTRY.size + extra + id_size + name_size
        if end > MAX_SNAPSHOT_TABLE:
            raise CorruptImage("qcow2: snapshot table too large")
        if end > len(data):  # (the padding after the last entry may be missing)
            return None
        pos = align_up(end, 8)
        l1_tables.append((l1_offset, l1_size * 8))
    return pos, l1_tables
