"""The ``null-co`` protocol driver: a disk of a given size that reads zeros and discards
writes (benchmarks and tests)."""

from __future__ import annotations

from pyfleece.block.node import Extent, Node
from pyfleece.block.options import Options
from pyfleece.block.registry import OpenContext, register


class NullNode(Node):
    driver = "null-co"

    def __init__(self, node_name: str, size: int, *, read_only: bool) -> None:
        super().__init__(node_name, read_only=read_only)
        self._size = size

    @property
    def size(self) -> int:
        return self._size

    def _readinto(self, offset: int, buf: memoryview) -> None:
        buf[:] = bytes(len(buf))

    def _write(self, offset: int, data: memoryview, fua: bool) -> None:
        pass

    def _write_zeroes(self, offset: int, length: int, may_unmap: bool, fua: bool) -> None:
        pass

    def can_fast_zero(self) -> bool:
        return True

    def _flush(self) -> None:
        pass

    def _block_status(self, offset: int, length: int) -> Extent:
        return Extent(offset, length, False, True, True, 0, None)

    def _truncate(self, size: int) -> None:
        self._size = size


@register("null-co")
def _open_null(opts: Options, name: str, ctx: OpenContext) -> Node:
    size = opts.get_size("size", 1 << 30)
    opts.get_bool("read-zeroes", True)  # we always return zeros
    opts.get_int("latency-ns", 0)
    opts.finish()
    return NullNode(name, size, read_only=ctx.read_only)
