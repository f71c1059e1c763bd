"""Opening an image by file name, as the command-line tools do.

``open_image("disk.qcow2")`` probes the format, builds blockdev options
(``{"driver": "qcow2", "file": {"driver": "file", "filename": ...}}``) and opens the node.
A name may also be an NBD URI (``nbd://``, ``nbd+unix://``, ``nbds://``) or QEMU's
``json:{...}`` pseudo-file name holding blockdev options.
"""

from __future__ import annotations

import os
from typing import Any

from pyfleece.block.node import Node
from pyfleece.block.registry import OpenContext, open_node
from pyfleece.errors import ConfigError, ImageError

QCOW2_MAGIC = b"QFI\xfb"
_URI_SCHEMES = ("nbd://", "nbd+unix://", "nbds://", "nbds+unix://", "nbd+tcp://", "nbds+tcp://")


def is_uri(name: str) -> bool:
    return name.startswith(_URI_SCHEMES)


def probe_format(filename: str) -> str:
    """Guesses an image's format from its first bytes: qcow2 by its magic, else raw.

    Raises:
        ImageError: the file cannot be read.
    """
    try:
        with open(filename, "rb") as f:
            head = f.read(4)
    except OSError as err:
        raise ImageError(f"Could not open '{filename}': {os.strerror(err.errno or 5)}") from err
    return "qcow2" if head == QCOW2_MAGIC else "raw"


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


def open_image(
    filename: str,
    fmt: str | None = None,
    *,
    read_only: bool = True,
    extra: dict[str, Any] | None = None,
) -> Node:
    """Opens an image file as the tools do; ``extra`` adds format options, such as
    ``{"backing": None}`` to open a qcow2 image without its backing chain.

    Raises:
        ImageError, ConfigError, BlockError: the image cannot be opened.
    """
    options = image_options(filename, fmt)
    if extra:
        options.update(extra)
    return open_node(options, OpenContext(read_only=read_only))


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
