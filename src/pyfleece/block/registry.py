"""Opening nodes from blockdev options: the driver table and the child-reference rules.

Options have QEMU's ``blockdev-add`` shape: ``{"driver": "qcow2", "node-name": "disk",
"file": {"driver": "file", "filename": "a.qcow2"}, "backing": "base"}``. A child given as a
dict is opened on the spot and owned by its parent (closed with it); a child given as a
string names a node already in the graph, which the parent then references.

Driver modules are imported on first use (``_MODULES``), so that a command opening plain
files never pays for the NBD client and its TLS stack; ``drivers()`` still lists them all.
"""

from __future__ import annotations

import importlib
import itertools
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pyfleece.block.options import Options
from pyfleece.errors import ConfigError, NodeNotFound

if TYPE_CHECKING:
    from pyfleece.block.graph import Graph
    from pyfleece.block.node import Node


class OpenContext:
    """What a driver's opener may use besides its own options.

    Attributes:
        graph: where string references to other nodes are looked up (None: none allowed).
        read_only: open for reading only; children inherit it unless they say otherwise.
        chain: real paths of the image files already open along this backing chain, so
            that a chain that loops back on itself is refused.
    """

    __slots__ = ("chain", "graph", "read_only")

    def __init__(
        self, graph: Graph | None = None, read_only: bool = False, chain: tuple[str, ...] = ()
    ) -> None:
        self.graph = graph
        self.read_only = read_only
        self.chain = chain


Opener = Callable[[Options, str, OpenContext], "Node"]

_DRIVERS: dict[str, Opener] = {}
#: driver name -> the module whose import registers it
_MODULES: dict[str, str] = {
    "fault": "pyfleece.block.fault",
    "file": "pyfleece.block.file",
    "host_device": "pyfleece.block.file",
    "memory": "pyfleece.block.memory",
    "nbd": "pyfleece.block.nbd",
    "null-co": "pyfleece.block.null",
    "qcow2": "pyfleece.block.qcow2.driver",
    "raw": "pyfleece.block.raw",
}
_names = itertools.count(1)
_names_lock = threading.Lock()

#: How many images deep a backing chain may go before we call it hostile.
MAX_CHAIN_DEPTH = 64


def register(name: str) -> Callable[[Opener], Opener]:
    """Decorator: registers ``opener(options, node_name, ctx)`` for driver ``name``."""

    def deco(fn: Opener) -> Opener:
        _DRIVERS[name] = fn
        return fn

    return deco


def drivers() -> list[str]:
    """Every driver name that ``open_node`` accepts (without importing the drivers)."""
    return sorted(_DRIVERS.keys() | _MODULES.keys())


def auto_node_name() -> str:
    """A generated node name, in QEMU's style (names starting with '#' are reserved)."""
    with _names_lock:
        return f"#block{next(_names):03d}"


def open_node(options: dict[str, Any], ctx: OpenContext | None = None) -> Node:
    """Opens a node (and its children) from blockdev-add-shaped options.

    Raises:
        ConfigError: unknown driver, missing or unknown options.
        ImageError: the image cannot be used.
        BlockError, OSError-derived errors: the file cannot be opened.
    """
    ctx = ctx or OpenContext()
    opts = Options(options, "Block node")
    driver = opts.get_str("driver")
    opener = _opener(driver)
    if opener is None:
        raise ConfigError(f"Unknown driver '{driver}'")
    opts.where = f"Block format '{driver}'"
    name = opts.get_str("node-name", None) or auto_node_name()
    read_only = opts.get_bool("read-only", ctx.read_only)
    for ignored in ("cache", "aio", "discard", "detect-zeroes", "auto-read-only", "force-share"):
        opts.raw(ignored, None)
    sub_ctx = OpenContext(ctx.graph, read_only, ctx.chain)
    return opener(opts, name, sub_ctx)


def open_child(value: Any, ctx: OpenContext, role: str) -> tuple[Node, bool]:
    """Resolves a child reference: a node name in the graph, or options to open.

    Returns:
        The node, and whether the parent owns it (True when opened here).
    """
    if isinstance(value, str):
        if ctx.graph is None:
            raise ConfigError(f"Cannot refer to node '{value}' here ({role})")
        node = ctx.graph.find(value)
        if node is None:
            raise NodeNotFound(f"Cannot find device='{value}' nor node-name='{value}'")
        return node, False
    if isinstance(value, dict):
        return open_node(value, ctx), True
    raise ConfigError(f"Invalid parameter type for '{role}', expected: BlockdevRef")


def _opener(driver: str) -> Opener | None:
    """The opener of ``driver``, importing its module the first time it is needed."""
    opener = _DRIVERS.get(driver)
    if opener is None and driver in _MODULES:
        importlib.import_module(_MODULES[driver])  # its @register fills the table
        opener = _DRIVERS.get(driver)
    return opener
