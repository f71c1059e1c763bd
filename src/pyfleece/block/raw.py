"""The ``raw`` format driver: a window (``offset``, ``size``) onto its ``file`` child.

Everything passes through unchanged, shifted by ``offset``; the node's size is fixed when it
opens (the child may grow underneath, the window does not). So do permissions: what users
claim on the raw node, it claims on its file (``block/locking.py``), as QEMU's raw does.
"""

from __future__ import annotations

import errno

from pyfleece.block import locking
from pyfleece.block.node import Extent, HostMapping, Node
from pyfleece.block.options import Options
from pyfleece.block.registry import OpenContext, open_child, register
from pyfleece.errors import BlockError, ConfigError


class RawNode(Node):
    driver = "raw"

    def __init__(
        self, node_name: str, file: Node, *, owned: bool, offset: int, size: int | None
    ) -> None:
        super().__init__(node_name, read_only=file.read_only)
        self.attach_child("file", file, owned=owned)
        self.file = file
        self.offset = offset
        self._fixed_size = size

    @property
    def size(self) -> int:
        if self._fixed_size is not None:
            return self._fixed_size
        return max(0, self.file.size - self.offset)

    def _readinto(self, offset: int, buf: memoryview) -> None:
        self.file.readinto(offset + self.offset, buf)

    def _write(self, offset: int, data: memoryview, fua: bool) -> None:
        self.file.write(offset + self.offset, data, fua=fua)

    def _write_zeroes(self, offset: int, length: int, may_unmap: bool, fua: bool) -> None:
        self.file.write_zeroes(offset + self.offset, length, may_unmap=may_unmap, fua=fua)

    def can_fast_zero(self) -> bool:
        return self.file.can_fast_zero()

    def _discard(self, offset: int, length: int) -> None:
        self.file.discard(offset + self.offset, length)

    def _block_status(self, offset: int, length: int) -> Extent:
        ext = self.file.block_status(offset + self.offset, length)
        host = ext.host_offset
        return ext._replace(offset=offset, depth=0, allocated=True, host_offset=host)

    def _host_map(self, offset: int, length: int) -> HostMapping | None:
        return self.file.host_map(offset + self.offset, length)

    def permissions_changed(self, perm: locking.Perm, shared: locking.Perm) -> None:
        locking.forward(self, self.file, "file", perm, shared)

    def _close(self) -> None:
        locking.release(self.file, f"node '{self.node_name}'", "file")

    def _truncate(self, size: int) -> None:
        if self.offset or self._fixed_size is not None:
            raise BlockError(errno.ENOTSUP, "cannot resize a raw node with offset or size")
        self.file.truncate(size)


@register("raw")
def _open_raw(opts: Options, name: str, ctx: OpenContext) -> Node:
    file, owned = open_child(opts.raw("file"), ctx, "file")
    offset = opts.get_size("offset", 0)
    size = opts.get_size("size", None)
    opts.finish()
    if offset < 0 or (size is not None and size < 0):
        raise ConfigError("offset and size must not be negative")
    if size is None and offset > file.size:
        raise ConfigError(
            f"The sum of offset ({offset}) and size (0) has to be smaller than "
            f"or equal to the actual size of the containing file ({file.size})"
        )
    if size is not None and offset + size > file.size:
        raise ConfigError(
            f"The sum of offset ({offset}) and size ({size}) has to be smaller than "
            f"or equal to the actual size of the containing file ({file.size})"
        )
    return RawNode(name, file, owned=owned, offset=offset, size=size)
