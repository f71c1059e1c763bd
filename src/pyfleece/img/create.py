"""``pyfleece img create``: new raw or qcow2 images, as ``qemu-img create`` makes them.

The steps and their error messages follow qemu-img's order: option syntax, the format's
options, the backing file (opened to check it and to take the size from it when none is
given), the size, then the "Formatting ..." line, then the format's own validation and the
file itself. qcow2 images come from ``block.qcow2.create`` (byte-identical to qemu-img's);
raw images are a truncated file whose first block is allocated, as qemu-img leaves them.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys

from pyfleece.block.locking import LockConflict, open_for_create
from pyfleece.block.qcow2 import create as qcow2_create
from pyfleece.errors import ConfigError, PyfleeceError
from pyfleece.img.common import INT64_MAX, Fail, cvtnum, describe, open_node, parse_args
from pyfleece.img.options import (
    FORMAT_OPTIONS,
    FormatOpts,
    check_option_list,
    help_text,
    parse_format_options,
    wants_help,
)

HELP = """\
usage: pyfleece img create [-q] [-f fmt] [-b backing_file [-F backing_fmt]] [-u]
                           [-o options] filename [size]

Creates a new disk image 'filename' of 'size' bytes (suffixes k, M, G, T, P, E) in
format 'fmt' (raw, the default, or qcow2). With -b, the image is a qcow2 overlay of
'backing_file' whose format -F names; the size defaults to the backing file's.
  -o options  format options, e.g. cluster_size=64k,compat=1.1,lazy_refcounts=on,
              refcount_bits=16,compression_type=zlib (use -o help to list them)
  -u          do not open the backing file (the size must then be given)
  -q          quiet: do not print the "Formatting" line
