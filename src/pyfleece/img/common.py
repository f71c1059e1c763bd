"""What every ``pyfleece img`` command shares: qemu-img's command-line conventions.

GNU-style option parsing with qemu-img's error wording, sizes with suffixes as qemu-img
reads them (``cvtnum``), sizes as it prints them (``size_to_str``), the ``--output`` switch,
opening images with its "Could not open 'x': ..." errors, and JSON printed the way QEMU
prints a QDict (keys in hash-bucket order, four-space indentation), so that our output can
be compared with qemu-img's text for text.

Errors travel as ``Fail`` (a message and an exit status); ``main`` prints them once.
"""

from __future__ import annotations

import getopt
import os
import re
import sys
from collections.abc import Sequence
from typing import Any

from pyfleece.block.image import is_uri, open_image, probe_format
from pyfleece.block.locking import LockConflict
from pyfleece.block.node import Node
from pyfleece.errors import BlockError, PyfleeceError

PROG = "pyfleece img"
TRY_HELP = f"Try '{PROG} --help' for more information"
INT64_MAX = (1 << 63) - 1


class Fail(Exception):
    """A command failed: ``message`` goes to stderr after the program name.

    Attributes:
        status: the exit status (1 unless the command documents another).
        hint: extra lines printed verbatim after the message (QEMU's error hints).
        usage: follow the message with the "Try ... --help" line, as qemu-img's
            command-line errors do.
    """

    def __init__(self, message: str, status: int = 1, *, hint: str = "", usage: bool = False):
        super().__init__(message)
        self.status = status
        self.hint = hint
        self.usage = usage


def report(message: str) -> None:
    """Prints an error the way qemu-img does: ``<program>: <message>``."""
    sys.stderr.write(f"{PROG}: {message}\n")
    sys.stderr.flush()


def print_fail(fail: Fail) -> None:
    for line in str(fail).split("\n"):
        report(line)
    if fail.hint:
        sys.stderr.write(fail.hint if fail.hint.endswith("\n") else fail.hint + "\n")
    if fail.usage:
        sys.stderr.write(TRY_HELP + "\n")


def parse_args(
    argv: Sequence[str], shortopts: str, longopts: Sequence[str]
) -> tuple[list[tuple[str, str]], list[str]]:
    """GNU getopt (options and operands may mix), failing with qemu-img's messages.

    Raises:
        Fail: an unknown option, or an option missing its argument.
    """
    try:
        return getopt.gnu_getopt(list(argv), shortopts, list(longopts))
    except getopt.GetoptError as err:
        name = err.opt
        dashed = f"-{name}" if len(name) == 1 else f"--{name}"
        if "requires argument" in err.msg:
            raise Fail(f"missing argument for option '{dashed}'", usage=True) from err
        raise Fail(f"unrecognized option '{dashed}'", usage=True) from err


#: compiled on first use (``re`` caches it), not at every start-up
_SIZE_RE = r"^\s*(0[xX][0-9a-fA-F]+|\d+(?:\.\d*)?)([bBkKmMgGtTpPeE]?)$"
_SCALE = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
_SCALE |= {"t": 1 << 40, "p": 1 << 50, "e": 1 << 60}


def strtosz(text: str) -> int | None:
    """qemu's size syntax: a number, an optional fraction, a suffix; None if invalid.

    Returns -1 for values that do not fit in 64 bits (qemu's ERANGE).
    """
    match = re.match(_SIZE_RE, text)
    if not match:
        return None
    number, suffix = match.groups()
    scale = _SCALE[suffix.lower()]
    if number.lower().startswith("0x"):
        if suffix:
            return None
        value = int(number, 16)
    elif "." in number:
        if not suffix or suffix in "bB":
            return None
        whole, _, frac = number.partition(".")
        value = int(whole) * scale + int(float("0." + (frac or "0")) * scale)
    else:
        value = int(number) * scale
    return value if value < 1 << 64 else -1


def cvtnum(name: str, text: str, minimum: int = 0, maximum: int = INT64_MAX) -> int:
    """Parses a size argument as qemu-img does, with its two-line error.

    Raises:
        Fail: not a size, or outside [minimum, maximum].
    """
    value = strtosz(text)
    if value is None:
        raise Fail(
            f"Invalid {name} specified. You may use k, M, G, T, P or E suffixes for\n"
            "kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes."
        )
    if value < minimum or value > maximum:
        raise Fail(f"Invalid {name} specified. Must be between {minimum} and {maximum}.")
    return value


