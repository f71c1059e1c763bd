"""Drives: ``--drive``, HMP ``drive_add`` and ``drive_del``, as the 2013 seed defined them.

A drive is a named device (``id``) whose top node carries the same name, so ``backing=ide0-hd0``
and ``blockdev-backup device=ide0-hd0`` both find it. Legacy ``-drive`` options become
``blockdev-add`` options here (``file=`` a file name or nested ``file.*`` options, ``format=``
probed when absent, ``readonly=``, ``backing=`` to override the image's backing file with an
existing node). ``drive_del`` releases the drive's soft references first (its NBD exports go,
their clients are disconnected), then deletes it; hard references (a job's target, a backing
edge) make it fail with the holder's name.
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass
from typing import Any

from pyfleece.block.graph import Graph
from pyfleece.block.image import image_options
from pyfleece.block.node import Node
from pyfleece.errors import ConfigError, DuplicateNode, NodeNotFound

#: -drive options that only concern guest devices or host tuning: accepted, no effect here.
_IGNORED = (
    *("cache", "aio", "media", "serial", "werror", "rerror", "bus", "unit", "index"),
    *("copy-on-read", "detect-zeroes", "discard", "auto-read-only", "force-share"),
)
_ON = ("on", "true", "yes")
_OFF = ("off", "false", "no")


@dataclass
class Drive:
    id: str
    node: Node


def _flag(value: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).lower()
    if text in _ON:
        return True
    if text in _OFF:
        return False
    raise ConfigError(f"Parameter '{key}' expects 'on' or 'off'")


class DriveTable:
    """The daemon's drives, on top of its node graph."""

    def __init__(self, graph: Graph) -> None:
        self.graph = graph
        self._drives: dict[str, Drive] = {}
        self._lock = threading.RLock()
        self._auto = itertools.count(0)

    def __iter__(self) -> Any:
        with self._lock:
            return iter(list(self._drives.values()))

    def find(self, drive_id: str) -> Drive | None:
        with self._lock:
            return self._drives.get(drive_id)

    def node_of(self, name: str) -> Node | None:
        """The node a drive id or node name designates (drives first, as QEMU's lookups)."""
        drive = self.find(name)
        return drive.node if drive is not None else self.graph.find(name)

    def add(self, options: dict[str, Any]) -> Drive:
        """Adds a drive from legacy ``-drive`` options (already keyval-parsed).

        Raises:
            ConfigError: bad or unsupported options.
            DuplicateNode: the id is taken.
            ImageError, BlockError, NodeNotFound: the image or the backing cannot be used.
        """
        with self._lock:
            drive_id, blockdev = self._blockdev_options(dict(options))
            if drive_id in self._drives:
                raise DuplicateNode(f"Duplicate ID '{drive_id}' for drive")
            node = self.graph.open(blockdev)
            drive = Drive(drive_id, node)
            self._drives[drive_id] = drive
            return drive

    def _blockdev_options(self, opts: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        drive_id = opts.pop("id", None) or f"none{next(self._auto)}"
        if not isinstance(drive_id, str):
            raise ConfigError("Parameter 'id' expects a string")
        interface = opts.pop("if", "none")
        if interface != "none":
            raise ConfigError(f"if={interface} is not supported: pyfleece has no guest devices")
        if _flag(opts.pop("snapshot", "off"), "snapshot"):
            raise ConfigError("snapshot=on is not supported")
        for key in _IGNORED:
            opts.pop(key, None)
        read_only = _flag(opts.pop("readonly", opts.pop("read-only", "off")), "readonly")
        fmt = opts.pop("format", None)
        backing = opts.pop("backing", None)
        node_name = opts.pop("node-name", drive_id)
        file = opts.pop("file", None)
        if file is None:
            raise ConfigError(f"Drive '{drive_id}' needs a file (file=...)")
        if isinstance(file, str):
            blockdev = image_options(file, fmt)
        elif isinstance(file, dict):
            blockdev = {"driver": fmt or "raw", "file": file}
        else:
            raise ConfigError("Parameter 'file' expects a file name or options")
        blockdev.update(opts)  # format-specific options (e.g. lazy-refcounts)
        blockdev["node-name"] = node_name
        blockdev["read-only"] = read_only
        if backing is not None:
            blockdev["backing"] = self._backing_name(backing)
        return drive_id, blockdev

    def _backing_name(self, name: Any) -> str:
        if not isinstance(name, str) or not name:
            raise ConfigError("Parameter 'backing' expects a device or node name")
        node = self.node_of(name)
        if node is None:
            raise NodeNotFound(f"Device '{name}' not found")
        return node.node_name

    def delete(self, drive_id: str) -> None:
        """``drive_del``: exports of the drive go first, then the drive.

        Raises:
            NodeNotFound: no drive has that id.
            NodeBusy: a hard reference (job, backing edge) holds the drive.
        """
        with self._lock:
            drive = self._drives.get(drive_id)
            if drive is None:
                raise NodeNotFound(f"Device '{drive_id}' not found")
            drive.node.check_deletable(allow_soft=True)
            self.graph.remove(drive.node.node_name, release_soft=True)
            del self._drives[drive_id]

    def forget_node(self, node: Node) -> None:
        """Drops drives whose node was deleted by other means (blockdev-del)."""
        with self._lock:
            for drive_id in [d.id for d in self._drives.values() if d.node is node]:
                del self._drives[drive_id]
