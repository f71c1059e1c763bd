"""NBD server and export commands, and ``--object tls-creds-x509``.

QMP: ``nbd-server-start``, ``nbd-server-stop``, ``nbd-server-add``, ``nbd-server-remove``,
``block-export-add``, ``block-export-del``, ``query-block-exports``. HMP: ``nbd_server_start``,
``nbd_server_add``, ``nbd_server_remove``, ``nbd_server_stop``. Exports hold a soft reference
on their node, so ``drive_del`` of an exported drive removes the exports first (clients
disconnected, BLOCK_EXPORT_DELETED); ``blockdev-del`` refuses while they exist.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pyfleece.errors import CommandError, ConfigError
from pyfleece.monitor.dispatch import Dispatcher
from pyfleece.nbd.server import NbdServer
from pyfleece.nbd.tls import TlsCredsX509, creds_from_object

if TYPE_CHECKING:
    from pyfleece.block.node import Node
    from pyfleece.daemon.core import Daemon

DEFAULT_MAX_CONNECTIONS = 100


def register(dispatcher: Dispatcher) -> None:
    qmp, hmp = dispatcher.qmp, dispatcher.hmp
    qmp.register("nbd-server-start", nbd_server_start)
    qmp.register("nbd-server-stop", lambda ctx, args: stop_server(ctx))
    qmp.register("nbd-server-add", nbd_server_add)
    qmp.register("nbd-server-remove", nbd_server_remove)
    qmp.register("block-export-add", block_export_add)
    qmp.register("block-export-del", block_export_del)
    qmp.register("query-block-exports", query_block_exports)
    hmp.register(
        "nbd_server_start", "all:-a,writable:-w,uri:s", "nbd_server_start [-a] [-w] host:port",
        "serve block devices on the given host and port", hmp_nbd_server_start,
    )  # fmt: skip
    hmp.register(
        "nbd_server_add", "writable:-w,device:B,name:s?", "nbd_server_add [-w] device [name]",
        "export a block device via NBD", hmp_nbd_server_add,
    )  # fmt: skip
    hmp.register(
        "nbd_server_remove", "force:-f,name:s", "nbd_server_remove [-f] name",
        "remove an export previously exposed via NBD", hmp_nbd_server_remove,
    )  # fmt: skip
    hmp.register("nbd_server_stop", "", "nbd_server_stop", "stop serving block devices using "
                 "the NBD protocol", lambda ctx, args: _hmp(lambda: stop_server(ctx)))  # fmt: skip


# -- objects ----------------------------------------------------------------------------------


def add_object(ctx: Daemon, props: dict[str, Any]) -> None:
    """``--object``: only TLS credentials exist in pyfleece.

    Raises:
        ConfigError: unknown type, missing id, a duplicate id, or bad properties.
    """
    kind = props.get("qom-type")
    if kind != "tls-creds-x509":
        raise ConfigError(f"invalid object type: {kind}")
    object_id = props.get("id")
    if not isinstance(object_id, str) or not object_id:
        raise ConfigError("Parameter 'id' is missing")
    if object_id in ctx.objects:
        raise ConfigError(f"attempt to add duplicate property '{object_id}' to object")
    ctx.objects[object_id] = creds_from_object(props)


def tls_creds(ctx: Daemon, creds_id: str) -> TlsCredsX509:
    creds = ctx.objects.get(creds_id)
    if not isinstance(creds, TlsCredsX509):
        raise CommandError(f"No TLS credentials with id '{creds_id}'")
    if creds.endpoint != "server":
        raise CommandError("Expecting TLS credentials with a server endpoint")
    return creds


# -- the server -------------------------------------------------------------------------------


def server(ctx: Daemon) -> NbdServer:
    if ctx.nbd is None:
        raise CommandError("NBD server not running")
    nbd: NbdServer = ctx.nbd
    return nbd


def nbd_server_start(ctx: Daemon, args: dict[str, Any]) -> None:
    if ctx.nbd is not None:
        raise CommandError("NBD server already running")
    if "tls-authz" in args:
        raise CommandError("TLS authorization (tls-authz) is not supported")
    tls = tls_creds(ctx, args["tls-creds"]).server_context() if "tls-creds" in args else None
    nbd = NbdServer(
        tls=tls,
        max_connections=args.get("max-connections", DEFAULT_MAX_CONNECTIONS),
        events=ctx.events,
    )
    addr = args["addr"]
    data = addr.get("data", addr)
    try:
        if addr["type"] == "unix":
            nbd.listen_unix(data["path"])
        elif addr["type"] == "inet":
            nbd.listen_tcp(data["host"], int(data["port"]))
        else:
            raise CommandError(f"NBD server address type '{addr['type']}' is not supported")
    except BaseException:
        nbd.stop()
        raise
    ctx.nbd = nbd


def stop_server(ctx: Daemon) -> None:
    server(ctx).stop()
    ctx.nbd = None


def nbd_server_args(options: dict[str, Any]) -> dict[str, Any]:
    """``--nbd-server addr.type=unix,addr.path=...`` (a flat SocketAddress) in
    nbd-server-start's shape (SocketAddressLegacy: ``{"type", "data": {...}}``)."""
    args = dict(options)
    addr = args.get("addr")
    if isinstance(addr, dict) and "data" not in addr:
        flat = dict(addr)
        args["addr"] = {"type": flat.pop("type", None), "data": flat}
    return args


