"""``pyfleece img compare``: are two images' guest contents equal, as ``qemu-img compare``.

Exit status: 0 identical, 1 different ("Content mismatch at offset N!", N rounded down to
a 512-byte sector as qemu-img reports it), 2 an image cannot be opened, 3 block status
failed, 4 a read failed. Images of different sizes compare equal when the larger one is
zero past the smaller one's end ("Warning: Image size mismatch!"); with ``-s`` (strict)
the sizes and the allocation (block status) must match too.

The walk is qemu-img's: ask both images for the status of the next range, skip ranges both
report as zero, read and compare ranges both allocate, and check that a range only one of
them allocates reads as zeros; at most 2 MiB at a time.
"""

from __future__ import annotations

from pyfleece.block.node import Node
from pyfleece.errors import PyfleeceError
from pyfleece.img.common import Fail, describe, open_for, parse_args
from pyfleece.img.map import Mapper
from pyfleece.img.progress import Progress

HELP = """\
usage: pyfleece img compare [-f fmt] [-F fmt] [-p] [-q] [-s] [-U] filename1 filename2

Compares the guest-visible contents of two images, as qemu-img compare does.
  -f fmt   first image format       -F fmt   second image format
  -s       strict: sizes and allocation must match too
  -p       show progress            -q       quiet
  -U       open the images shared, even if another process holds them for writing
Exit status: 0 identical, 1 different, 2 an image cannot be opened, 3 or 4 I/O errors.
"""

IO_BUF = 2 << 20
SECTOR = 512
_ZEROS = bytes(IO_BUF)

# QEMU's BDRV_BLOCK_* bits, compared as a whole in strict mode.
DATA, ZERO, OFFSET_VALID, ALLOCATED, EOF, RECURSE = 0x1, 0x2, 0x4, 0x10, 0x20, 0x40


class Differ(Exception):
    """The images differ; the message is what qemu-img prints."""


class _Side:
    """One image: its node, its (sector-aligned) size, status words and padded reads."""

    def __init__(self, node: Node, name: str) -> None:
        self.node = node
        self.name = name
        self.size = -(-node.size // SECTOR) * SECTOR
        self.mapper = Mapper(node)
        self.buf = bytearray(IO_BUF)

    def status(self, offset: int) -> tuple[int, int]:
        """(QEMU status word, length) of the range starting at ``offset``."""
        try:
            e = self.mapper.entry(offset, self.size - offset)
        except PyfleeceError as err:
            raise Fail(f"Sector allocation test failed for {self.name}", 3) from err
        word = (DATA if e.data else 0) | (ZERO if e.zero else 0)
        word |= (ALLOCATED if e.present else 0) | (OFFSET_VALID if e.offset is not None else 0)
        if e.data and e.offset is not None and self.mapper.metadata_preallocated(e.depth):
            word |= RECURSE if self.node.driver == "qcow2" else 0
        if offset + e.length == self.size:
            word |= EOF
        return word, e.length

    def read(self, offset: int, length: int) -> memoryview:
        view = memoryview(self.buf)[:length]
        valid = max(0, min(length, self.node.size - offset))
        try:
            self.node.readinto(offset, view[:valid])
        except PyfleeceError as err:
            raise Fail(
                f"Error while reading offset {offset} of {self.name}: {describe(err)}", 4
            ) from err
        view[valid:] = _ZEROS[: length - valid]
        return view


def run(argv: list[str]) -> int:
    opts, operands = parse_args(
        argv, "hf:F:T:pqsU", ["help", "image-opts", "object=", "force-share"]
    )
    fmt1 = fmt2 = None
    progress = quiet = strict = force_share = False
    for opt, value in opts:
        if opt in ("-U", "--force-share"):
            force_share = True
        elif opt == "-f":
            fmt1 = value
        elif opt == "-F":
            fmt2 = value
        elif opt == "-p":
            progress = True
        elif opt == "-q":
            quiet = True
        elif opt == "-s":
            strict = True
        elif opt in ("--object", "--image-opts"):
            raise Fail(f"{opt} is not supported by pyfleece", 2)
    if len(operands) != 2:
        raise Fail("Expecting two image file names", usage=True)
    bar = Progress(progress and not quiet, 2.0)
    try:
        return _compare(operands, (fmt1, fmt2), strict, quiet, bar, force_share=force_share)
    finally:
        bar.end()


def _compare(
    names: list[str],
    fmts: tuple[str | None, str | None],
    strict: bool,
    quiet: bool,
    bar: Progress,
    *,
    force_share: bool = False,
) -> int:
    node1 = open_for(names[0], fmts[0], status=2, force_share=force_share)
    try:
        node2 = open_for(names[1], fmts[1], status=2, force_share=force_share)
    except Fail:
        node1.close()
        raise
    try:
        walk(_Side(node1, names[0]), _Side(node2, names[1]), strict, quiet, bar)
    except Differ as diff:
        if not quiet:
            print(diff)
        return 1
    finally:
        node1.close()
        node2.close()
    if not quiet:
        print("Images are identical.")
    return 0


def walk(a: _Side, b: _Side, strict: bool, quiet: bool, bar: Progress) -> None:
    """Compares the two images.

    Raises:
        Differ: they differ (the message says where).
        Fail: a status query or a read failed.
    """
    total = min(a.size, b.size)
    base = max(a.size, b.size)
    bar.advance(0, 100)
    if strict and a.size != b.size:
        raise Differ("Strict mode: Image size mismatch!")
    offset = 0
    while offset < total:
        s1, n1 = a.status(offset)
        s2, n2 = b.status(offset)
        chunk = min(n1, n2)
        if strict and s1 != s2:
            raise Differ(f"Strict mode: Offset {offset} block status mismatch!")
        if s1 & ZERO and s2 & ZERO:
            pass
        elif s1 & ALLOCATED == s2 & ALLOCATED:
            if s1 & ALLOCATED:
                chunk = min(chunk, IO_BUF)
                _same(a.read(offset, chunk), b.read(offset, chunk), offset)
        else:
            chunk = min(chunk, IO_BUF)
            _zero((a if s1 & ALLOCATED else b).read(offset, chunk), offset)
        offset += chunk
        bar.advance(chunk / base * 100, 100)
    if a.size != b.size:
        if not quiet:
            print("Warning: Image size mismatch!")
        _rest_is_zero(a if a.size > b.size else b, offset, base, bar)


def _rest_is_zero(side: _Side, offset: int, end: int, bar: Progress) -> None:
    while offset < end:
        word, chunk = side.status(offset)
        if word & ALLOCATED and not word & ZERO:
            chunk = min(chunk, IO_BUF)
            _zero(side.read(offset, chunk), offset)
        offset += chunk
        bar.advance(chunk / end * 100, 100)


def _same(x: memoryview, y: memoryview, offset: int) -> None:
    if x == y:
        return
    for start in range(0, len(x), SECTOR):
        if x[start : start + SECTOR] != y[start : start + SECTOR]:
            raise Differ(f"Content mismatch at offset {offset + start}!")


def _zero(x: memoryview, offset: int) -> None:
    if x == _ZEROS[: len(x)]:
        return
    for start in range(0, len(x), SECTOR):
        end = min(start + SECTOR, len(x))
        if x[start:end] != _ZEROS[: end - start]:
            raise Differ(f"Content mismatch at offset {offset + start}!")


__all__ = ["HELP", "run", "walk"]
