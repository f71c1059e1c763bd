"""The copy engine of ``convert``: sources' block status in, sparse writes out.

The sources (one or more images, concatenated) are walked by block status, as qemu-img
does: ranges that read as zeros are never read (and, on a target known to read zeros, never
written); ranges that a target's backing file provides are skipped (``-B``); data ranges are
read in large aligned chunks, scanned for all-zero blocks of ``min_sparse`` bytes (qemu's
``-S``, 4 KiB by default) which are left out, and the rest written with few, large writes.
With ``min_sparse`` 0 everything is written, zeros included (a fully allocated target).

Two threads, a pipeline: a reader thread walks the sources, reads each data chunk into one
of a few recycled buffers and scans it; the calling thread takes the chunks in guest order
and writes them. Writes to one host file serialise on its inode lock in the kernel, so
parallel writers gain nothing: measured, two writers spent 15% of the CPU time spinning on
that lock. One writer also means the target sees strictly increasing offsets, which a new
qcow2 (``qcow2_stream``) relies on to lay its clusters out in guest order. Targets
implement ``Target``: a new raw file, a new qcow2 written front to back, or any opened
node (``-n``).
"""

from __future__ import annotations

import enum
import queue
import threading
from collections.abc import Iterable, Iterator
from types import TracebackType
from typing import Protocol

from pyfleece.block.node import Node
from pyfleece.block.qcow2.format import Header
from pyfleece.img.progress import Progress
from pyfleece.img.qcow2_source import COMPRESSED, UNALLOCATED, ZERO, qcow2_runs

CHUNK = 2 << 20
#: buffers in flight between the reader and the writer
DEPTH = 6
#: buffers of continuous data gathered into one write (fewer than DEPTH: the reader goes on)
BATCH_BUFFERS = 4
_ZEROS = bytes(CHUNK)
_ZERO_VIEW = memoryview(_ZEROS)


class Kind(enum.Enum):
    ZERO = "zero"
    DATA = "data"
    BACKING = "backing"  # the target's backing file provides it: skip


class Target(Protocol):
    """Where convert writes: ``write`` and ``zero`` are called from one thread, in
    increasing guest order (a range may follow the previous one in the same cluster)."""

    @property
    def zero_init(self) -> bool:
        """Unwritten ranges of the target read as zeros."""

    def write(self, offset: int, data: list[memoryview]) -> None:
        """Writes the buffers, one after the other, from guest ``offset`` on."""

    def zero(self, offset: int, length: int) -> None: ...

    def finish(self) -> None: ...

    def close(self) -> None: ...


