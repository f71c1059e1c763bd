"""The sources of ``convert``, walked into the work: what to read, from where, in order.

One or more images are read as one disk, concatenated (each padded to 512 bytes). They are
walked by block status, as qemu-img does: ranges that read as zeros are never read, and
ranges that a target's backing file provides are skipped (``-B``, ``Kind.BACKING``). A
qcow2 image is walked from its own tables (``qcow2_source``), and its data is read straight
from its file. Data ranges are cut into chunks of at most ``CHUNK`` bytes, aligned, each
carrying the node and offset to read it from (``Piece``).
"""

from __future__ import annotations

import enum
from collections.abc import Iterator

from pyfleece.block.node import Node
from pyfleece.block.qcow2.format import Header
from pyfleece.errors import PyfleeceError
from pyfleece.img.common import Fail, describe
from pyfleece.img.qcow2_source import COMPRESSED, UNALLOCATED, ZERO, qcow2_runs

CHUNK = 2 << 20
#: block status is asked about at most this much at a time (the block layer refuses
#: requests over 2 GiB; qemu-img's steps are 1 GiB too)
STATUS_STEP = 1 << 30


class Kind(enum.Enum):
    """What a range of the sources is to the copy."""

    ZERO = "zero"
    DATA = "data"
    BACKING = "backing"  # the target's backing file provides it: skip


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

    @property
    def remote(self) -> bool:
        """Some source is read over the network (an NBD node in its graph): its reads have
        a round trip worth overlapping."""
        todo = [part.node for part in self.parts]
        while todo:
            node = todo.pop()
            if node.driver == "nbd":
                return True
            todo.extend(child.node for child in node.children.values())
        return False

    def ranges(self) -> Iterator[Range]:
        """Ranges covering the whole disk in order; neighbours of a kind are merged (data
        ranges only when they continue each other in the node they are read from)."""
        pending: Range | None = None
        for part in self.parts:
            for item in self._checked(part):
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

    def _checked(self, part: Source) -> Iterator[Range]:
        """One part's ranges; a failure names the offset (in that image) whose status was
        asked, as qemu-img does.

        Raises:
            Fail: "error while reading block status at offset N: <reason>".
        """
        reached = 0
        ranges = self._part_ranges(part)
        while True:
            try:
                item = next(ranges)
            except StopIteration:
                return
            except (PyfleeceError, OSError) as err:
                raise Fail(
                    f"error while reading block status at offset {reached}: {describe(err)}"
                ) from err
            reached = item[0] + item[1] - part.start
            yield item

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
            ext = node.block_status(offset, min(end - offset, STATUS_STEP))
            if self.top_only and ext.depth > 0:
                yield part.start + offset, ext.length, Kind.BACKING, None, 0
            elif ext.zero:
                yield part.start + offset, ext.length, Kind.ZERO, None, 0
            else:
                yield part.start + offset, ext.length, Kind.DATA, node, offset
            offset += ext.length


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
