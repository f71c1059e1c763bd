"""The ``nbd`` protocol driver: a node whose contents are an export on an NBD server.

Options are QEMU's ``BlockdevOptionsNbd`` where they apply: ``server`` (``{"type": "unix",
"path": ...}`` or ``{"type": "inet", "host": ..., "port": ...}``), ``export``, ``tls-creds``
(the id of TLS credentials registered with ``register_tls_creds``), ``tls-hostname`` and
``open-timeout``; or our own ``uri`` (an NBD URI, which ``open_image`` passes for
``nbd://...`` names). The node is read-only when the export is.

Block status comes from ``base:allocation`` (data/zero) and, when the server offers it,
``qemu:allocation-depth`` (allocated or not). As for any protocol node, a range is
``allocated`` at depth 0 unless the server's allocation depth says no layer of its chain holds
it (then depth 1: nothing in this one-node chain allocates it). ``host_offset`` is the offset
itself, as ``qemu-img map`` shows for NBD (the export stores the range plainly).

One server reply usually describes many extents; they are kept until the next write, zero or
discard through this node, so that walking an image costs one request per reply rather than
one per extent. Writes by other clients of the same export are not seen by that cache.

Errors: the server's error replies arrive as ``BlockError`` with their errno; a broken
connection (``ProtocolError``) becomes ``BlockError(EIO)`` here, because to this node's users
it is an I/O failure, not their peer misbehaving.
"""

from __future__ import annotations

import bisect
import errno
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from pyfleece.block.node import Extent, Node
from pyfleece.block.options import Options
from pyfleece.block.registry import OpenContext, register
from pyfleece.errors import BlockError, ConfigError, ProtocolError
from pyfleece.nbd.client import NbdClient, StatusExtent
from pyfleece.nbd.client_session import CONNECT_TIMEOUT
from pyfleece.nbd.proto import ALLOCATION_DEPTH, BASE_ALLOCATION, StateFlag, TransmitFlag
from pyfleece.nbd.uri import DEFAULT_PORT, NbdUri, parse_uri

#: Block status asks the server about at least this much at a time (it may answer less).
STATUS_WINDOW = 1 << 30

_tls_creds: dict[str, str] = {}
_tls_lock = threading.Lock()


def register_tls_creds(creds_id: str, directory: str | None) -> None:
    """Makes ``tls-creds=<creds_id>`` name a certificate directory (QEMU's layout, client
    side: ``ca-cert.pem``, ``client-cert.pem``, ``client-key.pem``); None forgets it. The
    daemon calls this for ``--object tls-creds-x509,id=...,endpoint=client,dir=...``."""
    with _tls_lock:
        if directory is None:
            _tls_creds.pop(creds_id, None)
        else:
            _tls_creds[creds_id] = directory


class NbdNode(Node):
    driver = "nbd"

    def __init__(self, node_name: str, client: NbdClient, *, read_only: bool) -> None:
        super().__init__(node_name, read_only=read_only or client.read_only)
        self.client = client
        self._status_lock = threading.Lock()
        self._status: list[Extent] = []  # consecutive extents of the last reply
        self._generation = 0  # bumped around every change, so stale answers are not kept

    @property
    def size(self) -> int:
        return self.client.size

    def _readinto(self, offset: int, buf: memoryview) -> None:
        with self._remote("read"):
            self.client.readinto(offset, buf)

    def _write(self, offset: int, data: memoryview, fua: bool) -> None:
        with self._changing("write"):
            self.client.write(offset, data, fua=fua)

    def _write_zeroes(self, offset: int, length: int, may_unmap: bool, fua: bool) -> None:
        with self._changing("write zeroes"):
            self.client.zero(offset, length, may_trim=may_unmap, fua=fua)

    def can_fast_zero(self) -> bool:
        return self.client.can(TransmitFlag.SEND_WRITE_ZEROES | TransmitFlag.SEND_FAST_ZERO)

    def _discard(self, offset: int, length: int) -> None:
        with self._changing("discard"):
            self.client.trim(offset, length)

    def _flush(self) -> None:
        with self._remote("flush"):
            self.client.flush()

    def _close(self) -> None:
        self.client.close()

    def _block_status(self, offset: int, length: int) -> Extent:
        if BASE_ALLOCATION not in self.client.contexts:
            return Extent(offset, length, True, False, True, 0, offset)
        with self._status_lock:
            cached = _lookup(self._status, offset, length)
            generation = self._generation
        if cached is not None:
            return cached
        window = min(self.size - offset, max(length, STATUS_WINDOW))
        with self._remote("block status"):
            reply = self.client.block_status_once(offset, window)
        extents = list(_combine(reply[BASE_ALLOCATION], reply.get(ALLOCATION_DEPTH)))
        with self._status_lock:
            if generation == self._generation:
                self._status = extents
        found = _lookup(extents, offset, length)
        if found is None:
            raise BlockError(errno.EIO, f"{self.node_name}: no block status at {offset}")
        return found

    @contextmanager
    def _remote(self, what: str) -> Iterator[None]:
        try:
            yield
        except ProtocolError as err:
            raise BlockError(errno.EIO, f"{what} on {self.node_name}: {err}") from err

    @contextmanager
    def _changing(self, what: str) -> Iterator[None]:
        with self._status_lock:
            self._generation += 1
            self._status = []
        try:
            with self._remote(what):
                yield
        finally:
            with self._status_lock:
                self._generation += 1
                self._status = []


