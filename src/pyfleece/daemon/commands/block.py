"""Block graph commands: blockdev-add/del, the block queries, and HMP's drive commands.

QMP: ``blockdev-add``, ``blockdev-del``, ``query-named-block-nodes``, ``query-block``.
HMP: ``drive_add [addr] opts``, ``drive_del id``, ``info block``, ``qemu-io dev "cmd"``.
Deletion follows the references (docs/block.md): ``blockdev-del`` refuses while anything
refers to the node, with QEMU 7.2's messages; ``drive_del`` releases exports first.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from pyfleece.daemon.nodeinfo import all_nodes, device_info, hmp_block_summary
from pyfleece.errors import CommandError, PyfleeceError
from pyfleece.img.info import human as human_image_info
from pyfleece.keyval import parse_keyval
from pyfleece.monitor.dispatch import Dispatcher
from pyfleece.monitor.qemuio import QemuIo

#: QEMU's id_wellformed(): a letter, then letters, digits, '-', '.' or '_'.
_WELL_FORMED = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*")
#: References that QEMU implements as op blockers (a backing edge, a job): blockdev-del
#: reports them as "Node 'x' is busy: <reason>"; other edges as "Block device x is in use".
_BLOCKERS = ("node is used as backing hd of", "block device is in use by block job")

if TYPE_CHECKING:
    from pyfleece.block.node import Node, Ref
    from pyfleece.daemon.core import Daemon


def register(dispatcher: Dispatcher) -> None:
    qmp, hmp = dispatcher.qmp, dispatcher.hmp
    qmp.register("blockdev-add", blockdev_add)
    qmp.register("blockdev-del", blockdev_del)
    qmp.register("query-named-block-nodes", query_named_block_nodes)
    qmp.register("query-block", query_block)
    hmp.register(
        "drive_add", "node:-n,pci_addr:s?,opts:s", "[-n] [[<domain>:]<bus>:]<slot> opts",
        "add drive (if=none only; backing= names the node to use as backing)", hmp_drive_add,
    )  # fmt: skip
    hmp.register("drive_del", "id:B", "device", "remove host block device", hmp_drive_del)
    hmp.register(
        "qemu-io", "qdev:-d,device:B,command:s", "[-d] [device] \"[command]\"",
        "run a qemu-io command on a block device", hmp_qemu_io,
    )  # fmt: skip
    hmp.info.register(
        "block", "nodes:-n,verbose:-v,device:B?", "[-n] [-v] [device]",
        "show info of one block device or all block devices (-n: show named nodes; "
        "-v: show details)", hmp_info_block,
    )  # fmt: skip


# -- QMP --------------------------------------------------------------------------------------


def blockdev_add(ctx: Daemon, args: dict[str, Any]) -> None:
    if "node-name" not in args:
        raise CommandError("'node-name' must be specified for the root node")
    check_node_names(args)
    node = ctx.graph.open(args)
    ctx.monitor_owned.add(node.node_name)


def check_node_names(options: Any) -> None:
    """Every node name in blockdev options must be well formed, as QEMU's id_wellformed.

    Raises:
        CommandError: "Invalid node-name: 'x'" for the first one that is not.
    """
    if isinstance(options, dict):
        name = options.get("node-name")
        if isinstance(name, str) and not _WELL_FORMED.fullmatch(name):
            raise CommandError(f"Invalid node-name: '{name}'")
        for value in options.values():
            check_node_names(value)
    elif isinstance(options, list):
        for value in options:
            check_node_names(value)


def blockdev_del(ctx: Daemon, args: dict[str, Any]) -> None:
    """Deletes a node the monitor added, with QEMU 7.2's checks in QEMU's order: exported,
    blocked (a backing edge or a job: "is busy" with the reason), not added by the monitor
    (drives, nested nodes), then any other reference (a file edge)."""
    name = args["node-name"]
    node = ctx.graph.find(name)
    if node is None:
        raise CommandError(f"Failed to find node with node-name='{name}'")
    refs = node.refs()
    if any(not ref.hard for ref in refs):
        raise CommandError(f"Node {name} is in use")
    blocker = _blocker(refs)
    if blocker is not None:
        raise CommandError(f"Node '{name}' is busy: {blocker.reason}")
    if name not in ctx.monitor_owned or ctx.drives.find(name) is not None:
        raise CommandError(f"Node {name} is not owned by the monitor")
    if refs:
        raise CommandError(f"Block device {name} is in use")
    ctx.graph.remove(name)
    ctx.monitor_owned.discard(name)
    ctx.drives.forget_node(node)


def _blocker(refs: list[Ref]) -> Ref | None:
    """The reference QEMU would name: the newest backing edge (QEMU puts new blockers
    first; a fleecing target's edge counts as one), else a job's."""
    edges = [r for r in refs if r.reason.startswith(_BLOCKERS[0])]
    jobs = [r for r in refs if r.reason.startswith(_BLOCKERS[1])]
    return edges[-1] if edges else jobs[0] if jobs else None


def query_named_block_nodes(ctx: Daemon, args: dict[str, Any]) -> list[dict[str, Any]]:
    flat = args.get("flat", False)
    return [device_info(node, with_chain=not flat) for node in all_nodes(list(ctx.graph))]


def query_block(ctx: Daemon, args: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {
            "io-status": "ok",
            "device": drive.id,
            "locked": False,
            "removable": False,
            "inserted": device_info(drive.node, with_chain=True),
            "type": "unknown",
        }
        for drive in ctx.drives
    ]


# -- HMP --------------------------------------------------------------------------------------


def hmp_drive_add(ctx: Daemon, args: dict[str, Any]) -> str:
    """``drive_add [addr] opts`` adds a drive; ``drive_add -n opts`` adds a node the
    monitor owns (``node-name`` required), as QEMU's HMP does."""
    try:
        options = parse_keyval(args["opts"])
        if args.get("node"):
            if not options.get("node-name"):
                raise CommandError("'node-name' needs to be specified")
            check_node_names(options)
            node = ctx.graph.open(ctx.drives.blockdev_options(options))
            ctx.monitor_owned.add(node.node_name)
            return ""
        ctx.drives.add(options)
    except PyfleeceError as err:
        return f"{err}\n"
    return "OK\n"


def hmp_drive_del(ctx: Daemon, args: dict[str, Any]) -> str:
    """``drive_del id``: a drive (its exports go first), or else a node, as blockdev-del."""
    name = args["id"]
    try:
        if ctx.drives.find(name) is None and ctx.graph.find(name) is not None:
            blockdev_del(ctx, {"node-name": name})
        else:
            ctx.drives.delete(name)
    except PyfleeceError as err:
        return f"{err}\n"
    return ""


def hmp_info_block(ctx: Daemon, args: dict[str, Any]) -> str:
    """``info block [-n] [-v] [device]``: the drives (or, with -n or a name that is no
    drive, the named nodes), as QEMU prints them."""
    device = args.get("device")
    verbose = bool(args.get("verbose"))
    blocks: list[str] = []
    if not args.get("nodes"):
        for drive in ctx.drives:
            if device is None or device == drive.id:
                info = device_info(drive.node, with_chain=True)
                blocks.append(hmp_block_summary(drive.id, info) + _images(info, verbose))
    if blocks or (device is None and not args.get("nodes")):
        return "\n".join(blocks)
    for node in ctx.graph:
        if not node.node_name.startswith("#") and device in (None, node.node_name):
            info = device_info(node, with_chain=True)
            blocks.append(hmp_block_summary(None, info) + _images(info, verbose))
    return "\n".join(blocks)


def _images(info: dict[str, Any], verbose: bool) -> str:
    """``info block -v``: each image of the chain, as qemu-img info prints it."""
    if not verbose:
        return ""
    out = ["\nImages:\n"]
    image: dict[str, Any] | None = info["image"]
    while image is not None:
        out.append(human_image_info(image))
        image = image.get("backing-image")
    return "".join(out)


def _device_node(ctx: Daemon, name: str) -> Node:
    node = ctx.drives.node_of(name)
    if node is None:
        raise CommandError(f"Device '{name}' not found")
    return node


def hmp_qemu_io(ctx: Daemon, args: dict[str, Any]) -> str:
    node = _device_node(ctx, args["device"])
    return QemuIo(node).run(args["command"]).output
