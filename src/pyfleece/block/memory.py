"""The ``memory`` protocol driver: a sparse, growable in-memory disk (a test double, and a
scratch target). Data lives in 64 KiB chunks; a chunk never written reads as zeros and is
reported as a hole.
"""

from __future__ import annotations

import threading

from pyfleece.block.node import Extent, Node
from pyfleece.block.options import Options
from pyfleece.block.registry import OpenContext, register

CHUNK = 1 << 16


class MemoryNode(Node):
    driver = "memory"
    growable = True

    def __init__(self, node_name: str, size: int = 0, *, read_only: bool = False) -> None:
        super().__init__(node_name, read_only=read_only)
        self._size = size
        self._chunks: dict[int, bytearray] = {}
        self._lock = threading.Lock()

    @property
    def size(self) -> int:
        return self._size

    def _readinto(self, offset: int, buf: memoryview) -> None:
        pos = 0
        with self._lock:
            while pos < len(buf):
                index, within = divmod(offset + pos, CHUNK)
                n = min(CHUNK - within, len(buf) - pos)
                chunk = self._chunks.get(index)
                if chunk is None:
                    buf[pos : pos + n] = bytes(n)
                else:
                    buf[pos : pos + n] = chunk[within : within + n]
                pos += n

    def _write(self, offset: int, data: memoryview, fua: bool) -> None:
        pos = 0
        with self._lock:
            while pos < len(data):
                index, within = divmod(offset + pos, CHUNK)
                n = min(CHUNK - within, len(data) - pos)
                chunk = self._chunks.get(index)
                if chunk is None:
                    chunk = self._chunks[index] = bytearray(CHUNK)
                chunk[within : within + n] = data[pos : pos + n]
                pos += n
            self._size = max(self._size, offset + len(data))

    def _write_zeroes(self, offset: int, length: int, may_unmap: bool, fua: bool) -> None:
        self._clear(offset, length)
        with self._lock:
            self._size = max(self._size, offset + length)

    def _discard(self, offset: int, length: int) -> None:
        self._clear(offset, min(offset + length, self._size) - offset)

    def _clear(self, offset: int, length: int) -> None:
        pos = 0
        with self._lock:
            while pos < length:
                index, within = divmod(offset + pos, CHUNK)
                n = min(CHUNK - within, length - pos)
                if n == CHUNK:
                    self._chunks.pop(index, None)
                elif index in self._chunks:
                    self._chunks[index][within : within + n] = bytes(n)
                pos += n

    def can_fast_zero(self) -> bool:
        return True

    def _flush(self) -> None:
        pass

    def _block_status(self, offset: int, length: int) -> Extent:
        end = min(offset + length, max(self._size, offset + 1))
        with self._lock:
            present = (offset // CHUNK) in self._chunks
            pos = offset
            while pos < end and ((pos // CHUNK) in self._chunks) == present:
                pos = (pos // CHUNK + 1) * CHUNK
        n = min(pos, offset + length) - offset
        return Extent(offset, n, present, not present, True, 0, None)

    def _truncate(self, size: int) -> None:
        with self._lock:
            if size < self._size:
                for index in [i for i in self._chunks if i * CHUNK >= size]:
                    del self._chunks[index]
                index, within = divmod(size, CHUNK)
                if within and index in self._chunks:
                    self._chunks[index][within:] = bytes(CHUNK - within)
            self._size = size


@register("memory")
def _open_memory(opts: Options, name: str, ctx: OpenContext) -> Node:
    size = opts.get_size("size", 0)
    opts.finish()
    return MemoryNode(name, size, read_only=ctx.read_only)
