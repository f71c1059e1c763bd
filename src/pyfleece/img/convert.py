"""``pyfleece img convert``: copy images (raw, qcow2, chains) into a new image.

Options and messages follow ``qemu-img convert``: ``-f`` source format, ``-O`` target
format (raw by default), ``-o`` target options, ``-B``/``-F`` a backing file for the
target (only what the source's top layer allocates is copied), ``-S`` the zero-detection
grain (0: write everything), ``-n`` write into an existing target, ``-p`` progress, ``-q``.
Several sources are concatenated. The copying is ``img.copy``; a new qcow2 target is
written front to back by ``img.qcow2_stream``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from pyfleece.block.locking import LockConflict
from pyfleece.block.node import Node
from pyfleece.errors import ConfigError, PyfleeceError
from pyfleece.img import create as img_create
from pyfleece.img.common import Fail, cvtnum, describe, open_for, parse_args
from pyfleece.img.copy import Target, copy
from pyfleece.img.options import (
    FORMAT_OPTIONS,
    check_option_list,
    help_text,
    parse_format_options,
    wants_help,
    without,
)
from pyfleece.img.progress import Progress
from pyfleece.img.qcow2_stream import Qcow2Stream
from pyfleece.img.sources import Sources
from pyfleece.img.targets import NodeTarget, RawTarget

HELP = """\
usage: pyfleece img convert [-U] [-p] [-q] [-n] [-f fmt] [-O output_fmt]
                            [-B backing_file [-F backing_fmt]] [-o options] [-S sparse_size]
                            [-m num] [-W] filename [filename2 [...]] output_filename

