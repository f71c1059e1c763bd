"""What the query commands say about nodes: QEMU's BlockDeviceInfo and ImageInfo shapes.

``query-named-block-nodes`` lists every node's BlockDeviceInfo; ``query-block`` lists drives
with theirs under ``inserted``; HMP ``info block`` prints a summary of the same. Implicit
nodes (the fleecing guard) are shown as the node they filter, as QEMU hides its implicit
filters.

File names follow QEMU's rule (block.c, bdrv_refresh_filename): a node whose data a plain
file name describes is shown by that name (its own, or its primary child's); one whose
options change what that file would show (a raw window with ``offset``/``size``, a qcow2
whose backing is not the one its header names, a null-co disk of a chosen size) is shown as
``json:`` followed by its options, in the key order QEMU's QDict iterates. Sizes are shown
in whole 512-byte sectors, as QEMU counts them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

from pyfleece.block.node import Node
from pyfleece.img.common import qdict_order

SECTOR = 512
#: null-co's size when none is given: a disk of that size is described by "null-co://".
NULL_DEFAULT_SIZE = 1 << 30


def visible(node: Node | None) -> Node | None:
    """Skips implicit filter nodes down to the node they stand for."""
    while node is not None and getattr(node, "implicit", False):
        node = getattr(node, "filtered", None)
    return node


def described(node: Node) -> tuple[str | None, dict[str, Any]]:
    """A node's exact file name (None when a plain name cannot describe it) and its
    options as QEMU gathers them for a ``json:`` name (driver, strong options, children)."""
    node = visible(node) or node
    if node.driver in ("file", "host_device"):
        name = str(getattr(node, "filename", ""))
        return name, {"driver": node.driver, "filename": name}
    if node.driver == "null-co":
        opts: dict[str, Any] = {"driver": "null-co"}
        if node.size != NULL_DEFAULT_SIZE:
            opts["size"] = node.size
        return ("null-co://" if len(opts) == 1 else None), opts
    if node.driver == "raw":
        return _format(node, _raw_strong(node), backing_overridden=False)
    if node.driver == "qcow2":
        return _format(node, {}, backing_overridden=_backing_overridden(node))
    uri = getattr(node, "uri", None)
    if isinstance(uri, str):
        return uri, {"driver": node.driver, "uri": uri}
    own = getattr(node, "filename", None)
    if isinstance(own, str):
        return own, {"driver": node.driver, "filename": own}
    child = node.child("file") or node.child("image")
    if child is not None:
        child_name, child_opts = described(child)
        return child_name, {"driver": node.driver, "image": child_opts}
    return "", {"driver": node.driver}


def _raw_strong(node: Node) -> dict[str, Any]:
    strong: dict[str, Any] = {}
    offset = getattr(node, "offset", 0)
    if offset:
        strong["offset"] = offset
    fixed = getattr(node, "_fixed_size", None)
    if fixed is not None:
        strong["size"] = fixed
    return strong


def _format(
    node: Node, strong: dict[str, Any], *, backing_overridden: bool
) -> tuple[str | None, dict[str, Any]]:
    opts: dict[str, Any] = {"driver": node.driver, **strong}
    file = node.child("file")
    exact: str | None = None
    if file is not None:
        exact, opts["file"] = described(file)
    if backing_overridden:
        below = backing(node)
        opts["backing"] = described(below)[1] if below is not None else None
    if strong or backing_overridden:
        exact = None
    return exact, opts


def _backing_overridden(node: Node) -> bool:
    """Whether the node's backing is not the one its image header names (QEMU's
    bdrv_backing_overridden)."""
    below = backing(node)
    header = getattr(node, "backing_filename", None)
    if below is None:
        return bool(header)
    if not header:
        return True
    names = {header, getattr(node, "full_backing_filename", None)}
    return filename(below) not in names


def filename(node: Node) -> str:
    """The name QEMU shows for a node: its exact file name, or ``json:{options}``."""
    exact, opts = described(node)
    if exact is not None:
        return exact
    return "json:" + json.dumps(qdict_order(opts))


def host_filename(node: Node) -> str:
    """The host file a node's data lives in (its own, or its file child's), or ""."""
    node = visible(node) or node
    own = getattr(node, "filename", None)
    if isinstance(own, str):
        return own
    child = node.child("file") or node.child("image")
    return host_filename(child) if child is not None else ""


def sectors(size: int) -> int:
    """A size in bytes rounded up to whole sectors, as QEMU reports node lengths."""
    return -(-size // SECTOR) * SECTOR


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
    name = host_filename(node)
    try:
        return os.stat(name).st_blocks * 512 if name else None
    except OSError:
        return None


def image_info(node: Node, *, with_chain: bool = False) -> dict[str, Any]:
    """ImageInfo: what ``qemu-img info --output=json`` shows for the node. The backing
    file members come from the image header; ``backing-image`` follows the node's real
    backing (which blockdev-add may have overridden)."""
    info: dict[str, Any] = {}
    own = getattr(node, "info", None)
    extra: dict[str, Any] = own() if callable(own) else {}
    if "backing-filename-format" in extra:
        info["backing-filename-format"] = extra["backing-filename-format"]
    info["virtual-size"] = sectors(node.size)
    info["filename"] = filename(node)
    if "cluster-size" in extra:
        info["cluster-size"] = extra["cluster-size"]
    info["format"] = node.driver
    size = 0 if node.driver == "null-co" else actual_size(node)
    if size is not None:
        info["actual-size"] = size
    if "format-specific" in extra:
        info["format-specific"] = extra["format-specific"]
    for key in ("full-backing-filename", "backing-filename"):
        if key in extra:
            info[key] = extra[key]
    below = backing(node)
    if below is not None and with_chain:
        info["backing-image"] = image_info(below, with_chain=True)
    if node.driver != "null-co":  # QEMU has no dirty flag to report for null-co
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
        "backing_file_depth": chain_depth(node) if with_chain else 0,
        "drv": node.driver,
        "write_threshold": 0,
        "encrypted": False,
        "cache": {"no-flush": False, "direct": False, "writeback": True},
        "file": filename(node),
        **zero_throttle,
    }
    below = backing(node)
    if below is not None:
        info["backing_file"] = filename(below)
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


def hmp_block_summary(device: str | None, info: dict[str, Any]) -> str:
    """One drive (or, without a device name, one node), as HMP ``info block`` prints it
    from its BlockDeviceInfo."""
    ro = ", read-only" if info["ro"] else ""
    head = f"{device} ({info['node-name']})" if device else info["node-name"]
    lines = [f"{head}: {info['file']} ({info['drv']}{ro})"]
    lines.append("    Cache mode:       writeback")
    if "backing_file" in info:
        depth = info["backing_file_depth"]
        lines.append(f"    Backing file:     {info['backing_file']} (chain depth: {depth})")
    return "\n".join(lines) + "\n"
