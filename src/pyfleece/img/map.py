"""``pyfleece img map``: how an image's guest ranges are stored, as ``qemu-img map`` says.

Each range reports ``depth`` (which layer of the chain provides it), ``present`` (some
layer allocates it), ``zero``, ``data`` and, when the data lies plainly in a file,
``offset``. Consecutive ranges that agree (and whose offsets continue) merge, exactly by
qemu-img's rule; the human format lists only data ranges and merges more loosely.

One QEMU rule needs care: for qcow2 data clusters QEMU consults the host file (so that a
hole there reports as zeros) only when it believes the image's metadata was preallocated:
when more clusters are referenced than the file has blocks allocated (see
``metadata_preallocated``). The qcow2 driver always consults the file; this module undoes
that where QEMU would not, so that the output is qemu-img's.
"""

from __future__ import annotations

from dataclasses import dataclass

from pyfleece.block.node import Extent, Node
from pyfleece.block.qcow2.check import count_referenced
from pyfleece.block.qcow2.format import Header
from pyfleece.errors import PyfleeceError
from pyfleece.img.common import (
    INT64_MAX,
    Fail,
    allocated_size,
    cvtnum,
    describe,
    nbd_name,
    open_for,
    output_format,
    parse_args,
    report,
)

HELP = """\
usage: pyfleece img map [-f fmt] [--start-offset=offset] [--max-length=len]
                        [--output=ofmt] [-U] filename

Shows where each range of the image's data comes from, as qemu-img map does.
  --output=json      one object per range: start, length, depth, present, zero, data, offset
  --start-offset, --max-length   limit the range shown
  -U, --force-share  open the image shared, even if another process holds it for writing
"""

#: qemu-img asks about at most 1 GiB at a time; so does every caller of ``Mapper.entry``
#: (the block layer refuses requests over 2 GiB)
STEP = 1 << 30


@dataclass
class MapEntry:
    start: int
    length: int
    depth: int = 0
    present: bool = False
    zero: bool = False
    data: bool = False
    offset: int | None = None
    filename: str | None = None


