"""Block graph commands: blockdev-add/del, the block queries, and HMP's drive commands.

QMP: ``blockdev-add``, ``blockdev-del``, ``query-named-block-nodes``, ``query-block``.
HMP: ``drive_add [addr] opts``, ``drive_del id``, ``info block``, ``qemu-io dev "cmd"``.
Deletion follows the references (docs/block.md): ``blockdev-del`` refuses while anything
refers to the node, with QEMU 7.2's messages; ``drive_del`` releases exports first.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pyfleece.daemon.nodeinfo import all_nodes, device_info, hmp_block_summary
from pyfleece.errors import CommandError, PyfleeceError
from pyfleece.keyval import parse_keyval
from pyfleece.monitor.dispatch import Dispatcher
from pyfleece.monitor.qemuio import QemuIo

if TYPE_CHECKING:
    from pyfleece.block.node import Node
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
    hmp.info.register("block", "", "", "show the block devices", hmp_info_block)


# -- QMP --------------------------------------------------------------------------------------


def blockdev_add(ctx: Daemon, args: dict[str, Any]) -> None:
    if "node-name" not in args:
        raise CommandError("'node-name' must be specified for the root node")
    ctx.graph.open(args)


def blockdev_del(ctx: Daemon, args: dict[str, Any]) -> None:
    name = args["node-name"]
    node = ctx.graph.find(name)
    if node is None:
        raise CommandError(f"Failed to find node with node-name='{name}'")
    if ctx.drives.find(name) is not None:
        raise CommandError(f"Node {name} is not owned by the monitor")
    refs = node.refs()
    if any(not ref.hard for ref in refs):
        raise CommandError(f"Node {name} is in use")
    if refs:
        raise CommandError(f"Block device {name} is in use")
    ctx.graph.remove(name)
    ctx.drives.forget_node(node)


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
    try:
        ctx.drives.add(parse_keyval(args["opts"]))
    except PyfleeceError as err:
        return f"{err}\n"
    return "OK\n"


def hmp_drive_del(ctx: Daemon, args: dict[str, Any]) -> str:
    try:
        ctx.drives.delete(args["id"])
    except PyfleeceError as err:
        return f"{err}\n"
    return ""


def hmp_info_block(ctx: Daemon, args: dict[str, Any]) -> str:
    return "\n".join(hmp_block_summary(drive.id, drive.node) for drive in ctx.drives)


def _device_node(ctx: Daemon, name: str) -> Node:
    node = ctx.drives.node_of(name)
    if node is None:
        raise CommandError(f"Device '{name}' not found")
    return node


def hmp_qemu_io(ctx: Daemon, args: dict[str, Any]) -> str:
    node = _device_node(ctx, args["device"])
    return QemuIo(node).run(args["command"]).output
