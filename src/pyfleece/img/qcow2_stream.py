"""A qcow2 image written front to back, for ``convert``: the fast path to a new qcow2.

``convert`` fills a freshly created image in guest order, so nothing needs the general
driver's machinery (caches, copy-on-write, crash ordering, concurrency): this writer hands
out host clusters in sequence as data first arrives for a guest cluster (an L2 table just
before the first data cluster it maps, as QEMU places them), writes data straight to the
file with ``pwritev`` (each range allocated just before with ``fallocate``, see
``copy.Preallocate``), keeps the current L2 table in memory, and at the end writes the L2
and L1 tables and gives the image a fresh refcount structure
(``create.write_refcount_structure``). Guest clusters that only ever receive zeros stay
unallocated (or become zero clusters when a backing file would otherwise show through).

The image is valid only once ``finish`` has run, as with ``qemu-img convert`` (which writes
with cache=unsafe); the result passes ``qemu-img check``.

Invariants: writes arrive in increasing guest offset order (a cluster may receive several
pieces); every allocated cluster is referenced exactly once; OFLAG_COPIED is set on every
L1 and L2 entry that points to a cluster.
"""

from __future__ import annotations

from array import array

from pyfleece.block.file import FileNode
from pyfleece.block.qcow2 import create
from pyfleece.block.qcow2.create import write_refcount_structure
from pyfleece.block.qcow2.format import OFLAG_COPIED, OFLAG_ZERO, Header
from pyfleece.img.targets import Preallocate, pwritev_all, slice_views


class Qcow2Stream:
    """Creates ``path`` as a qcow2 image and fills it in guest order."""

    def __init__(self, path: str, opts: create.CreateOptions) -> None:
        plan = create.plan_image(opts)
        create.write_plan(path, plan, sync=False)
        self.header: Header = plan.header
        self.file = FileNode("#convert-target", path, read_only=False)
        self.fd = self.file.fd
        self.preallocate = Preallocate(self.fd)
        h = self.header
        self.cb, self.cs = h.cluster_bits, h.cluster_size
        self.l2_bits = self.cb - 3
        self.l1 = array("Q", [0]) * h.l1_size
        self.zero_flag = h.version >= 3
        self.backed = bool(h.backing_file)
        cs = self.cs
        self.next_host = -(-plan.file_size // cs) * cs
        self.used = [0]  # header
        l1_end = h.l1_table_offset + h.l1_size * 8
        self.used += range(h.l1_table_offset // cs, -(-l1_end // cs)) if h.l1_size else []
        self.l2_index = -1
        self.l2 = array("Q")

    @property
    def zero_init(self) -> bool:
        """Unwritten ranges read as zeros (no backing file shows through)."""
        return not self.backed

    def _alloc(self) -> int:
        """The next host cluster, for an L2 table (data clusters: ``_reserve``)."""
        host = self.next_host
        self.next_host += self.cs
        self.used.append(host >> self.cb)
        return host

    def _table(self, cluster: int) -> array[int]:
        """The L2 table mapping guest ``cluster``, allocated on first use."""
        index = cluster >> self.l2_bits
        if index != self.l2_index:
            self._put_table()
            self.l2_index = index
            self.l2 = array("Q", [0]) * (1 << self.l2_bits)
            self.l1[index] = self._alloc() | OFLAG_COPIED
        return self.l2

    def _put_table(self) -> None:
        if self.l2_index >= 0:
            table = array("Q", self.l2)
            table.byteswap()
            self.file.write(self.l1[self.l2_index] & ~OFLAG_COPIED, table.tobytes())

    def _reserve(self, offset: int, length: int) -> list[tuple[int, int, int]]:
        """Allocates the clusters of a range about to be written (in guest order, at or after
        everything written so far); returns its (guest start, length, host) runs.

        The loop runs once per cluster (thousands per second of copying), so it works on
        the current L2 table directly, one table at a time.
        """
        cb, cs = self.cb, self.cs
        mask = (1 << self.l2_bits) - 1
        end = offset + length
        runs: list[tuple[int, int, int]] = []
        run_start = run_host = run_end = -1
        pos = offset
        while pos < end:
            first = pos >> cb
            table = self._table(first)  # an L2 table goes before the clusters it maps
            for cluster in range(first, min((end - 1) >> cb, first | mask) + 1):
                entry = table[cluster & mask]
                if entry & ~(OFLAG_COPIED | OFLAG_ZERO) == 0:
                    entry = self.next_host | OFLAG_COPIED
                    table[cluster & mask] = entry
                    self.used.append(self.next_host >> cb)
                    self.next_host += cs
                host = (entry & ~OFLAG_COPIED) + (pos & (cs - 1))
                nxt = min(end, (cluster + 1) << cb)
                if host != run_end:
                    if run_start >= 0:
                        runs.append((run_start, pos - run_start, run_host))
                    run_start, run_host = pos, host
                run_end = host + nxt - pos
                pos = nxt
        runs.append((run_start, pos - run_start, run_host))
        return runs

    def write(self, offset: int, data: list[memoryview]) -> None:
        """Writes guest data (the buffers one after the other) at or after everything
        written so far."""
        runs = self._reserve(offset, sum(len(view) for view in data))
        for start, count, host in runs:
            views = (
                data
                if len(runs) == 1
                else slice_views(data, start - offset, start + count - offset)
            )
            self.preallocate(host, count)
            pwritev_all(self.fd, views, host)

    def zero(self, offset: int, length: int) -> None:
        """Makes [offset, offset + length) read as zeros."""
        if self.zero_init:
            return
        cs, end = self.cs, offset + length
        pos = offset
        while pos < end:
            n = min(end - pos, cs - (pos & (cs - 1)))
            if n == cs and self.zero_flag:
                cluster = pos >> self.cb
                self._table(cluster)[cluster & ((1 << self.l2_bits) - 1)] = OFLAG_ZERO
            else:
                self.write(pos, [memoryview(bytes(n))])
            pos += n

    def finish(self) -> None:
        """Writes the tables and the refcounts: the image is complete."""
        self._put_table()
        self.l2_index = -1
        table = array("Q", self.l1)
        table.byteswap()
        if len(table):
            self.file.write(self.header.l1_table_offset, table.tobytes())
        if self.file.size < self.next_host:
            self.file.truncate(self.next_host)
        refs = array("Q", [0]) * (self.next_host >> self.cb)
        for cluster in self.used:
            refs[cluster] = 1
        self.header = write_refcount_structure(self.file, self.header, refs, sync=False)

    def close(self) -> None:
        self.file.close()
