"""NBD metadata contexts ("Metadata querying" in nbd-proto.md; QEMU's interop/nbd.rst).

A context turns a node's block status into the 32-bit flags of NBD_CMD_BLOCK_STATUS:

- ``base:allocation``: NBD_STATE_HOLE when no data is stored, NBD_STATE_ZERO when the range
  reads as zeros;
- ``qemu:allocation-depth``: 0 when no layer of the chain allocates the range, otherwise
  1 + the depth of the layer that does (1 = the exported node itself).

``qemu:dirty-bitmap:NAME`` is reserved for the dirty-bitmap issue: a bitmap context will be a
``MetaContext`` subclass that the export lists next to these.

Query matching: a query ending in ``:`` (``base:``, ``qemu:``, ``qemu:dirty-bitmap:``) is a
wildcard when listing and selects nothing when setting; any other query selects the context of
that exact name; queries naming nothing we know are ignored, as the spec requires.
"""

from __future__ import annotations

import errno
from collections.abc import Sequence

from pyfleece.block.node import Extent, Node
from pyfleece.errors import BlockError
from pyfleece.nbd.proto import ALLOCATION_DEPTH, BASE_ALLOCATION, StateFlag

#: Most extents one BLOCK_STATUS chunk carries (the spec asks for at most 2^20).
MAX_EXTENTS = 1 << 16

_HOLE = int(StateFlag.HOLE)
_ZERO = int(StateFlag.ZERO)


class MetaContext:
    """A metadata context an export offers; subclasses define ``flags``."""

    name = ""

    def flags(self, ext: Extent) -> int:
        raise NotImplementedError

    def extents(
        self, node: Node, offset: int, length: int, *, one: bool, limit: int = MAX_EXTENTS
    ) -> list[tuple[int, int]]:
        """(length, flags) descriptors covering ``[offset, offset + length)`` from its start,
        neighbours with equal flags merged; one descriptor only with ``one``.

        Raises:
            BlockError: the node failed to answer.
        """
        out: list[tuple[int, int]] = []
        end = offset + length
        while offset < end and len(out) < limit:
            ext = node.block_status(offset, end - offset)
            n = min(ext.length, end - offset)
            if n <= 0:
                raise BlockError(errno.EIO, f"empty block status at offset {offset}")
            flags = self.flags(ext)
            if out and out[-1][1] == flags:
                out[-1] = (out[-1][0] + n, flags)
            else:
                out.append((n, flags))
            if one:
                break
            offset += n
        return out

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"


class BaseAllocation(MetaContext):
    name = BASE_ALLOCATION

    def flags(self, ext: Extent) -> int:
        return (0 if ext.data else _HOLE) | (_ZERO if ext.zero else 0)


class AllocationDepth(MetaContext):
    name = ALLOCATION_DEPTH

    def flags(self, ext: Extent) -> int:
        return ext.depth + 1 if ext.allocated else 0


def match(
    contexts: Sequence[MetaContext], queries: Sequence[str], *, listing: bool
) -> list[MetaContext]:
    """The contexts a LIST (``listing``) or SET request selects, in the export's order.

    With no queries, listing returns every context and setting selects none.
    """
    if not queries:
        return list(contexts) if listing else []
    chosen: list[MetaContext] = []
    for ctx in contexts:
        for query in queries:
            wildcard = query.endswith(":")
            if query == ctx.name or (listing and wildcard and ctx.name.startswith(query)):
                chosen.append(ctx)
                break
    return chosen
