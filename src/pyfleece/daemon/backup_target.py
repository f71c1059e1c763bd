"""drive-backup's target: an image file named by the command, created or opened.

``mode=absolute-paths`` (the default) creates the file: in the source's format unless
``format`` says otherwise; with ``sync=none`` it is a qcow2 overlay whose backing file is the
source's file name, and the open node's backing edge is the source node itself, as QEMU does
(reads of units not copied yet fall through to the live disk, guarded by copy-before-write).
``mode=existing`` opens the file as it is. The node is anonymous and goes when the job ends.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from pyfleece.block import locking
from pyfleece.block.qcow2.create import CreateOptions, create_image
from pyfleece.daemon.nodeinfo import filename
from pyfleece.errors import CommandError, PyfleeceError

if TYPE_CHECKING:
    from pyfleece.block.node import Node
    from pyfleece.daemon.core import Daemon


def open_target(ctx: Daemon, source: Node, args: dict[str, Any]) -> Node:
    """Creates (unless mode=existing) and opens drive-backup's target.

    Raises:
        CommandError: the format cannot be used, or the file cannot be created or opened.
    """
    path = args["target"]
    mode = args.get("mode", "absolute-paths")
    fmt = args.get("format")
    sync = args["sync"]
    if mode == "absolute-paths":
        fmt = fmt or source.driver
        _create(path, fmt, source, sync)
    options: dict[str, Any] = {"file": {"driver": "file", "filename": path}}
    options["driver"] = fmt or _probe(path)
    if sync == "none":
        if options["driver"] != "qcow2":
            raise CommandError(f"Backing file not supported for file format '{options['driver']}'")
        options["backing"] = source.node_name
    try:
        return ctx.graph.open(options)
    except PyfleeceError as err:
        raise CommandError(f"Could not open '{path}': {err}") from err


def _probe(path: str) -> str:
    from pyfleece.block.image import probe_format

    return probe_format(path)


def _create(path: str, fmt: str, source: Node, sync: str) -> None:
    try:
        if fmt == "qcow2":
            backing = filename(source) if sync == "none" else None
            create_image(
                path,
                CreateOptions(
                    size=source.size,
                    backing_file=backing or None,
                    backing_format=source.driver if backing else None,
                ),
            )
        elif fmt == "raw":
            if sync == "none":  # a snapshot needs the source as backing: raw has none
                raise CommandError("Backing file not supported for file format 'raw'")
            fd = locking.open_for_create(path)  # refuses an image another process holds
            try:
                os.ftruncate(fd, source.size)
            finally:
                os.close(fd)
        else:
            raise CommandError(f"Cannot create images in format '{fmt}'")
    except OSError as err:
        raise CommandError(f"Could not create '{path}': {os.strerror(err.errno or 5)}") from err
    except PyfleeceError as err:
        if isinstance(err, CommandError):
            raise
        raise CommandError(f"Could not create '{path}': {err}") from err


def discard(ctx: Daemon, target: Node) -> None:
    """Drops the job's anonymous target once the job no longer needs it."""
    if target.node_name in ctx.graph and not target.refs():
        ctx.graph.remove(target.node_name)