# -- exports ----------------------------------------------------------------------------------


def _node(ctx: Daemon, name: str) -> Node:
    node = ctx.drives.node_of(name)
    if node is None:
        raise CommandError(f"Cannot find device='{name}' nor node-name='{name}'")
    return node


def _no_bitmaps(args: dict[str, Any]) -> None:
    if args.get("bitmap") or args.get("bitmaps"):
        raise CommandError("Exporting dirty bitmaps is not supported yet")


def nbd_server_add(ctx: Daemon, args: dict[str, Any]) -> None:
    _no_bitmaps(args)
    nbd = server(ctx)
    node = _node(ctx, args["device"])
    name = args.get("name", args["device"])
    nbd.add_export(
        node, name, export_id=name, writable=args.get("writable", False),
        description=args.get("description", ""),
    )  # fmt: skip


def nbd_server_remove(ctx: Daemon, args: dict[str, Any]) -> None:
    server(ctx).remove_export(args["name"], args.get("mode", "safe"))


def block_export_add(ctx: Daemon, args: dict[str, Any]) -> None:
    _no_bitmaps(args)
    if "iothread" in args:
        raise CommandError("iothreads are not supported: pyfleece serves every export itself")
    nbd = server(ctx)
    node = _node(ctx, args["node-name"])
    nbd.add_export(
        node,
        args.get("name", args["node-name"]),
        export_id=args["id"],
        writable=args.get("writable", False),
        description=args.get("description", ""),
        allocation_depth=args.get("allocation-depth", False),
    )


def block_export_del(ctx: Daemon, args: dict[str, Any]) -> None:
    if ctx.nbd is None:
        raise CommandError(f"Export '{args['id']}' is not found")
    ctx.nbd.remove_export(args["id"], args.get("mode", "safe"))


def query_block_exports(ctx: Daemon, args: dict[str, Any]) -> list[dict[str, Any]]:
    if ctx.nbd is None:
        return []
    return [export.info() for export in ctx.nbd.exports()]


# -- HMP --------------------------------------------------------------------------------------


def _hmp(action: Any) -> str:
    action()
    return ""


def hmp_nbd_server_start(ctx: Daemon, args: dict[str, Any]) -> str:
    uri: str = args["uri"]
    if uri.startswith("unix:"):
        addr = {"type": "unix", "data": {"path": uri[len("unix:") :]}}
    else:
        host, sep, port = uri.rpartition(":")
        if not sep or not port:
            raise CommandError(f"address resolution failed for {uri}: Servname not supported")
        addr = {"type": "inet", "data": {"host": host.strip("[]"), "port": port}}
    nbd_server_start(ctx, {"addr": addr})
    if args.get("all"):
        for drive in ctx.drives:
            nbd_server_add(ctx, {"device": drive.id, "writable": bool(args.get("writable"))})
    return ""


def hmp_nbd_server_add(ctx: Daemon, args: dict[str, Any]) -> str:
    qmp_args: dict[str, Any] = {"device": args["device"], "writable": bool(args.get("writable"))}
    if args.get("name"):
        qmp_args["name"] = args["name"]
    nbd_server_add(ctx, qmp_args)
    return ""


def hmp_nbd_server_remove(ctx: Daemon, args: dict[str, Any]) -> str:
    mode = "hard" if args.get("force") else "safe"
    nbd_server_remove(ctx, {"name": args["name"], "mode": mode})
    return ""
