"""The qcow2 node's state, read path, block status and metadata write-back.

Locking: ``_lock`` (the metadata lock) guards the L1/L2/refcount state, the set of guest
clusters being allocated (``_busy``) and the list of deferred frees. It is never held across
guest data I/O. ``_flush_lock`` serialises write-backs; it is taken before ``_lock``.

Crash safety (see docs/qcow2.md): L2 tables, the L1 table and refcount blocks are cached and
written back together, refcounts first, then (after a sync) L2 tables, then (after a sync)
L1 entries. Data is written before the L2 entry that points to it changes in memory, so it
also precedes it on disk. A dropped reference (discard, zeroing, copy-on-write) releases its
clusters only after the table change is durable *and* every request that might still use
the old mapping has finished (a grace period read off the node's request tracker): so a
read never returns another guest cluster's data, and a refcount never reaches 0 on disk
while a table on disk still points to the cluster.
"""

from __future__ import annotations

import errno
import threading
from array import array
from collections.abc import Iterator
from contextlib import contextmanager

from pyfleece.block.node import Extent, Node
from pyfleece.block.qcow2.bitmaps import bitmap_metadata
from pyfleece.block.qcow2.compress import decompress_cluster
from pyfleece.block.qcow2.format import (
    Cluster,
    Header,
    compressed_clusters,
    decode_compressed,
    l2_host,
    l2_kind,
)
from pyfleece.block.qcow2.mapping import Mapping
from pyfleece.block.qcow2.refcounts import Refcounts
from pyfleece.block.qcow2.snapshot_format import MAX_SNAPSHOT_TABLE, snapshot_extents
from pyfleece.block.tracking import ReqKind
from pyfleece.errors import BlockError, CorruptImage, ImageError

_ZEROS = memoryview(bytes(1 << 20))

#: (kind, guest offset, length, host offset or L2 entry)
Seg = tuple[Cluster, int, int, int]


def zero_fill(view: memoryview) -> None:
    for start in range(0, len(view), len(_ZEROS)):
        end = min(start + len(_ZEROS), len(view))
        view[start:end] = _ZEROS[: end - start]


def fixed_metadata(file: Node, header: Header) -> list[tuple[int, int]]:
    """Metadata no allocation may overlap, as (offset, bytes): the header, the active L1
    table, the snapshot table and snapshot L1 tables, the bitmap directory and tables.

    Raises:
        CorruptImage: the snapshot table is malformed or runs past the end of the file.
    """
    ranges = [(0, header.cluster_size), (header.l1_table_offset, header.l1_size * 8)]
    if header.nb_snapshots:
        ranges += _snapshot_metadata(file, header)
    return ranges + bitmap_metadata(file, header)


def _snapshot_metadata(file: Node, header: Header) -> list[tuple[int, int]]:
    want = header.cluster_size
    while True:
        n = max(0, min(want, file.size - header.snapshots_offset, MAX_SNAPSHOT_TABLE))
        data = bytearray(n)
        file.readinto(header.snapshots_offset, memoryview(data))
        found = snapshot_extents(bytes(data), header.nb_snapshots)
        if found is not None:
            length, l1_tables = found
            return [(header.snapshots_offset, length), *l1_tables]
        if n < want or n >= MAX_SNAPSHOT_TABLE:
            raise CorruptImage("qcow2: the snapshot table runs past the end of the file")
        want *= 4


class _Frees:
    """Runs of clusters whose reference was dropped, to be released once the table change
    is durable (write-back generation ``gen``) and no request that started up to tracker
    sequence number ``seq`` is still in flight. ``runs`` holds (first, count) pairs."""

    __slots__ = ("gen", "runs", "seq")

    def __init__(self, gen: int, seq: int) -> None:
        self.gen = gen
        self.seq = seq
        self.runs = array("Q")