def _lookup(extents: list[Extent], offset: int, length: int) -> Extent | None:
    """The extent holding ``offset`` (the list is consecutive), clipped to the range."""
    i = bisect.bisect_right(extents, offset, key=lambda e: e.offset) - 1
    if i < 0 or offset >= extents[i].offset + extents[i].length:
        return None
    ext = extents[i]
    end = min(ext.offset + ext.length, offset + length)
    return ext._replace(offset=offset, length=end - offset, host_offset=offset)


def _combine(base: list[StatusExtent], depth: list[StatusExtent] | None) -> Iterator[Extent]:
    """Extents from the two contexts' answers, over the range both describe."""
    if depth is None:
        for ext in base:
            data, zero = not ext.flags & StateFlag.HOLE, bool(ext.flags & StateFlag.ZERO)
            yield Extent(ext.offset, ext.length, data, zero, True, 0, ext.offset)
        return
    i = j = 0
    pos = base[0].offset
    while i < len(base) and j < len(depth):
        b, d = base[i], depth[j]
        end = min(b.offset + b.length, d.offset + d.length)
        allocated = d.flags > 0
        data, zero = not b.flags & StateFlag.HOLE, bool(b.flags & StateFlag.ZERO)
        yield Extent(pos, end - pos, data, zero, allocated, 0 if allocated else 1, pos)
        pos = end
        if end == b.offset + b.length:
            i += 1
        if end == d.offset + d.length:
            j += 1


@register("nbd")
def _open_nbd(opts: Options, name: str, ctx: OpenContext) -> Node:
    uri = _uri_from_options(opts)
    timeout = opts.get_int("open-timeout", 0) or CONNECT_TIMEOUT
    if opts.get_int("reconnect-delay", 0):
        raise ConfigError("Parameter 'reconnect-delay' is not supported (reconnecting)")
    if opts.raw("x-dirty-bitmap", None) is not None:
        raise ConfigError("Parameter 'x-dirty-bitmap' is not supported")
    opts.finish()
    client = NbdClient.connect(uri, contexts=(BASE_ALLOCATION, ALLOCATION_DEPTH), timeout=timeout)
    return NbdNode(name, client, read_only=ctx.read_only)


def _uri_from_options(opts: Options) -> NbdUri:
    if opts.has("uri"):
        for key in ("server", "export", "tls-creds", "tls-hostname"):
            if opts.has(key):
                raise ConfigError(f"Parameter '{key}' cannot be used together with 'uri'")
        return parse_uri(opts.get_str("uri"))
    server = opts.raw("server")
    if not isinstance(server, dict):
        raise ConfigError("Invalid parameter type for 'server', expected: SocketAddress")
    export = opts.get_str("export", "")
    certs = _tls_directory(opts.get_str("tls-creds", None))
    hostname = opts.get_str("tls-hostname", None)
    tls = certs is not None
    addr = Options(server, "NBD server address")
    kind = addr.get_choice("type", ("unix", "inet"))
    if kind == "unix":
        path = addr.get_str("path")
        addr.raw("abstract", None)
        addr.finish()
        return NbdUri(
            "unix", export, socket=path, tls=tls, tls_certificates=certs, tls_hostname=hostname
        )
    host = addr.get_str("host")
    port = addr.raw("port", str(DEFAULT_PORT))
    for ignored in ("numeric", "to", "ipv4", "ipv6", "keep-alive"):
        addr.raw(ignored, None)
    addr.finish()
    try:
        port_number = int(port)
    except (TypeError, ValueError):
        raise ConfigError(f"Parameter 'port' expects a port number, not {port!r}") from None
    if not 0 < port_number < 65536:
        raise ConfigError(f"Parameter 'port' expects a port number, not {port!r}")
    return NbdUri(
        "tcp", export, host, port_number, tls=tls, tls_certificates=certs, tls_hostname=hostname
    )


def _tls_directory(creds_id: str | None) -> str | None:
    if creds_id is None:
        return None
    with _tls_lock:
        directory = _tls_creds.get(creds_id)
    if directory is None:
        raise ConfigError(f"No TLS credentials with id '{creds_id}'")
    return directory
