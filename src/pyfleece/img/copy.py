"""The copy engine of ``convert``: the sources' pieces in, sparse writes out.

Data pieces (``sources.pieces``: aligned chunks of at most 2 MiB) are read into recycled
buffers and scanned for all-zero blocks of ``min_sparse`` bytes (qemu's ``-S``, 4 KiB by
default), which are left out; zero ranges are never read (nor written, on a target that
reads as zeros). With ``min_sparse`` 0 everything is written, zeros included (a fully
allocated target). Data that continues itself across pieces is written with one
``pwritev`` (``_Batch``).

A pipeline of two threads: a reader thread walks the sources, reads each data piece into
one of a few recycled buffers and scans it; the calling thread takes the pieces in guest
order and hands them to the target. So the target sees increasing offsets from one thread
(a new qcow2 lays its clusters out in guest order), and reads overlap writes. Measured on
the benchmark image (bench/img_convert.py), against this shape: two workers each reading
and writing, their writes in parallel, spent 15% of the CPU time spinning on the target's
inode lock (writes to one file serialise in the kernel); two workers taking turns to write
were 25% slower (a worker holding the turn through a long write stalls the reading); two
reader threads were 12% slower (three threads on two cores).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import Protocol

from pyfleece.errors import PyfleeceError
from pyfleece.img.common import Fail, describe
from pyfleece.img.progress import Progress
from pyfleece.img.sources import CHUNK, Kind, Piece, Sources, pieces

#: data buffers in all (each CHUNK bytes, made when first needed)
DEPTH = 6
#: buffers of continuous data gathered into one write (the others keep the reader going)
BATCH_BUFFERS = 4
_ZEROS = bytes(CHUNK)
_ZERO_VIEW = memoryview(_ZEROS)


class Target(Protocol):
    """Where convert writes: ``write`` and ``zero`` are called by one thread at a time, in
    increasing guest order (a range may follow the previous one in the same cluster)."""

    @property
    def zero_init(self) -> bool:
        """Unwritten ranges of the target read as zeros."""

    def write(self, offset: int, data: list[memoryview]) -> None:
        """Writes the buffers, one after the other, from guest ``offset`` on."""

    def zero(self, offset: int, length: int) -> None: ...

    def finish(self) -> None: ...

    def close(self) -> None: ...


def zero_runs(
    buf: bytearray, length: int, base: int, grain: int
) -> Iterator[tuple[int, int, bool]]:
    """Splits buf[:length] (guest bytes at ``base``) into (start, end, is_zero) runs; zero
    runs are made of whole, ``grain``-aligned blocks of zeros.

    ``bytearray.find`` of a block of zeros skips through data at C speed, so only places
    that hold a long enough run of zeros are looked at; a run found is extended by
    comparisons that double in length while they succeed.
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
        end = _zero_end(buf, block + grain, length, grain)
        if block > pos:
            yield pos, block, False
        yield block, end, True
        pos = search = end
    if pos < length:
        yield pos, length, False


def _zero_end(buf: bytearray, end: int, length: int, grain: int) -> int:
    """Extends a run of zero blocks that reaches ``end`` as far as whole blocks go."""
    step = grain
    while end + grain <= length:
        if end + step <= length and buf.startswith(_ZERO_VIEW[:step], end):
            end += step
            step *= 2
        elif step > grain:
            step //= 2
        else:
            break
    return end


class _Batch:
    """Data that continues itself across pieces, gathered into one write.

    Fewer, larger writes: one system call (and, for a new file, one ``fallocate``) for a
    run of data however many pieces it spans, up to ``BATCH_BUFFERS`` buffers, which are
    recycled once written.
    """

    def __init__(self, target: Target, reader: _ReadAhead) -> None:
        self.target = target
        self.reader = reader
        self.offset = 0
        self.end = 0
        self.views: list[memoryview] = []
        self.held: list[bytearray] = []

    def add(self, offset: int, view: memoryview) -> None:
        if self.views and offset != self.end:
            self.flush()
        if not self.views:
            self.offset = offset
        self.views.append(view)
        self.end = offset + len(view)

    def hold(self, buf: bytearray) -> None:
        """Keeps ``buf`` until its data is written (recycled at once if none is pending)."""
        self.held.append(buf)
        if not self.views or len(self.held) >= BATCH_BUFFERS:
            self.flush()

    def flush(self) -> None:
        if self.views:
            try:
                self.target.write(self.offset, self.views)
            except (PyfleeceError, OSError) as err:
                raise _write_error(self.offset, err) from err
            self.views = []
        self.reader.recycle(self.held)
        self.held = []


#: a piece read and scanned: (guest offset, length, buffer or None, (start, end, zero) runs)
Loaded = tuple[int, int, bytearray | None, list[tuple[int, int, bool]]]