class Qcow2Core(Node):
    """State, reads, status and write-back of a qcow2 node (writes: ``writes.py``)."""

    driver = "qcow2"

    def __init__(
        self,
        node_name: str,
        file: Node,
        header: Header,
        *,
        owned: bool,
        read_only: bool,
        l2_cache: int,
        refcount_cache: int,
    ) -> None:
        super().__init__(node_name, read_only=read_only)
        self.file = file
        self.header = header
        self.cluster_bits = cb = header.cluster_bits
        self.cluster_size = header.cluster_size
        self.l2_bits = cb - 3
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._flush_lock = threading.Lock()
        self.map = Mapping(file, header, cache_bytes=l2_cache)
        self.rc: Refcounts | None = None
        if not read_only:
            self.rc = Refcounts(
                file,
                header,
                cache_bytes=refcount_cache,
                protected=fixed_metadata(file, header),
                live=self.map.l2_at,
            )
        self._busy: set[int] = set()
        self._pending: list[_Frees] = []
        self._gen = 0
        self._durable_gen = -1
        # Last: a failed constructor must not leave a reference on the file node.
        self.attach_child("file", file, owned=owned)

    @property
    def size(self) -> int:
        return self.header.size

    @contextmanager
    def _errors(self) -> Iterator[None]:
        """Metadata found inconsistent fails the request with EIO, naming the problem."""
        try:
            yield
        except CorruptImage as err:
            raise BlockError(errno.EIO, f"{self.node_name}: {err}") from err

    # -- mapping ------------------------------------------------------------------------------

    def _segments(self, offset: int, length: int, *, status: bool = False) -> list[Seg]:
        """How [offset, offset + length) maps, up to the end of its L2 table (under _lock).

        Neighbouring clusters that read alike merge; with ``status``, compressed clusters
        merge too and only the first segment is returned.
        """
        cb, cs = self.cluster_bits, self.cluster_size
        cluster = offset >> cb
        l1_index, l2_index = cluster >> self.l2_bits, cluster & ((1 << self.l2_bits) - 1)
        end = min(offset + length, (l1_index + 1) << (self.l2_bits + cb))
        self.map.trim()
        table = self.map.table(l1_index)
        if table is None:
            return [(Cluster.UNALLOCATED, offset, end - offset, 0)]
        entries = table.entries
        segs: list[Seg] = []
        pos = offset
        v2 = self.header.version < 3
        while pos < end:
            entry = entries[l2_index]
            l2_index += 1
            n = min(cs - (pos & (cs - 1)), end - pos)
            kind = l2_kind(entry)
            ref = 0
            if kind == Cluster.COMPRESSED:
                ref = entry
            elif kind == Cluster.NORMAL or kind == Cluster.ZERO_ALLOC:
                ref = l2_host(entry, cb) + (pos & (cs - 1))
            if v2 and (kind == Cluster.ZERO_PLAIN or kind == Cluster.ZERO_ALLOC):
                raise CorruptImage(f"qcow2: zero cluster entry in a version 2 image: {entry:#x}")
            if segs:
                pk, po, pn, pr = segs[-1]
                if pk == kind and (
                    kind == Cluster.UNALLOCATED
                    or kind == Cluster.ZERO_PLAIN
                    or (kind == Cluster.COMPRESSED and status)
                    or (kind != Cluster.COMPRESSED and pr + pn == ref)
                ):
                    segs[-1] = (pk, po, pn + n, pr)
                    pos += n
                    continue
                if status:
                    return segs
            segs.append((kind, pos, n, ref))
            pos += n
        return segs

    # -- reads --------------------------------------------------------------------------------

    def _readinto(self, offset: int, buf: memoryview) -> None:
        total = len(buf)
        done = 0
        with self._errors():
            while done < total:
                with self._lock:
                    segs = self._segments(offset + done, total - done)
                for kind, goff, n, ref in segs:
                    self._read_segment(kind, goff, ref, buf[goff - offset : goff - offset + n])
                done = segs[-1][1] + segs[-1][2] - offset

    def _read_segment(self, kind: Cluster, goff: int, ref: int, view: memoryview) -> None:
        if kind == Cluster.NORMAL:
            self.file.readinto(ref, view)
        elif kind == Cluster.UNALLOCATED:
            self._read_backing(goff, view)
        elif kind == Cluster.COMPRESSED:
            within = goff & (self.cluster_size - 1)
            view[:] = self._decompress(ref)[within : within + len(view)]
        else:
            zero_fill(view)

    def _read_backing(self, offset: int, view: memoryview) -> None:
        """Guest data the backing provides: zeros past its end, or without one."""
        backing = self.child("backing")
        n = len(view)
        avail = 0 if backing is None else max(0, min(n, backing.size - offset))
        if backing is not None and avail:
            backing.readinto(offset, view[:avail])
        if avail < n:
            zero_fill(view[avail:])

    def _decompress(self, entry: int) -> bytes:
        desc = decode_compressed(entry, self.cluster_bits)
        if desc.host_offset >= self.file.size:
            raise CorruptImage(f"qcow2: compressed cluster at {desc.host_offset:#x} past EOF")
        data = bytearray(desc.length)
        self.file.readinto(desc.host_offset, memoryview(data))
        return decompress_cluster(bytes(data), self.cluster_size, self.header.compression_type)

    def _guest_bytes(self, entry: int, offset: int, length: int) -> bytearray:
        """What [offset, offset + length) of one guest cluster reads as under ``entry``
        (used to fill the parts of a cluster a write does not cover)."""
        buf = bytearray(length)
        valid = max(0, min(length, self.size - offset))
        if valid:
            kind = l2_kind(entry)
            ref = entry
            if kind == Cluster.NORMAL:
                ref = l2_host(entry, self.cluster_bits) + (offset & (self.cluster_size - 1))
            self._read_segment(kind, offset, ref, memoryview(buf)[:valid])
        return buf

    # -- block status -------------------------------------------------------------------------

    def _block_status(self, offset: int, length: int) -> Extent:
        with self._errors():
            with self._lock:
                kind, _, n, ref = self._segments(offset, length, status=True)[0]
            if kind == Cluster.NORMAL:
                # A hole in the host file reads as zeros (QEMU looks only for images it
                # guesses were preallocated; img/map.py reproduces that for qemu-img map).
                host = self.file.block_status(ref, n)
                n = min(n, host.length)
                return Extent(offset, n, True, host.zero, True, 0, ref)
            if kind == Cluster.ZERO_ALLOC:
                return Extent(offset, n, False, True, True, 0, ref)
            if kind == Cluster.ZERO_PLAIN:
                return Extent(offset, n, False, True, True, 0)
            if kind == Cluster.COMPRESSED:
                return Extent(offset, n, True, False, True, 0, None, True)
            backing = self.child("backing")
            if backing is None or offset >= backing.size:
                return Extent(offset, n, False, True, False, 0)
            below = backing.block_status(offset, min(n, backing.size - offset))
            return below._replace(offset=offset, depth=below.depth + 1)

    def can_fast_zero(self) -> bool:
        return self.header.version >= 3 or self.child("backing") is None

    # -- deferred frees -----------------------------------------------------------------------

    def _grace_mark(self) -> int:
        """The newest request that may hold a mapping read before now."""
        seqs = [r.seq for r in self.tracker.in_flight() if r.kind is not ReqKind.FLUSH]
        return max(seqs, default=0)

    def _drop_entry(self, entry: int, mark: int) -> None:
        """Schedules the release of the host clusters an old L2 entry referenced."""
        kind = l2_kind(entry)
        if kind == Cluster.NORMAL or kind == Cluster.ZERO_ALLOC:
            self._free_later(l2_host(entry, self.cluster_bits) >> self.cluster_bits, 1, mark)
        elif kind == Cluster.COMPRESSED:
            first, count = compressed_clusters(entry, self.cluster_bits)
            self._free_later(first, count, mark)

    def _free_later(self, first: int, count: int, mark: int | None = None) -> None:
        seq = self._grace_mark() if mark is None else mark
        last = self._pending[-1] if self._pending else None
        if last is None or last.gen != self._gen or last.seq != seq:
            last = _Frees(self._gen, seq)
            self._pending.append(last)
        runs = last.runs
        if runs and runs[-2] + runs[-1] == first:
            runs[-1] += count
        else:
            runs.extend((first, count))

    def _apply_frees(self) -> None:
        """Releases the deferred frees that are durable and no longer in use (under _lock)."""
        if not self._pending or self.rc is None:
            return
        seqs = [r.seq for r in self.tracker.in_flight() if r.kind is not ReqKind.FLUSH]
        oldest = min(seqs, default=1 << 62)
        keep = []
        for frees in self._pending:
            if frees.gen > self._durable_gen or frees.seq >= oldest:
                keep.append(frees)
                continue
            # Each run leaves the list before it is applied: when a release fails (a
            # refcount would drop below 0: a damaged image), the runs applied before it
            # are never applied again, by a later write-back, to clusters reused since.
            runs = frees.runs
            while runs:
                count = runs.pop()
                self.rc.release(runs.pop(), count)
        self._pending = keep

    # -- write-back and flush -----------------------------------------------------------------

    def _writeback(self) -> None:
        """Writes cached metadata back in crash-safe order, then syncs the file."""
        if self.rc is None:
            return
        with self._flush_lock:
            with self._errors(), self._lock:
                self.rc.write_dirty()
                snap = self.map.snapshot()
                gen = self._gen
                self._gen += 1
            try:
                if snap:
                    self.file.flush()  # refcounts, however written, before the references
                    for table, _, data in snap.tables:
                        self.file.write(table.offset, data)
                    if snap.l1:
                        if snap.tables:
                            self.file.flush()
                        for offset, data in snap.l1:
                            self.file.write(offset, data)
                self.file.flush()
            except BaseException:
                with self._lock:
                    self.map.unwritten(snap)
                raise
            with self._errors(), self._lock:
                self.map.written(snap)
                self._durable_gen = gen
                self._apply_frees()

    def _flush(self) -> None:
        self._writeback()

    def _close(self) -> None:
        if self.rc is None:
            return
        try:
            self._writeback()
            if self.rc.dirty():  # the releases the first pass applied
                self._writeback()
        except (ImageError, BlockError, OSError) as err:
            import logging  # here only: short-lived tools do not import logging at all

            log = logging.getLogger(__name__)
            log.warning("%s: metadata not written back at close: %s", self.node_name, err)
