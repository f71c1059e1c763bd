"""Opening an image by file name, as the command-line tools do.

``open_image("disk.qcow2")`` probes the format, builds blockdev options
(``{"driver": "qcow2", "file": {"driver": "file", "filename": ...}}``) and opens the node.
A name may also be an NBD URI (``nbd://``, ``nbd+unix://``, ``nbds://``) or QEMU's
``json:{...}`` pseudo-file name holding blockdev options.

The tool that opens an image is its user, and claims permissions on it as QEMU's tools do
(``block/locking.py``): reading (and writing, when writable), sharing everything unless it
needs the image to hold still (``stable``: qemu-img convert's source, which no one may
write or resize meanwhile). ``force_share`` is qemu-img's ``-U``: read-only, and the nodes
share everything, so images other processes hold open for writing can still be read.
"""

from __future__ import annotations

import os
from typing import Any

from pyfleece.block import locking
from pyfleece.block.node import Node
from pyfleece.block.registry import OpenContext, open_node
from pyfleece.errors import ConfigError, ImageError

QCOW2_MAGIC = b"QFI\xfb"
_URI_SCHEMES = ("nbd://", "nbd+unix://", "nbds://", "nbds+unix://", "nbd+tcp://", "nbds+tcp://")


def is_uri(name: str) -> bool:
    return name.startswith(_URI_SCHEMES)


def probe_format(filename: str) -> str:
    """Guesses an image's format as qemu-img does: qcow2 needs its magic, a version of at
    least 2 and a whole header; anything else is raw.

    Raises:
        ImageError: the file cannot be read (QEMU's words for a directory).
    """
    try:
        with open(filename, "rb") as f:
            head = f.read(2048)
    except IsADirectoryError as err:
        raise ImageError(f"'file' driver requires '{filename}' to be a regular file") from err
    except OSError as err:
        raise ImageError(f"Could not open '{filename}': {os.strerror(err.errno or 5)}") from err
    version = int.from_bytes(head[4:8], "big")
    return "qcow2" if len(head) >= 112 and head[:4] == QCOW2_MAGIC and version >= 2 else "raw"


def protocol_options(filename: str) -> dict[str, Any]:
    """Blockdev options for the protocol layer that reaches ``filename``."""
    if filename.startswith("json:"):
        return _json_options(filename)
    if is_uri(filename):
        return {"driver": "nbd", "uri": filename}
    return {"driver": "file", "filename": filename}


def image_options(filename: str, fmt: str | None = None) -> dict[str, Any]:
    """Blockdev options opening ``filename`` with format ``fmt`` (probed when None)."""
    if filename.startswith("json:"):
        opts = _json_options(filename)
        opts.setdefault("driver", fmt or "raw")
        return opts
    if fmt is None:
        fmt = "raw" if is_uri(filename) else probe_format(filename)
    return {"driver": fmt, "file": protocol_options(filename)}


#: Who a tool's claim names in a conflict (QEMU's anonymous BlockBackend).
TOOL_HOLDER = "a block device"


def open_image(
    filename: str,
    fmt: str | None = None,
    *,
    read_only: bool = True,
    extra: dict[str, Any] | None = None,
    force_share: bool = False,
    stable: bool = False,
) -> Node:
    """Opens an image file as the tools do; ``extra`` adds format options, such as
    ``{"backing": None}`` to open a qcow2 image without its backing chain.

    Raises:
        ImageError, ConfigError, BlockError: the image cannot be opened (LockConflict:
            another process holds it in a way that forbids this use).
    """
    options = image_options(filename, fmt)
    if extra:
        options.update(extra)
    if force_share:
        options["force-share"] = True
    with locking.opening(options, read_only):
        node = open_node(options, OpenContext(read_only=read_only))
        try:
            claim_as_tool(node, writable=not read_only, stable=stable and not force_share)
        except BaseException:
            node.close()
            raise
    return node


def claim_as_tool(node: Node, *, writable: bool, stable: bool = False) -> None:
    """A tool's permissions on the image it opened (QEMU's blk_new_open).

    Raises:
        PermissionConflict, LockConflict: the image is in use in a way that forbids it.
    """
    perm = locking.Perm.CONSISTENT_READ
    if writable:
        perm |= locking.Perm.WRITE
    shared = locking.SHARED_READ if stable else locking.ALL
    locking.claim(node, locking.Claim(TOOL_HOLDER, "root", perm, shared))


def _json_options(filename: str) -> dict[str, Any]:
    import json  # here: rarely needed, and the short-lived tools' start-up time counts

    try:
        value = json.loads(filename[len("json:") :])
    except json.JSONDecodeError as err:
        raise ConfigError(f"Could not parse the JSON options: {err}") from err
    if not isinstance(value, dict):
        raise ConfigError("Could not parse the JSON options: not an object")
    return _unflatten(value)


def _unflatten(value: dict[str, Any]) -> dict[str, Any]:
    """QEMU's json: names may use dotted keys ("file.filename"); nest them."""
    out: dict[str, Any] = {}
    for key, item in value.items():
        parts = key.split(".")
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = _unflatten(item) if isinstance(item, dict) else item
    return out
