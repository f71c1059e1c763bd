"""The copy engine of ``convert``: sources' block status in, sparse writes out.

The sources (one or more images, concatenated) are walked by block status, as qemu-img
does: ranges that read as zeros are never read (and, on a target known to read zeros, never
written); ranges that a target's backing file provides are skipped (``-B``); data ranges are
read in large aligned chunks, scanned for all-zero blocks of ``min_sparse`` bytes (qemu's
``-S``, 4 KiB by default) which are left out, and the rest written with few, large writes.
With ``min_sparse`` 0 everything is written, zeros included (a fully allocated target).

Chunks are processed by a few worker threads (reads and writes are system calls that
release the GIL, so several proceed at once on different cores). Each worker reads and
scans its chunk, then waits for its turn: in guest order, the target ``reserve``s the
ranges to be written (a new qcow2 allocates its clusters there, so they are laid out in
guest order) and zero ranges and progress are handled; the writes themselves then run in
parallel, outside the turn. Targets implement ``Target``: a new raw file, a new qcow2
written front to back (``qcow2_stream``), or any opened node (``-n``).
"""

from __future__ import annotations

import enum
import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

from pyfleece.block.node import Node
from pyfleece.img.progress import Progress

CHUNK = 8 << 20
_ZEROS = bytes(CHUNK)
_ZERO_VIEW = memoryview(_ZEROS)


class Kind(enum.Enum):
    ZERO = "zero"
    DATA = "data"
    BACKING = "backing"  # the target's backing file provides it: skip


class Target(Protocol):
    """Where convert writes. ``reserve`` and ``zero`` are called in guest order, one at a
    time; ``write`` may run in several threads at once, for reserved ranges."""

    @property
    def zero_init(self) -> bool:
        """Unwritten ranges of the target read as zeros."""

    def reserve(self, offset: int, length: int) -> object: ...

    def write(self, offset: int, data: memoryview, reservation: object) -> None: ...

    def zero(self, offset: int, length: int) -> None: ...

    def finish(self) -> None: ...

    def close(self) -> None: ...