"""

#: qcow2 compat values qemu-img accepts, and the version each means.
COMPAT_VERSIONS = {"0.10": 2, "v2": 2, "1.1": 3, "v3": 3}


def run(argv: list[str]) -> int:
    opts, operands = parse_args(argv, "F:b:f:ho:qu", ["object=", "help"])
    fmt, base, base_fmt, option_text = "raw", None, None, ""
    quiet = no_open = False
    for opt, value in opts:
        if opt == "-f":
            fmt = value
        elif opt == "-b":
            base = value
        elif opt == "-F":
            base_fmt = value
        elif opt == "-o":
            check_option_list(value)
            option_text = f"{option_text},{value}" if option_text else value
        elif opt == "-q":
            quiet = True
        elif opt == "-u":
            no_open = True
        elif opt == "--object":
            raise Fail("--object is not supported by pyfleece")
    if option_text and wants_help(option_text):
        if fmt not in FORMAT_OPTIONS:
            raise Fail(f"Unknown file format '{fmt}'")
        sys.stdout.write(help_text(fmt))
        return 0
    if not operands:
        raise Fail("Expecting image file name", usage=True)
    filename = operands[0]
    size = None
    if len(operands) > 1:
        size = cvtnum("image size", operands[1], 0, INT64_MAX)
    if len(operands) > 2:
        raise Fail(f"Unexpected argument: {operands[2]}", usage=True)
    try:
        create(filename, fmt, size, option_text, base, base_fmt, quiet=quiet, no_open=no_open)
    except Fail as fail:
        cause = fail.__cause__
        if isinstance(cause, OSError) and cause.errno == errno.EFBIG:  # qemu-img's words
            hint = " (try using a larger cluster size)" if fmt == "qcow2" else ""
            message = f"The image size is too large for file format '{fmt}'{hint}"
            raise Fail(f"{filename}: {message}") from cause
        raise
    return 0


def create(
    filename: str,
    fmt: str,
    size: int | None,
    option_text: str,
    base: str | None,
    base_fmt: str | None,
    *,
    quiet: bool = False,
    no_open: bool = False,
) -> None:
    """Creates an image as ``qemu-img create`` does (also used by ``convert``).

    Raises:
        Fail: with qemu-img's message for whatever went wrong.
    """
    if fmt not in FORMAT_OPTIONS:
        raise Fail(f"{filename}: Unknown file format '{fmt}'")
    opts = parse_format_options(fmt, option_text, filename)
    if size is not None:
        if "size" in opts.values:
            raise Fail(f"{filename}: The image size must be specified only once")
        opts.set("size", size)
    if base is not None:
        opts.set("backing_file", base)
    if base_fmt is not None:
        opts.set("backing_fmt", base_fmt)
    if fmt == "raw" and "backing_file" in opts.values:
        raise Fail(f"{filename}: Backing file not supported for file format 'raw'")
    _check_backing(filename, opts, no_open)
    if "size" not in opts.values:
        raise Fail(f"{filename}: Image creation needs a size parameter")
    if not quiet:
        print(f"Formatting '{filename}', fmt={fmt} {opts.formatting_line()}", flush=True)
    try:
        if fmt == "qcow2":
            _create_qcow2(filename, opts)
        else:
            _create_raw(filename, opts)
    except ConfigError as err:
        raise Fail(f"{filename}: {err}") from err


def _check_backing(filename: str, opts: FormatOpts, no_open: bool) -> None:
    backing = opts.get("backing_file")
    if not isinstance(backing, str):
        return
    if backing == filename:
        raise Fail(
            f"{filename}: Error: Trying to create an image with the same filename as the "
            "backing file"
        )
    if backing == "":
        raise Fail(f"{filename}: Expected backing file name, got empty string")
    backing_fmt = opts.get("backing_fmt")
    if no_open:
        if backing_fmt is None:
            raise Fail(f"{filename}: Backing file specified without backing format")
        return
    full = full_backing_name(filename, backing)
    try:
        # Shared, as qemu-img opens it: a backing file in use by a VM may still be named.
        node = open_node(full, str(backing_fmt) if backing_fmt else None, force_share=True)
    except (PyfleeceError, OSError) as err:
        hint = "Could not open backing image."
        raise Fail(f"{filename}: {describe(err)}", hint=hint) from err
    try:
        if backing_fmt is None:
            raise Fail(
                f"{filename}: Backing file specified without backing format",
                hint=f"Detected format of {node.driver}.",
            )
        if "size" not in opts.values:
            opts.set("size", -(-node.size // 512) * 512)
    finally:
        node.close()


def full_backing_name(image: str, backing: str) -> str:
    """A backing name as QEMU resolves it: relative names are relative to the image's
    directory (as the image's name gives it, not made absolute)."""
    if backing.startswith("/") or backing.startswith("json:") or "://" in backing:
        return backing
    directory = os.path.dirname(image)
    return os.path.join(directory, backing) if directory else backing


def _create_qcow2(filename: str, opts: FormatOpts) -> None:
    size = int(opts.get("size", 0) or 0)
    backing, backing_fmt = opts.get("backing_file"), opts.get("backing_fmt")
    create_opts = qcow2_options(filename, opts, size, backing, backing_fmt)
    try:
        qcow2_create.create_image(filename, create_opts)
    except LockConflict as err:
        raise Fail(f"{filename}: {err}", hint=err.hint) from err
    except OSError as err:
        raise _cannot_create(filename, err) from err


def qcow2_options(
    filename: str,
    opts: FormatOpts,
    size: int,
    backing: int | bool | str | None,
    backing_fmt: int | bool | str | None,
) -> qcow2_create.CreateOptions:
    """Typed qcow2 creation options from ``-o`` values, validated in qemu-img's order.

    Raises:
        Fail: a value qemu-img would refuse (or pyfleece does not support).
    """
    compat = str(opts.get("compat", "1.1"))
    version = COMPAT_VERSIONS.get(compat)
    if version is None:
        raise Fail(f"{filename}: Parameter 'version' does not accept value '{compat}'")
    compression = str(opts.get("compression_type", "zlib"))
    if compression not in ("zlib", "zstd"):
        raise Fail(
            f"{filename}: Parameter 'compression-type' does not accept value '{compression}'"
        )
    prealloc = str(opts.get("preallocation", "off"))
    if prealloc not in ("off", "metadata", "falloc", "full"):
        raise Fail(f"{filename}: Parameter 'preallocation' does not accept value '{prealloc}'")
    create_opts = qcow2_create.CreateOptions(
        size=size,
        cluster_size=int(opts.get("cluster_size", 65536) or 0),
        version=version,
        lazy_refcounts=bool(opts.get("lazy_refcounts", False)),
        refcount_bits=int(opts.get("refcount_bits", 16) or 0),
        compression_type=compression,
        backing_file=str(backing) if backing is not None else None,
        backing_format=str(backing_fmt) if backing_fmt is not None else None,
        extended_l2=bool(opts.get("extended_l2", False)),
    )
    try:
        qcow2_create.validate(create_opts)
    except ConfigError as err:
        raise Fail(f"{filename}: {err}") from err
    if prealloc != "off":
        raise Fail(f"{filename}: pyfleece supports only preallocation=off for qcow2")
    return create_opts


def _create_raw(filename: str, opts: FormatOpts) -> None:
    prealloc = str(opts.get("preallocation", "off"))
    if prealloc not in ("off", "falloc", "full"):
        raise Fail(f"{filename}: invalid parameter value: {prealloc}")
    size = -(-int(opts.get("size", 0) or 0) // 512) * 512
    try:
        fd = open_for_create(filename)  # locked first, as QEMU: an image in use is untouched
    except LockConflict as err:
        raise Fail(f"{filename}: {err}", hint=err.hint) from err
    except OSError as err:
        raise _cannot_create(filename, err) from err
    try:
        _fill_raw(fd, size, prealloc)
    except _RawFailed as failed:
        reason = os.strerror(failed.err.errno or 5)
        raise Fail(f"{filename}: {failed.what}: {reason}") from failed.err
    finally:
        os.close(fd)


class _RawFailed(Exception):
    """A step of filling a new raw file failed; ``what`` is qemu-img's word for it."""

    def __init__(self, what: str, err: OSError) -> None:
        super().__init__(what)
        self.what = what
        self.err = err


def _fill_raw(fd: int, size: int, prealloc: str) -> None:
    """Sizes a new raw file and preallocates it as asked.

    Raises:
        _RawFailed: with qemu-img's words for the step that failed.
    """
    try:
        os.ftruncate(fd, size)
    except OSError as err:
        raise _RawFailed("Could not resize file", err) from err
    if prealloc == "falloc" and size:
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as err:
            raise _RawFailed("Could not preallocate new data", err) from err
    elif prealloc == "full":
        chunk = bytes(min(size, 1 << 20))
        try:
            for offset in range(0, size, len(chunk) or 1):
                os.pwrite(fd, chunk[: size - offset], offset)
        except OSError as err:
            raise _RawFailed("Could not write zeros for preallocation", err) from err
    elif size:
        # Like qemu-img, allocate the first block so that probing its alignment works
        # (and, as qemu-img, go on without it if even that does not fit).
        with contextlib.suppress(OSError):
            os.pwrite(fd, bytes(512 if size < 4096 else 4096), 0)


def _cannot_create(filename: str, err: OSError) -> Fail:
    return Fail(f"{filename}: Could not create '{filename}': {os.strerror(err.errno or 5)}")