Copies the guest contents of one or more images (concatenated) into a new image. An image
may be a file, an NBD URI (nbd://host/export, nbd+unix:///export?socket=path) or json:{...}.
  -f fmt     source format (probed when omitted)
  -O fmt     output format: raw (default) or qcow2
  -o opts    output options, as for create (-o help lists them)
  -B file    give the output this backing file (-F its format); only what the source's
             top layer allocates is copied
  -S size    ranges of zeros at least this long are not written (default 4k; 0 writes all)
  -n         do not create the output: write into an existing image
  -m num     reads in flight from NBD sources (1-16, default 8)
  -p         show progress       -q   quiet
  -U, --force-share  read sources another process holds open for writing
"""

MAX_SPARSE = 16 << 20
#: reader threads for NBD sources, as qemu-img's 8 coroutines (``-m`` sets it)
REMOTE_READERS = 8
T = TypeVar("T")


class _Args:
    def __init__(self) -> None:
        self.src_fmt: str | None = None
        self.out_fmt = "raw"
        self.options = ""
        self.backing: str | None = None
        self.backing_fmt: str | None = None
        self.min_sparse = 4096
        self.skip_create = False
        self.target_is_zero = False
        self.progress = False
        self.quiet = False
        self.force_share = False
        self.readers = REMOTE_READERS


def run(argv: list[str]) -> int:
    args, files = _parse(argv)
    if args.options and wants_help(args.options):
        if args.out_fmt not in FORMAT_OPTIONS:
            raise Fail(f"Unknown file format '{args.out_fmt}'")
        print(help_text(args.out_fmt), end="")
        return 0
    if len(files) < 2:
        raise Fail("Must specify image file name")
    bar = Progress(args.progress and not args.quiet, 1.0)
    bar.advance(0, 100)  # before anything is opened, as qemu-img
    nodes: list[tuple[Node, str]] = []
    try:
        for name in files[:-1]:
            # The sources must hold still: no other writer unless -U (qemu-img's NO_SHARE).
            share = args.force_share
            nodes.append((open_for(name, args.src_fmt, force_share=share, stable=True), name))
        convert(nodes, files[-1], args, bar)
    finally:
        for node, _ in nodes:
            node.close()
        bar.end()
    return 0


def _parse(argv: list[str]) -> tuple[_Args, list[str]]:
    opts, files = parse_args(
        argv,
        "hf:O:B:CcF:o:l:S:pt:T:qnm:WUr:",
        ["help", "object=", "image-opts", "target-image-opts", "salvage", "target-is-zero",
         "bitmaps", "force-share"],
    )  # fmt: skip
    args = _Args()
    for opt, value in opts:
        if opt == "-f":
            args.src_fmt = value
        elif opt == "-O":
            args.out_fmt = value
        elif opt == "-B":
            args.backing = value
        elif opt == "-F":
            args.backing_fmt = value
        elif opt == "-o":
            check_option_list(value)
            args.options = f"{args.options},{value}" if args.options else value
        elif opt == "-S":
            args.min_sparse = _sparse(value)
        elif opt == "-n":
            args.skip_create = True
        elif opt == "-p":
            args.progress = True
        elif opt == "-q":
            args.quiet = True
        elif opt in ("-U", "--force-share"):
            args.force_share = True
        elif opt == "-m":
            args.readers = _workers(value)
        elif opt == "--target-is-zero":
            args.target_is_zero = True
        elif opt in ("-c", "-l", "--salvage", "--bitmaps", "--object", "--image-opts",
                     "--target-image-opts"):  # fmt: skip
            raise Fail(f"convert option '{opt}' is not supported by pyfleece")
    if args.target_is_zero and not args.skip_create:
        raise Fail("--target-is-zero requires use of -n flag")
    return args, files


def _sparse(value: str) -> int:
    size = cvtnum("buffer size for sparse output", value)
    if size % 512 or size > MAX_SPARSE:
        raise Fail(
            "Invalid buffer size for sparse output specified. Valid sizes are multiples of "
            f"512 up to {MAX_SPARSE}. Select 0 to disable sparse detection (fully allocates "
            "output)."
        )
    return size


def _workers(value: str) -> int:
    """``-m``: qemu-img's parallel requests; here the reader threads for NBD sources (local
    files are read by one thread, which measured fastest)."""
    try:
        count = int(value)
    except ValueError:
        count = 0
    if not 1 <= count <= 16:
        raise Fail("Invalid number of coroutines. Allowed number of coroutines is between 1 and 16")
    return count


def convert(nodes: list[tuple[Node, str]], out: str, args: _Args, bar: Progress) -> None:
    """Creates (or opens, with -n) the target and copies the sources into it.

    Raises:
        Fail: with qemu-img's message.
    """
    sources = Sources(nodes, top_only=args.backing is not None)
    target = _skip_create(out, args, sources.size) if args.skip_create else None
    if target is None:
        target = _create(out, args, sources.size)
    try:
        readers = args.readers if sources.remote else 1
        copy(sources, target, min_sparse=args.min_sparse, progress=bar, readers=readers)
    except (PyfleeceError, OSError) as err:  # reads and writes fail as Fail, with offsets
        raise Fail(f"{out}: error while finishing the image: {describe(err)}") from err
    finally:
        target.close()
    bar.advance(100, 0)


def _skip_create(out: str, args: _Args, size: int) -> Target:
    node = open_for(out, args.out_fmt, read_only=False)
    if node.size < size:
        node.close()
        raise Fail("output file is smaller than input file")
    return NodeTarget(node, zero_init=args.target_is_zero)


def _create(out: str, args: _Args, size: int) -> Target:
    fmt = args.out_fmt
    if fmt not in FORMAT_OPTIONS:
        raise Fail(f"Unknown file format '{fmt}'")
    opts = parse_format_options(fmt, args.options, "")
    if fmt == "raw" and (args.backing or "backing_file" in opts.values):
        raise Fail("Backing file not supported for file format 'raw'")
    if fmt == "qcow2":
        stream = _wrap_create_errors(out, fmt, lambda: _qcow2_target(out, args, size))
        if args.backing is not None or "backing_file" in opts.values:
            _check_backing(out, stream)
        return stream

    def create_raw() -> Target:
        text = without(args.options, "size")  # the sources decide the size
        img_create.create(out, fmt, size, text, None, None, quiet=True)
        return RawTarget(out)

    return _wrap_create_errors(out, fmt, create_raw)


def _wrap_create_errors(out: str, fmt: str, make: Callable[[], T]) -> T:
    try:
        return make()
    except Fail as fail:
        message = str(fail).removeprefix(f"{out}: ")
        raise Fail(f"{out}: error while converting {fmt}: {message}", hint=fail.hint) from fail
    except LockConflict as err:
        raise Fail(f"{out}: error while converting {fmt}: {err}", hint=err.hint) from err
    except OSError as err:
        raise Fail(f"{out}: error while converting {fmt}: {_create_error(out, err)}") from err
    except ConfigError as err:
        raise Fail(f"{out}: error while converting {fmt}: {describe(err)}") from err


def _create_error(out: str, err: OSError) -> str:
    """qemu-img's words for a new image that could not be made: opening the file
    (``os.open`` names it in the error) or writing its first metadata."""
    if err.filename is not None:
        return f"Could not create '{out}': {describe(err)}"
    return f"Could not write qcow2 header: {describe(err)}"


def _qcow2_target(out: str, args: _Args, size: int) -> Qcow2Stream:
    opts = parse_format_options("qcow2", args.options, out)
    backing = args.backing or opts.get("backing_file")
    backing_fmt = args.backing_fmt or opts.get("backing_fmt")
    create_opts = img_create.qcow2_options(out, opts, size, backing, backing_fmt)
    return Qcow2Stream(out, create_opts)


def _check_backing(out: str, stream: Qcow2Stream) -> None:
    """Opens the new image with its backing chain, as qemu-img does, to report a broken
    backing file before copying."""
    try:
        node = open_for(out, "qcow2")
    except Fail as fail:
        stream.close()
        raise Fail(str(fail)) from fail
    node.close()