def run(argv: list[str]) -> int:
    opts, operands = parse_args(
        argv,
        "f:hU",
        ["help", "format=", "output=", "start-offset=", "max-length=", "force-share", "object="],
    )
    fmt: str | None = None
    output: str | None = None
    start, max_length = 0, -1
    force_share = False
    for opt, value in opts:
        if opt in ("-f", "--format"):
            fmt = value
        elif opt in ("-U", "--force-share"):
            force_share = True
        elif opt == "--output":
            output = value
        elif opt == "--start-offset":
            start = cvtnum("start offset", value, 0, INT64_MAX)
        elif opt == "--max-length":
            max_length = cvtnum("max length", value, 0, INT64_MAX)
        elif opt == "--object":
            raise Fail("--object is not supported by pyfleece")
    if len(operands) != 1:
        raise Fail("Expecting one image file name", usage=True)
    ofmt = output_format(output)
    node = open_for(operands[0], fmt, force_share=force_share)
    try:
        length = -(-node.size // 512) * 512
        if max_length != -1:
            length = min(start + max_length, length)
        return print_map(Mapper(node), start, length, ofmt)
    finally:
        node.close()


def print_map(mapper: Mapper, start: int, length: int, ofmt: str) -> int:
    """Walks [start, length) printing merged entries; returns the exit status."""
    if ofmt == "human":
        print(f"{'Offset':<16}{'Length':<16}{'Mapped to':<16}File")
    else:
        print("[", end="")
    curr = MapEntry(start, 0)
    try:
        while curr.start + curr.length < length:
            offset = curr.start + curr.length
            nxt = mapper.entry(offset, min(STEP, length - offset))
            if mergeable(curr, nxt):
                curr.length += nxt.length
                continue
            if curr.length > 0:
                dump(ofmt, curr, nxt)
            curr = nxt
        dump(ofmt, curr, None)
    except Fail:
        return 1
    except PyfleeceError as err:
        raise Fail(f"Could not read file metadata: {describe(err)}") from err
    if ofmt == "json":
        print("]")
    return 0


def mergeable(a: MapEntry, b: MapEntry) -> bool:
    """qemu-img's rule: same flags, depth and file, and offsets that continue."""
    if a.length == 0:
        return False
    if (a.zero, a.data, a.depth, a.present, a.filename, a.offset is None) != (
        b.zero,
        b.data,
        b.depth,
        b.present,
        b.filename,
        b.offset is None,
    ):
        return False
    return a.offset is None or b.offset is None or a.offset + a.length == b.offset


def dump(ofmt: str, e: MapEntry, nxt: MapEntry | None) -> None:
    if ofmt == "json":
        text = (
            f'{{ "start": {e.start}, "length": {e.length}, "depth": {e.depth}, '
            f'"present": {_b(e.present)}, "zero": {_b(e.zero)}, "data": {_b(e.data)}'
        )
        if e.offset is not None:
            text += f', "offset": {e.offset}'
        print(text + "}", end=",\n" if nxt is not None else "")
        return
    if e.data and e.offset is None:
        report("File contains external, encrypted or compressed clusters.")
        raise Fail("")
    if e.data and not e.zero:
        print(f"{_hex(e.start):<16}{_hex(e.length):<16}{_hex(e.offset or 0):<16}{e.filename or ''}")
    # The human format does not tell zero from data-and-zero: let them coalesce.
    if nxt is not None and (not nxt.data or nxt.zero):
        nxt.data, nxt.zero = False, True


def _b(value: bool) -> str:
    return "true" if value else "false"


def _hex(value: int) -> str:
    return f"{value:#x}" if value else "0"


class Mapper:
    """Block status of a node's chain, turned into qemu-img's map entries."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.layers: list[Node] = []
        layer: Node | None = node
        while layer is not None:
            self.layers.append(layer)
            layer = layer.child("backing")
        self._prealloc: dict[int, bool] = {}

    def entry(self, offset: int, length: int) -> MapEntry:
        """The entry at ``offset``, covering at most ``length`` (and at most STEP) bytes."""
        node = self.node
        if offset >= node.size:  # the tail of a raw file whose size is not 512-aligned
            return MapEntry(offset, length, 0, True, True, False, offset, self.filename(0))
        ext = node.block_status(offset, min(length, node.size - offset, STEP))
        ext = self._as_qemu_reports(ext)
        return MapEntry(
            offset,
            ext.length,
            ext.depth,
            ext.allocated,
            ext.zero,
            ext.data,
            ext.host_offset,
            self.filename(ext.depth) if ext.host_offset is not None else None,
        )

    def _as_qemu_reports(self, ext: Extent) -> Extent:
        if not (ext.data and ext.zero and ext.host_offset is not None and not ext.compressed):
            return ext
        if ext.depth < len(self.layers) and not self.metadata_preallocated(ext.depth):
            return ext._replace(zero=False)
        return ext

    def filename(self, depth: int) -> str | None:
        """The name of the file holding layer ``depth``'s data, as QEMU names it."""
        if depth >= len(self.layers):
            return None
        layer = self.layers[depth]
        name = getattr(layer.child("file"), "filename", None)
        return name if isinstance(name, str) else nbd_name(layer)

    def metadata_preallocated(self, depth: int) -> bool:
        """QEMU's guess: more clusters referenced than the file has allocated, by over 10%
        (or by two clusters), means the metadata was preallocated."""
        if depth not in self._prealloc:
            self._prealloc[depth] = self._guess(self.layers[depth])
        return self._prealloc[depth]

    @staticmethod
    def _guess(layer: Node) -> bool:
        header = getattr(layer, "header", None)
        file = layer.child("file")
        if not isinstance(header, Header) or file is None:
            return True
        real = allocated_size(file)
        if real is None:
            return True
        real_clusters = real // header.cluster_size
        threshold = max(real_clusters * 10 // 9, real_clusters + 2)
        return count_referenced(file, header, threshold) >= threshold


__all__ = ["HELP", "MapEntry", "Mapper", "print_map", "run"]