class _ReadAhead:
    """The reading side: ``readers`` threads walk the sources, read and scan the data pieces
    into at most ``DEPTH + readers - 1`` buffers (made when first needed: a small image
    needs one), and hand them over in guest order. Iterating yields the ``Loaded`` pieces,
    and raises an error a reader met. The writer gives buffers back with ``recycle``.

    One reader for local files (two were 12% slower: three threads on two cores); several
    for sources with a network round trip (NBD), whose reads then overlap as qemu-img's
    coroutines' do. A reader takes a buffer before it takes a piece, so every piece handed
    out can be read, and the writer, waiting for the next piece in order, always gets it.
    """

    def __init__(self, work: Iterable[Piece], min_sparse: int, readers: int = 1) -> None:
        self.work = iter(work)
        self.min_sparse = min_sparse
        self.depth = DEPTH + readers - 1
        self.lock = threading.Lock()  # guards work, next_seq, finished, made
        self.next_seq = 0
        self.finished = False
        self.made = 0
        self.ready = threading.Condition()  # guards loaded
        self.loaded: dict[int, Loaded | BaseException | None] = {}
        self.free: queue.SimpleQueue[bytearray | None] = queue.SimpleQueue()
        self.stopped = False
        self.threads = [
            threading.Thread(target=self._run, name=f"convert-read-{i}", daemon=True)
            for i in range(readers)
        ]

    def __enter__(self) -> _ReadAhead:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stopped = True
        for _ in self.threads:
            self.free.put(None)  # wakes a reader waiting for a buffer
        for thread in self.threads:
            thread.join()

    def __iter__(self) -> Iterator[Loaded]:
        seq = 0
        while True:
            with self.ready:
                while seq not in self.loaded:
                    self.ready.wait()
                item = self.loaded.pop(seq)
            seq += 1
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def recycle(self, bufs: list[bytearray]) -> None:
        for buf in bufs:
            self.free.put(buf)

    def _deliver(self, seq: int, item: Loaded | BaseException | None) -> None:
        with self.ready:
            self.loaded[seq] = item
            self.ready.notify()

    def _run(self) -> None:
        while not self.stopped:
            buf = self._buffer()
            if buf is None or self.stopped:
                return
            with self.lock:
                if self.finished:
                    self.free.put(buf)
                    return
                seq = self.next_seq
                self.next_seq += 1
                try:
                    piece = next(self.work, None)
                except BaseException as err:  # the walk failed: handed to the writer
                    self._end(seq, buf, err)
                    return
                if piece is None:  # the end: the writer stops at this sequence number
                    self._end(seq, buf, None)
                    return
            try:
                self._deliver(seq, self._load(piece, buf))
            except BaseException as err:  # handed to the writer, which raises it
                self._deliver(seq, err)
                return

    def _end(self, seq: int, buf: bytearray, item: BaseException | None) -> None:
        """The walk is over (``item``: None, or the error that ended it); under ``lock``."""
        self.finished = True
        self.free.put(buf)
        self._deliver(seq, item)

    def _buffer(self) -> bytearray | None:
        """A free buffer, a new one while fewer than ``depth`` exist (None: stopped)."""
        with self.lock:
            if self.made < self.depth and self.free.empty():
                self.made += 1
                return bytearray(CHUNK)
        return self.free.get()

    def _load(self, piece: Piece, buf: bytearray) -> Loaded:
        offset, length, kind, node, at = piece
        if kind != Kind.DATA:
            self.free.put(buf)
            return offset, length, None, []
        if node is None:
            buf[:length] = _ZERO_VIEW[:length]
        else:
            try:
                node.readinto(at, memoryview(buf)[:length])
            except (PyfleeceError, OSError) as err:
                raise Fail(f"error while reading at byte {offset}: {describe(err)}") from err
        if self.min_sparse:
            runs = list(zero_runs(buf, length, offset, self.min_sparse))
        else:
            runs = [(0, length, False)]
        return offset, length, buf, runs


def _write_error(offset: int, err: BaseException) -> Fail:
    return Fail(f"error while writing at byte {offset}: {describe(err)}")


def _zero(target: Target, offset: int, length: int) -> None:
    try:
        target.zero(offset, length)
    except (PyfleeceError, OSError) as err:
        raise _write_error(offset, err) from err


def copy(
    sources: Sources, target: Target, *, min_sparse: int, progress: Progress, readers: int = 1
) -> None:
    """Copies the sources' guest contents to the target (see the module docstring), then
    finishes the target.

    ``readers`` threads read the sources (see ``_ReadAhead``).

    Raises:
        Fail: a read, a block status query or a write failed (qemu-img's messages, with
            the offset); PyfleeceError, OSError: finishing the target failed.
    """
    work: Iterable[Piece] = pieces(sources, min_sparse=min_sparse)
    total = 0
    if progress.enabled:  # the total must be known before the first line
        work = list(work)
        total = sum(piece[1] for piece in work if piece[2] == Kind.DATA)
    done = 0
    zero_init = target.zero_init
    with _ReadAhead(work, min_sparse, readers) as reader:
        batch = _Batch(target, reader)
        for offset, length, buf, runs in reader:
            if buf is None:  # a zero range
                batch.flush()
                if not zero_init:
                    _zero(target, offset, length)
                continue
            view = memoryview(buf)
            for start, end, is_zero in runs:
                if not is_zero:
                    batch.add(offset + start, view[start:end])
                elif not zero_init:
                    batch.flush()
                    _zero(target, offset + start, end - start)
            batch.hold(buf)
            done += length
            if total:
                progress.advance(100.0 * done / total, 0)
        batch.flush()
    target.finish()