@dataclass
class Source:
    node: Node
    name: str
    start: int  # where it begins in the concatenation

    @property
    def size(self) -> int:
        return -(-self.node.size // 512) * 512


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

    def ranges(self) -> Iterator[tuple[int, int, Kind]]:
        """(offset, length, kind) covering the whole disk, neighbours of a kind merged."""
        pending: tuple[int, int, Kind] | None = None
        for part in self.parts:
            for offset, length, kind in self._part_ranges(part):
                if pending and pending[2] == kind and pending[0] + pending[1] == offset:
                    pending = (pending[0], pending[1] + length, kind)
                    continue
                if pending:
                    yield pending
                pending = (offset, length, kind)
        if pending:
            yield pending

    def _part_ranges(self, part: Source) -> Iterator[tuple[int, int, Kind]]:
        node, offset, end = part.node, 0, part.size
        while offset < end:
            if offset >= node.size:
                yield part.start + offset, end - offset, Kind.ZERO
                return
            ext = node.block_status(offset, node.size - offset)
            if self.top_only and ext.depth > 0:
                kind = Kind.BACKING
            else:
                kind = Kind.ZERO if ext.zero else Kind.DATA
            yield part.start + offset, ext.length, kind
            offset += ext.length

    def readinto(self, offset: int, view: memoryview) -> None:
        """Reads guest bytes of the concatenation (zeros past each part's end)."""
        pos = 0
        for part in self.parts:
            if pos >= len(view):
                return
            lo = offset + pos
            if lo >= part.start + part.size or lo < part.start:
                continue
            n = min(len(view) - pos, part.start + part.size - lo)
            within = lo - part.start
            valid = max(0, min(n, part.node.size - within))
            if valid:
                part.node.readinto(within, view[pos : pos + valid])
            view[pos + valid : pos + n] = _ZEROS[: n - valid]
            pos += n


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


Piece = tuple[int, int, Kind]  # (guest offset, length, kind)


def pieces(sources: Sources, *, min_sparse: int) -> list[Piece]:
    """The work in guest order: data ranges cut into aligned chunks of at most CHUNK bytes,
    zero ranges whole (as data when ``min_sparse`` is 0: they are then written out)."""
    out: list[Piece] = []
    for offset, length, kind in sources.ranges():
        if kind == Kind.ZERO and min_sparse:
            out.append((offset, length, kind))
            continue
        if kind == Kind.BACKING:
            continue
        pos, end = offset, offset + length
        while pos < end:
            nxt = min(end, (pos // CHUNK + 1) * CHUNK)
            out.append((pos, nxt - pos, Kind.DATA))
            pos = nxt
    return out


class _Pipeline:
    """Runs the pieces on worker threads; ordered steps take turns (see module docstring)."""

    def __init__(
        self, sources: Sources, target: Target, min_sparse: int, progress: Progress, total: int
    ) -> None:
        self.sources = sources
        self.target = target
        self.min_sparse = min_sparse
        self.progress = progress
        self.total = total
        self.done = 0
        self.turn = 0
        self.failed = False
        self.cond = threading.Condition()
        self.local = threading.local()

    def run(self, work: list[Piece], workers: int) -> None:
        with ThreadPoolExecutor(workers, thread_name_prefix="convert") as pool:
            futures = [pool.submit(self._task, i, piece) for i, piece in enumerate(work)]
            try:
                for future in futures:
                    future.result()
            finally:
                with self.cond:
                    self.failed = True  # release any worker still waiting for its turn
                    self.cond.notify_all()

    def _task(self, index: int, piece: Piece) -> None:
        try:
            self._step(index, piece)
        except BaseException:
            with self.cond:
                self.failed = True
                self.cond.notify_all()
            raise

    def _step(self, index: int, piece: Piece) -> None:
        offset, length, kind = piece
        runs: list[tuple[int, int, bool]] = []
        view = memoryview(b"")
        if kind == Kind.DATA:
            buf = self._buffer()
            view = memoryview(buf)[:length]
            self.sources.readinto(offset, view)
            runs = [(0, length, False)]
            if self.min_sparse:
                runs = list(zero_runs(buf, length, offset, self.min_sparse))
        with self.cond:
            while self.turn != index and not self.failed:
                self.cond.wait()
            if self.failed:
                return
            writes = self._ordered(offset, length, kind, runs)
            self.turn += 1
            self.cond.notify_all()
        for start, end, reservation in writes:
            self.target.write(offset + start, view[start:end], reservation)

    def _ordered(
        self, offset: int, length: int, kind: Kind, runs: list[tuple[int, int, bool]]
    ) -> list[tuple[int, int, object]]:
        target = self.target
        if kind == Kind.ZERO:
            if not target.zero_init:
                target.zero(offset, length)
            return []
        writes = []
        for start, end, is_zero in runs:
            if not is_zero:
                writes.append((start, end, target.reserve(offset + start, end - start)))
            elif not target.zero_init:
                target.zero(offset + start, end - start)
        self.done += length
        self.progress.advance(100.0 * self.done / self.total, 0)
        return writes

    def _buffer(self) -> bytearray:
        buf = getattr(self.local, "buf", None)
        if buf is None:
            buf = self.local.buf = bytearray(CHUNK)
        return buf


def copy(
    sources: Sources, target: Target, *, min_sparse: int, progress: Progress, workers: int = 4
) -> None:
    """Copies the sources' guest contents to the target (see the module docstring)."""
    work = pieces(sources, min_sparse=min_sparse)
    total = sum(n for _, n, kind in work if kind == Kind.DATA)
    _Pipeline(sources, target, min_sparse, progress, total).run(work, workers)
    target.finish()


class RawTarget:
    """A raw file convert has just created (so it reads as zeros everywhere)."""

    zero_init = True

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)

    def reserve(self, offset: int, length: int) -> object:
        return None

    def write(self, offset: int, data: memoryview, reservation: object) -> None:
        done = 0
        while done < len(data):
            done += os.pwritev(self.fd, [data[done:]], offset + done)

    def zero(self, offset: int, length: int) -> None:
        """Nothing to do: the new file reads as zeros."""

    def finish(self) -> None:
        """qemu-img writes convert targets with cache=unsafe: no flush."""

    def close(self) -> None:
        os.close(self.fd)


class NodeTarget:
    """Any opened node (``convert -n``): zeros are written as write-zeroes requests."""

    def __init__(self, node: Node, *, zero_init: bool) -> None:
        self.node = node
        self.zero_init = zero_init

    def reserve(self, offset: int, length: int) -> object:
        return None

    def write(self, offset: int, data: memoryview, reservation: object) -> None:
        self.node.write(offset, data)

    def zero(self, offset: int, length: int) -> None:
        self.node.write_zeroes(offset, length, may_unmap=True)

    def finish(self) -> None:
        self.node.flush()

    def close(self) -> None:
        self.node.close()
