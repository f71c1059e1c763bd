"""What the query commands say about nodes: QEMU's BlockDeviceInfo and ImageInfo shapes.

``query-named-block-nodes`` lists every node's BlockDeviceInfo; ``query-block`` lists drives
with theirs under ``inserted``; HMP ``info block`` prints a summary of the same. Implicit
nodes (the fleecing guard) are shown as the node they filter, as QEMU hides its implicit
filters.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

from pyfleece.block.node import Node


def visible(node: Node | None) -> Node | None:
    """Skips implicit filter nodes down to the node they stand for."""
    while node is not None and getattr(node, "implicit", False):
        node = getattr(node, "filtered", None)
    return node


def filename(node: Node) -> str:
    """The file name a node is opened on (its own, or its file child's)."""
    own = getattr(node, "filename", None)
    if isinstance(own, str):
        return own
    uri = getattr(node, "uri", None)
    if isinstance(uri, str):
        return uri
    file = node.child("file") or node.child("image")
    return filename(file) if file is not None else ""


def backing(node: Node) -> Node | None:
    return visible(node.child("backing"))


def chain_depth(node: Node) -> int:
    depth = 0
    below = backing(node)
    while below is not None and depth < 1024:
        depth += 1
        below = backing(below)
    return depth


def actual_size(node: Node) -> int | None:
    name = filename(node)
    try:
        return os.stat(name).st_blocks * 512 if name else None
    except OSError:
        return None


def image_info(node: Node, *, with_chain: bool = False) -> dict[str, Any]:
    """ImageInfo: what ``qemu-img info --output=json`` shows for the node."""
    info: dict[str, Any] = {}
    below = backing(node)
    own = getattr(node, "info", None)
    extra: dict[str, Any] = own() if callable(own) else {}
    if below is not None:
        info["backing-filename-format"] = below.driver
    info["virtual-size"] = node.size
    info["filename"] = filename(node)
    if "cluster-size" in extra:
        info["cluster-size"] = extra["cluster-size"]
    info["format"] = node.driver
    size = actual_size(node)
    if size is not None:
        info["actual-size"] = size
    if "format-specific" in extra:
        info["format-specific"] = extra["format-specific"]
    if below is not None:
        info["full-backing-filename"] = filename(below)
        info["backing-filename"] = extra.get("backing-filename", filename(below))
        if with_chain:
            info["backing-image"] = image_info(below, with_chain=True)
    info["dirty-flag"] = bool(extra.get("dirty-flag", False))
    return info


def device_info(node: Node, *, with_chain: bool = False) -> dict[str, Any]:
    """BlockDeviceInfo, in the member order QEMU prints."""
    zero_throttle = {k: 0 for k in ("iops", "iops_rd", "iops_wr", "bps", "bps_rd", "bps_wr")}
    info: dict[str, Any] = {
        "detect_zeroes": "off",
        "image": image_info(node, with_chain=with_chain),
        "ro": node.read_only,
        "node-name": node.node_name,
        "backing_file_depth": chain_depth(node),
        "drv": node.driver,
        "write_threshold": 0,
        "encrypted": False,
        "cache": {"no-flush": False, "direct": False, "writeback": True},
        "file": filename(node),
        **zero_throttle,
    }
    below = backing(node)
    if below is not None:
        info["backing_file"] = info["image"]["backing-filename"]
    return info


def all_nodes(roots: list[Node]) -> Iterator[Node]:
    """Every visible node reachable from ``roots``, each once, parents first."""
    seen: set[int] = set()
    stack = list(reversed(roots))
    while stack:
        node = visible(stack.pop())
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        yield node
        stack.extend(reversed([c.node for c in node.children.values()]))


def hmp_block_summary(device: str, node: Node) -> str:
    """One drive, as HMP ``info block`` prints it."""
    ro = ", read-only" if node.read_only else ""
    lines = [f"{device} ({node.node_name}): {filename(node)} ({node.driver}{ro})"]
    lines.append("    Cache mode:       writeback")
    below = backing(node)
    if below is not None:
        lines.append(f"    Backing file:     {filename(below)} (chain depth: {chain_depth(node)})")
    return "\n".join(lines) + "\n"
