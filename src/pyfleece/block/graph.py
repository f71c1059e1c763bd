"""The named-node table: which nodes exist, and whether one may be deleted.

The graph owns the nodes added to it by name (``blockdev-add``, ``--blockdev``, drives).
Deletion follows the references each node carries (see ``node.Ref``): hard references always
refuse it; soft ones (NBD exports) refuse ``blockdev-del`` but are released by ``drive_del``.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

from pyfleece.block.locking import opening
from pyfleece.block.node import Node
from pyfleece.block.registry import OpenContext, open_node
from pyfleece.errors import DuplicateNode, NodeNotFound


class Graph:
    """Nodes by node name. Thread-safe: monitors and jobs use it concurrently."""

    def __init__(self) -> None:
        self._nodes: dict[str, Node] = {}
        self._lock = threading.RLock()

    def __iter__(self) -> Iterator[Node]:
        with self._lock:
            return iter(list(self._nodes.values()))

    def __contains__(self, name: str) -> bool:
        with self._lock:
            return name in self._nodes

    def find(self, name: str) -> Node | None:
        with self._lock:
            return self._nodes.get(name)

    def get(self, name: str) -> Node:
        """Raises NodeNotFound with QEMU's wording when there is no such node."""
        node = self.find(name)
        if node is None:
            raise NodeNotFound(f"Cannot find device='{name}' nor node-name='{name}'")
        return node

    def add(self, node: Node) -> Node:
        with self._lock:
            if node.node_name in self._nodes:
                raise DuplicateNode(f"Duplicate nodes with node-name='{node.node_name}'")
            self._nodes[node.node_name] = node
        return node

    def open(self, options: dict[str, Any], *, read_only: bool = False) -> Node:
        """Opens a node from blockdev options and adds it (children it opens stay unnamed
        in the table unless they were given node names, in which case they are added too).
        """
        with self._lock:
            name = options.get("node-name")
            if isinstance(name, str) and name in self._nodes:
                raise DuplicateNode(f"Duplicate nodes with node-name='{name}'")
            with opening(options, read_only):  # force-share reaches the nodes opened inside
                node = open_node(options, OpenContext(self, read_only))
            try:
                self._add_tree(node, explicit=True)
            except DuplicateNode:
                node.close()
                raise
            return node

    def _add_tree(self, node: Node, *, explicit: bool) -> None:
        if explicit or not node.node_name.startswith("#"):
            if node.node_name in self._nodes and self._nodes[node.node_name] is not node:
                raise DuplicateNode(f"Duplicate nodes with node-name='{node.node_name}'")
            self._nodes[node.node_name] = node
        for child in node.children.values():
            if child.owned:
                self._add_tree(child.node, explicit=False)

    def remove(self, name: str, *, release_soft: bool = False) -> None:
        """Deletes a node: its hard references must be gone; soft ones are released first
        when ``release_soft`` (drive_del), and refuse otherwise (blockdev-del).

        Raises:
            NodeNotFound: no such node.
            NodeBusy: a reference forbids it; the message names the holder.
        """
        with self._lock:
            node = self.get(name)
            node.check_deletable(allow_soft=release_soft)
            if release_soft:
                for ref in node.refs():
                    if ref.on_release is not None:
                        ref.on_release()
                    ref.release()
            node.check_deletable(allow_soft=False)
            self._forget_tree(node)
        node.close()

    def _forget_tree(self, node: Node) -> None:
        if self._nodes.get(node.node_name) is node:
            del self._nodes[node.node_name]
        for child in node.children.values():
            if child.owned and len(child.node.refs()) == 1:
                self._forget_tree(child.node)

    def close_all(self) -> None:
        """Closes every node, parents before children (shutdown)."""
        with self._lock:
            nodes = list(self._nodes.values())
            self._nodes.clear()
        children = {c.node for n in nodes for c in n.children.values()}
        for node in [n for n in nodes if n not in children] + [n for n in nodes if n in children]:
            node.close()
