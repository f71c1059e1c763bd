"""The server side of NBD option haggling (nbd-proto.md, "Fixed newstyle negotiation",
"Option types", "TLS support").

One ``Handshake`` per connection, from the greeting to the transmission phase (or to the
client's ABORT). Options are read whole (bounded), answered in order, and dispatched through
a table. Bad options get an error reply and haggling goes on; only what the spec lets us
treat as hostile closes the connection (``ProtocolError``).

Invariants:
- before STARTTLS, a TLS-requiring server answers every option but STARTTLS and ABORT with
  ERR_TLS_REQD, and EXPORT_NAME (which cannot fail politely) with a hard disconnect;
- a successful STARTTLS forgets everything negotiated before it (structured replies, the
  selected metadata contexts);
- memory is bounded: an option's data is read only up to ``max_option``; longer options up
  to ``max_drain`` are skipped and refused with ERR_TOO_BIG, longer still disconnect; at most
  ``max_options`` options per connection; the whole handshake within ``timeout`` seconds.
"""

from __future__ import annotations

import contextlib
import logging
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pyfleece.errors import ProtocolError
from pyfleece.nbd import proto
from pyfleece.nbd.exports import Export
from pyfleece.nbd.meta import MetaContext
from pyfleece.nbd.proto import Info, Opt, Rep
from pyfleece.nbd.transport import ConnectionClosed, PlainTransport, TlsTransport

#: Size constraints we advertise: any alignment, 4 KiB preferred, 32 MiB payloads.
BLOCK_SIZES = (1, 4096, proto.MAX_REQUEST)


@dataclass(frozen=True)
class HandshakeLimits:
    timeout: float = 10.0
    max_option: int = 64 << 10
    max_drain: int = 1 << 20
    max_options: int = 1024


@dataclass
class Negotiated:
    """What the transmission phase needs from the handshake."""

    export: Export
    transport: PlainTransport
    structured: bool
    contexts: list[tuple[int, MetaContext]] = field(default_factory=list)


class _Abort(Exception):
    """The client sent NBD_OPT_ABORT (a soft disconnect)."""