class Source:
    """One source image and where it begins in the concatenation."""

    __slots__ = ("name", "node", "start")

    def __init__(self, node: Node, name: str, start: int) -> None:
        self.node = node
        self.name = name
        self.start = start

    @property
    def size(self) -> int:
        return -(-self.node.size // 512) * 512


#: (guest offset, length, kind, node to read a DATA range from or None for zeros, where in it)
Range = tuple[int, int, Kind, Node | None, int]


class Sources:
    """One or more source images, read as one concatenated disk."""

    def __init__(self, nodes: list[tuple[Node, str]], *, top_only: bool) -> None:
        self.parts: list[Source] = []
        pos = 0
        for node, name in nodes:
            part = Source(node, name, pos)
            self.parts.append(part)
            pos += part.size
        self.size = pos
        self.top_only = top_only

    def ranges(self) -> Iterator[Range]:
        """Ranges covering the whole disk in order; neighbours of a kind are merged (data
        ranges only when they continue each other in the node they are read from)."""
        pending: Range | None = None
        for part in self.parts:
            for item in self._part_ranges(part):
                if pending is not None:
                    offset, length, kind, node, at = pending
                    if (
                        kind == item[2]
                        and offset + length == item[0]
                        and node is item[3]
                        and (node is None or at + length == item[4])
                    ):
                        pending = (offset, length + item[1], kind, node, at)
                        continue
                    yield pending
                pending = item
        if pending is not None:
            yield pending

    def _part_ranges(self, part: Source) -> Iterator[Range]:
        node = part.node
        header = getattr(node, "header", None)
        file = node.child("file")
        if node.driver == "qcow2" and isinstance(header, Header) and file is not None:
            backing = node.child("backing")
            for start, length, where in qcow2_runs(node, header, file):
                if where >= 0:
                    yield part.start + start, length, Kind.DATA, file, where
                elif where == ZERO or (where == UNALLOCATED and backing is None):
                    yield part.start + start, length, Kind.ZERO, None, 0
                elif where == COMPRESSED:
                    yield part.start + start, length, Kind.DATA, node, start
                elif self.top_only:
                    yield part.start + start, length, Kind.BACKING, None, 0
                else:
                    yield from self._status_ranges(part, start, start + length)
        else:
            yield from self._status_ranges(part, 0, node.size)
        if part.size > node.size:  # up to the next 512 bytes: zeros
            yield part.start + node.size, part.size - node.size, Kind.ZERO, None, 0

    def _status_ranges(self, part: Source, offset: int, end: int) -> Iterator[Range]:
        """Ranges of [offset, end) of one part, as its node's block status describes them."""
        node = part.node
        while offset < end:
            ext = node.block_status(offset, end - offset)
            if self.top_only and ext.depth > 0:
                yield part.start + offset, ext.length, Kind.BACKING, None, 0
            elif ext.zero:
                yield part.start + offset, ext.length, Kind.ZERO, None, 0
            else:
                yield part.start + offset, ext.length, Kind.DATA, node, offset
            offset += ext.length


def zero_runs(
    buf: bytearray, length: int, base: int, grain: int
) -> Iterator[tuple[int, int, bool]]:
    """Splits buf[:length] (guest bytes at ``base``) into (start, end, is_zero) runs; zero
    runs are made of whole, ``grain``-aligned blocks of zeros.

    ``bytearray.find`` of a block of zeros skips through data at C speed, so only places
    that hold a long enough run of zeros are looked at block by block.
    """
    if buf.startswith(_ZERO_VIEW[:length]):
        yield 0, length, True
        return
    zero_block = _ZEROS[:grain]
    pos = search = 0
    while True:
        hit = buf.find(zero_block, search, length)
        if hit < 0:
            break
        block = hit + (-(base + hit) % grain)  # the first aligned block at or after it
        if block + grain > length:
            break
        if not buf.startswith(zero_block, block):
            search = block + 1
            continue
        end = block + grain
        while end + grain <= length and buf.startswith(zero_block, end):
            end += grain
        if block > pos:
            yield pos, block, False
        yield block, end, True
        pos = search = end
    if pos < length:
        yield pos, length, False


#: (guest offset, length, kind, node to read from or None for zeros, where in it)
Piece = Range


def pieces(sources: Sources, *, min_sparse: int) -> Iterator[Piece]:
    """The work in guest order: data ranges cut into aligned chunks of at most CHUNK bytes,
    zero ranges whole (as chunks of zeros to write when ``min_sparse`` is 0)."""
    for offset, length, kind, node, at in sources.ranges():
        if kind == Kind.BACKING:
            continue
        if kind == Kind.ZERO and min_sparse:
            yield offset, length, kind, None, 0
            continue
        pos, end = offset, offset + length
        while pos < end:
            nxt = min(end, (pos // CHUNK + 1) * CHUNK)
            yield pos, nxt - pos, Kind.DATA, node, at + pos - offset
            pos = nxt


#: a piece read and scanned: (guest offset, length, kind, buffer, (start, end, is_zero) runs)
Loaded = tuple[int, int, Kind, bytearray | None, list[tuple[int, int, bool]]]


class _ReadAhead:
    """The reading side of the pipeline: a thread that walks the sources, reads and scans
    the data pieces into ``DEPTH`` recycled buffers, and hands them over in guest order.

    Iterating yields the ``Loaded`` pieces; an error met by the reader is raised there.
    The writer gives each buffer back with ``recycle`` once written.
    """

    def __init__(self, work: Iterable[Piece], min_sparse: int) -> None:
        self.work = work
        self.min_sparse = min_sparse
        self.ready: queue.SimpleQueue[Loaded | BaseException | None] = queue.SimpleQueue()
        self.free: queue.SimpleQueue[bytearray | None] = queue.SimpleQueue()
        self.allocated = 0  # buffers are made when first needed: a small image needs one
        self.stopped = False
        self.thread = threading.Thread(target=self._run, name="convert-read", daemon=True)

    def __enter__(self) -> _ReadAhead:
        self.thread.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stopped = True
        self.free.put(None)  # wakes the reader if it waits for a buffer
        self.thread.join()

    def __iter__(self) -> Iterator[Loaded]:
        while (item := self.ready.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item

    def recycle(self, buf: bytearray) -> None:
        self.free.put(buf)

    def _run(self) -> None:
        try:
            for piece in self.work:
                loaded = self._load(piece)
                if loaded is None or self.stopped:
                    return
                self.ready.put(loaded)
        except BaseException as err:  # handed to the writer, which raises it
            self.ready.put(err)
            return
        self.ready.put(None)

    def _buffer(self) -> bytearray | None:
        """A free buffer: a new one while fewer than DEPTH exist, else one recycled."""
        if self.allocated < DEPTH and self.free.empty():
            self.allocated += 1
            return bytearray(CHUNK)
        return self.free.get()

    def _load(self, piece: Piece) -> Loaded | None:
        offset, length, kind, node, at = piece
        if kind != Kind.DATA:
            return offset, length, kind, None, []
        buf = self._buffer()
        if buf is None:  # stopped
            return None
        if node is None:
            buf[:length] = _ZERO_VIEW[:length]
        else:
            node.readinto(at, memoryview(buf)[:length])
        if self.min_sparse:
            runs = list(zero_runs(buf, length, offset, self.min_sparse))
        else:
            runs = [(0, length, False)]
        return offset, length, kind, buf, runs


def copy(sources: Sources, target: Target, *, min_sparse: int, progress: Progress) -> None:
    """Copies the sources' guest contents to the target (see the module docstring)."""
    work: Iterable[Piece] = pieces(sources, min_sparse=min_sparse)
    total = 0
    if progress.enabled:  # the total must be known before the first line
        work = list(work)
        total = sum(piece[1] for piece in work if piece[2] == Kind.DATA)
    done = 0
    zero_init = target.zero_init
    with _ReadAhead(work, min_sparse) as reader:
        batch = _Batch(target, reader)
        for offset, length, _kind, buf, runs in reader:
            if buf is None:  # a zero range
                batch.flush()
                if not zero_init:
                    target.zero(offset, length)
                continue
            view = memoryview(buf)
            for start, end, is_zero in runs:
                if not is_zero:
                    batch.add(offset + start, view[start:end])
                elif not zero_init:
                    batch.flush()
                    target.zero(offset + start, end - start)
            batch.hold(buf)
            done += length
            if total:
                progress.advance(100.0 * done / total, 0)
        batch.flush()
    target.finish()


class _Batch:
    """Data that continues itself across chunks, gathered into one write.

    Fewer, larger writes: one system call (and, for a new file, one ``fallocate``) for a
    run of data however many chunks it spans, up to ``BATCH_BUFFERS`` buffers, which are
    recycled once written.
    """

    def __init__(self, target: Target, reader: _ReadAhead) -> None:
        self.target = target
        self.reader = reader
        self.offset = 0
        self.end = 0
        self.views: list[memoryview] = []
        self.buffers: list[bytearray] = []

    def add(self, offset: int, view: memoryview) -> None:
        if self.views and offset != self.end:
            self.flush()
        if not self.views:
            self.offset = offset
        self.views.append(view)
        self.end = offset + len(view)

    def hold(self, buf: bytearray) -> None:
        """Keeps ``buf`` until its data is written (recycled at once if none is pending)."""
        self.buffers.append(buf)
        if not self.views or len(self.buffers) >= BATCH_BUFFERS:
            self.flush()

    def flush(self) -> None:
        if self.views:
            self.target.write(self.offset, self.views)
            self.views = []
        for buf in self.buffers:
            self.reader.recycle(buf)
        self.buffers = []