def size_to_str(value: int) -> str:
    """A size the way QEMU prints it: three significant digits and a binary unit."""
    units = ("", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei")
    scaled = value / (1000.0 / 1024.0)
    index = 0
    while scaled >= 1024 and index < len(units) - 1:
        scaled /= 1024
        index += 1
    return f"{value / (1 << (10 * index)):.3g} {units[index]}B"


def output_format(value: str | None) -> str:
    """The ``--output`` argument, validated: "human" (default) or "json".

    Raises:
        Fail: any other value.
    """
    if value is None or value == "human":
        return "human"
    if value == "json":
        return "json"
    raise Fail("--output must be used with human or json as argument.")


# -- JSON as QEMU prints it ----------------------------------------------------------------


def _qdict_bucket(key: str) -> int:
    """QEMU's QDict hash (of the "tdb" family), modulo its 512 buckets."""
    data = key.encode()
    value = (0x238F13AF * len(data)) & 0xFFFFFFFF
    for i, byte in enumerate(data):
        value = (value + (byte << (i * 5 % 24))) & 0xFFFFFFFF
    return ((1103515243 * value + 12345) & 0xFFFFFFFF) % 512


def qdict_order(value: Any) -> Any:
    """Orders dict keys as QEMU iterates a QDict: by bucket, later insertions first."""
    if isinstance(value, dict):
        keyed = [(_qdict_bucket(k), -i, k) for i, k in enumerate(value)]
        return {k: qdict_order(value[k]) for _, _, k in sorted(keyed)}
    if isinstance(value, list):
        return [qdict_order(item) for item in value]
    return value


def qjson(value: Any) -> str:
    """Pretty JSON as qemu-img prints it (no trailing newline): four-space indentation,
    and empty containers opened and closed on lines of their own."""
    return _pretty(qdict_order(value), 0)


def _pretty(value: Any, level: int) -> str:
    import json  # here: only the JSON outputs need it, and start-up time counts

    if isinstance(value, dict):
        items = [f"{json.dumps(k)}: {_pretty(v, level + 1)}" for k, v in value.items()]
        return _block("{", "}", items, level)
    if isinstance(value, list):
        return _block("[", "]", [_pretty(v, level + 1) for v in value], level)
    return json.dumps(value)


def _block(opening: str, closing: str, items: list[str], level: int) -> str:
    inner = " " * (4 * (level + 1))
    body = ",\n".join(inner + item for item in items)
    return f"{opening}\n{body}{chr(10) if items else ''}{' ' * (4 * level)}{closing}"


# -- opening images ------------------------------------------------------------------------


def open_node(
    filename: str,
    fmt: str | None,
    *,
    read_only: bool = True,
    no_backing: bool = False,
    force_share: bool = False,
    stable: bool = False,
) -> Node:
    """Opens an image; errors keep the driver's own wording (see ``open_for``).
    ``force_share`` is ``-U``; ``stable`` unshares writes (convert's source), see
    ``block.image.open_image``.

    Raises:
        PyfleeceError, OSError: the image cannot be opened.
    """
    if fmt is None and not (filename.startswith("json:") or is_uri(filename)):
        fmt = probe_format(filename)
    extra: dict[str, Any] | None = None
    if no_backing and fmt == "qcow2":
        extra = {"backing": None}
    return open_image(
        filename, fmt, read_only=read_only, extra=extra, force_share=force_share, stable=stable
    )


def open_for(
    filename: str,
    fmt: str | None,
    *,
    read_only: bool = True,
    no_backing: bool = False,
    status: int = 1,
    force_share: bool = False,
    stable: bool = False,
) -> Node:
    """Opens an image as a qemu-img command does.

    Raises:
        Fail: "Could not open 'x': <reason>", with ``status`` (and, for a locked image,
            QEMU's "Is another process using the image [x]?" hint).
    """
    try:
        return open_node(
            filename,
            fmt,
            read_only=read_only,
            no_backing=no_backing,
            force_share=force_share,
            stable=stable,
        )
    except (PyfleeceError, OSError) as err:
        message = f"Could not open '{filename}': {describe(err)}"
        raise Fail(message, status, hint=lock_hint(err)) from err


def lock_hint(err: BaseException) -> str:
    """QEMU's hint after a lock failure ("Is another process using the image [x]?")."""
    return err.hint if isinstance(err, LockConflict) else ""


def describe(err: BaseException) -> str:
    """The text of an error, without Python's decorations."""
    if isinstance(err, BlockError | PyfleeceError):
        return str(err)
    if isinstance(err, OSError) and err.errno is not None:
        return os.strerror(err.errno)
    return str(err)


def nbd_name(node: Node | None) -> str | None:
    """The name QEMU gives an image reached over NBD (a format node over an NBD node, or
    the NBD node itself): ``nbd+unix:///EXPORT?socket=PATH``, ``nbd://HOST:PORT/EXPORT``,
    without the export part when it is empty (QEMU's nbd_refresh_filename); None when the
    node is not one."""
    for candidate in (node, node.child("file") if node is not None else None):
        if candidate is None or candidate.driver != "nbd":
            continue
        uri = getattr(getattr(candidate, "client", None), "uri", None)
        if uri is None:
            return None
        export = f"/{uri.export}" if uri.export else ""
        if uri.transport == "unix":
            return f"nbd+unix://{'/' if export else ''}{uri.export}?socket={uri.socket}"
        return f"nbd://{uri.host}:{uri.port}{export}"
    return None


def allocated_size(node: Node) -> int | None:
    """Bytes the image's storage occupies on the host: the sum over its data files."""
    fd = getattr(node, "fd", None)
    if isinstance(fd, int):
        return os.fstat(fd).st_blocks * 512
    total = None
    for role in ("file", "data-file"):
        child = node.child(role)
        if child is not None:
            size = allocated_size(child)
            if size is not None:
                total = (total or 0) + size
    return total