class Handshake:
    """Negotiates one connection. ``run`` returns the result, or None on ABORT."""

    def __init__(
        self,
        transport: PlainTransport,
        *,
        lookup: Callable[[str], Export | None],
        exports: Callable[[], list[Export]],
        attach: Callable[[Export], bool],
        tls: ssl.SSLContext | None,
        limits: HandshakeLimits,
        log: logging.LoggerAdapter[logging.Logger],
    ) -> None:
        self.transport = transport
        self._lookup = lookup
        self._exports = exports
        self._attach = attach
        self._tls = tls
        self._limits = limits
        self._log = log
        self._fixed = False
        self._no_zeroes = False
        self._reset()
        self._handlers: dict[int, Callable[[int, bytes], Negotiated | None]] = {
            Opt.EXPORT_NAME: self._export_name,
            Opt.ABORT: self._abort,
            Opt.LIST: self._list,
            Opt.STARTTLS: self._starttls,
            Opt.INFO: self._info_go,
            Opt.GO: self._info_go,
            Opt.STRUCTURED_REPLY: self._structured_reply,
            Opt.LIST_META_CONTEXT: self._meta_context,
            Opt.SET_META_CONTEXT: self._meta_context,
        }

    def _reset(self) -> None:
        """Forgets negotiated state (at the start, and after STARTTLS)."""
        self._structured = False
        self._meta_export: Export | None = None
        self._meta: list[tuple[int, MetaContext]] = []

    # -- the option loop ---------------------------------------------------------------------

    def run(self) -> Negotiated | None:
        """Raises:
        ProtocolError: the client broke the protocol or took too long; close the connection.
        ConnectionClosed: the client went away.
        """
        self.transport.set_deadline(time.monotonic() + self._limits.timeout)
        flags = proto.HandshakeFlag.FIXED_NEWSTYLE | proto.HandshakeFlag.NO_ZEROES
        self._send(proto.SERVER_GREETING.pack(proto.NBDMAGIC, proto.IHAVEOPT, flags))
        (client,) = proto.CLIENT_FLAGS.unpack(self._recv(4))
        if client & ~0x3:
            raise ProtocolError(f"unknown client flags {client:#x}")
        self._fixed = bool(client & proto.ClientFlag.C_FIXED_NEWSTYLE)
        self._no_zeroes = bool(client & proto.ClientFlag.C_NO_ZEROES)
        if self._tls is not None and not self._fixed:
            raise ProtocolError("TLS requires the fixed newstyle handshake")
        count = 0
        try:
            while True:
                count += 1
                result = self._one_option(count)
                if result is not None:
                    self.transport.set_deadline(None)
                    return result
        except _Abort:
            return None

    def _one_option(self, count: int) -> Negotiated | None:
        magic, opt, length = proto.OPTION_HEADER.unpack(self._recv(16))
        if count > self._limits.max_options:
            raise ProtocolError(f"more than {self._limits.max_options} options")
        if magic != proto.IHAVEOPT:
            raise ProtocolError(f"bad option magic {magic:#018x}")
        if length > self._limits.max_drain:
            raise ProtocolError(f"option {opt} has an absurd length ({length} bytes)")
        if length > self._limits.max_option:
            if opt == Opt.EXPORT_NAME or not self._fixed:
                raise ProtocolError(f"option {opt} is too long ({length} bytes)")
            self._drain(length)
            self._reply_error(opt, Rep.ERR_TOO_BIG, f"option is too long ({length} bytes)")
            return None
        data = self._recv(length)
        if not self._fixed and opt != Opt.EXPORT_NAME:
            raise ProtocolError(f"option {opt} from a client without fixed newstyle")
        if self._tls is not None and not isinstance(self.transport, TlsTransport):
            if opt == Opt.EXPORT_NAME:
                raise ProtocolError("NBD_OPT_EXPORT_NAME before STARTTLS on a TLS server")
            if opt not in (Opt.STARTTLS, Opt.ABORT):
                self._reply_error(opt, Rep.ERR_TLS_REQD, "TLS is required")
                return None
        handler = self._handlers.get(opt)
        if handler is None:
            self._reply_error(opt, Rep.ERR_UNSUP, f"option {opt} is not supported")
            return None
        return handler(opt, data)

    # -- options -----------------------------------------------------------------------------

    def _export_name(self, opt: int, data: bytes) -> Negotiated | None:
        try:
            name = data.decode("utf-8")
        except UnicodeDecodeError as err:
            raise ProtocolError("export name is not valid UTF-8") from err
        export = self._lookup(name)
        if export is None:
            raise ProtocolError(f"export '{name}' not present")
        if not self._attach(export):
            raise ProtocolError(f"export '{name}' is shutting down")
        reply = proto.EXPORT_NAME_REPLY.pack(export.size, export.flags(structured=self._structured))
        if not self._no_zeroes:
            reply += proto.ZERO_PAD_124
        self._send(reply)
        return self._negotiated(export)

    def _abort(self, opt: int, data: bytes) -> Negotiated | None:
        with contextlib.suppress(ConnectionClosed):
            self._reply(opt, Rep.ACK)
        raise _Abort

    def _list(self, opt: int, data: bytes) -> Negotiated | None:
        if data:
            self._reply_error(opt, Rep.ERR_INVALID, "NBD_OPT_LIST takes no data")
            return None
        for export in self._exports():
            self._reply(opt, Rep.SERVER, proto.rep_server(export.name, export.description))
        self._reply(opt, Rep.ACK)
        return None

    def _starttls(self, opt: int, data: bytes) -> Negotiated | None:
        if self._tls is None:
            self._reply_error(opt, Rep.ERR_POLICY, "TLS not configured")
            return None
        if data:
            self._reply_error(opt, Rep.ERR_INVALID, "NBD_OPT_STARTTLS takes no data")
            return None
        if isinstance(self.transport, TlsTransport):
            self._reply_error(opt, Rep.ERR_INVALID, "TLS is already active")
            return None
        self._reply(opt, Rep.ACK)
        plain = self.transport
        tls = TlsTransport(plain.sock, self._tls)
        tls.set_deadline(plain.deadline)
        tls.handshake()
        self.transport = tls
        self._reset()
        self._log.debug("TLS established")
        return None

    def _info_go(self, opt: int, data: bytes) -> Negotiated | None:
        try:
            request = proto.decode_go(data)
        except proto.OptionInvalid as err:
            self._reply_error(opt, Rep.ERR_INVALID, str(err))
            return None
        export = self._lookup(request.name)
        if export is None:
            self._reply_error(opt, Rep.ERR_UNKNOWN, f"export '{request.name}' not present")
            return None
        going = opt == Opt.GO
        if going and not self._attach(export):
            self._reply_error(opt, Rep.ERR_UNKNOWN, f"export '{request.name}' is shutting down")
            return None
        flags = export.flags(structured=self._structured)
        self._reply(opt, Rep.INFO, proto.info_export(export.size, flags))
        if Info.NAME in request.infos:
            self._reply(opt, Rep.INFO, proto.info_string(Info.NAME, export.name))
        if Info.DESCRIPTION in request.infos and export.description:
            self._reply(opt, Rep.INFO, proto.info_string(Info.DESCRIPTION, export.description))
        self._reply(opt, Rep.INFO, proto.info_block_size(*BLOCK_SIZES))
        self._reply(opt, Rep.ACK)
        return self._negotiated(export) if going else None

    def _structured_reply(self, opt: int, data: bytes) -> Negotiated | None:
        if data:
            self._reply_error(opt, Rep.ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data")
        elif self._structured:
            self._reply_error(opt, Rep.ERR_INVALID, "structured replies already negotiated")
        else:
            self._structured = True
            self._reply(opt, Rep.ACK)
        return None

    def _meta_context(self, opt: int, data: bytes) -> Negotiated | None:
        setting = opt == Opt.SET_META_CONTEXT
        if setting:
            self._meta_export, self._meta = None, []
        if not self._structured:
            self._reply_error(opt, Rep.ERR_INVALID, "structured replies not negotiated")
            return None
        try:
            request = proto.decode_meta(data)
        except proto.OptionInvalid as err:
            self._reply_error(opt, Rep.ERR_INVALID, str(err))
            return None
        export = self._lookup(request.export)
        if export is None:
            self._reply_error(opt, Rep.ERR_UNKNOWN, f"export '{request.export}' not present")
            return None
        chosen = export.match_contexts(request.queries, listing=not setting)
        selected = [(export.context_id(ctx) if setting else 0, ctx) for ctx in chosen]
        for ident, ctx in selected:
            self._reply(opt, Rep.META_CONTEXT, proto.rep_meta_context(ident, ctx.name))
        self._reply(opt, Rep.ACK)
        if setting:
            self._meta_export, self._meta = export, selected
        return None

    def _negotiated(self, export: Export) -> Negotiated:
        contexts = self._meta if self._meta_export is export else []
        return Negotiated(export, self.transport, self._structured, contexts)

    # -- wire helpers ------------------------------------------------------------------------

    def _recv(self, n: int) -> bytes:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            k = self.transport.recv_into(view[got:])
            if k == 0:
                raise ConnectionClosed("the client closed the connection during the handshake")
            got += k
        return bytes(buf)

    def _drain(self, n: int) -> None:
        scratch = memoryview(bytearray(min(n, 64 << 10)))
        while n > 0:
            k = self.transport.recv_into(scratch[: min(n, len(scratch))])
            if k == 0:
                raise ConnectionClosed("the client closed the connection during the handshake")
            n -= k

    def _send(self, data: bytes) -> None:
        with self.transport.wlock:
            self.transport.sendmsg_all([data])

    def _reply(self, opt: int, rep: Rep, data: bytes = b"") -> None:
        self._send(proto.option_reply(opt, rep, data))

    def _reply_error(self, opt: int, rep: Rep, message: str) -> None:
        self._log.debug("option %d refused: %s", opt, message)
        self._send(proto.option_error(opt, rep, message))
