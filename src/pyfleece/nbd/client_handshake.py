"""The client side of the NBD handshake (nbd-proto.md, "Handshake", "Option types").

Fixed newstyle only (an oldstyle server is refused with a clear error). The order is the one
the spec recommends: STARTTLS first when TLS is wanted (nothing stateful is negotiated before
it), then STRUCTURED_REPLY, SET_META_CONTEXT, and GO with INFO requests for the name,
description and block sizes. A server that answers GO with ERR_UNSUP gets EXPORT_NAME instead.

Errors: a server that breaks the protocol (bad magic, a reply to another option, a reply too
long or malformed) raises ``ProtocolError``; a server that refuses (unknown export, TLS
required, TLS refused) raises ``ImageError`` with the server's own message when it sent one.

Invariants: option replies are read to their announced length before the next option is
sent; no reply payload larger than ``MAX_OPTION_REPLY`` is read into memory.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass, field

from pyfleece.errors import ImageError, ProtocolError
from pyfleece.nbd import proto
from pyfleece.nbd.client_transport import Transport
from pyfleece.nbd.proto import (
    ClientFlag,
    HandshakeFlag,
    Info,
    Opt,
    Rep,
    TransmitFlag,
)

log = logging.getLogger(__name__)

#: Largest option reply payload accepted (a name and a description of 4 KiB each fit).
MAX_OPTION_REPLY = 64 << 10
#: The oldstyle handshake's second magic ("cliserv"), recognised only to refuse it clearly.
OLDSTYLE_MAGIC = 0x00420281861253
#: NBD's default maximum payload when the server gives no block sizes.
DEFAULT_MAX_PAYLOAD = 32 << 20


@dataclass
class ExportInfo:
    """What the handshake learnt about the export.

    Attributes:
        name: the export name (the server's canonical one if it sent NBD_INFO_NAME).
        size: export size in bytes.
        flags: transmission flags (``TransmitFlag``; zero when HAS_FLAGS is not set).
        min_block, preferred_block, max_payload: the size constraints (defaults 1, 4096,
            32 MiB when the server sent none).
        description: NBD_INFO_DESCRIPTION, if sent.
        structured: structured replies were negotiated.
        contexts: selected metadata contexts, name -> id.
    """

    name: str
    size: int
    flags: TransmitFlag
    min_block: int = 1
    preferred_block: int = 4096
    max_payload: int = DEFAULT_MAX_PAYLOAD
    description: str = ""
    structured: bool = False
    contexts: dict[str, int] = field(default_factory=dict)


class Negotiator:
    """Sends options and reads their replies over a transport that may be upgraded to TLS."""

    def __init__(self, transport: Transport, where: str) -> None:
        self.transport = transport
        self.where = where  # the server, for messages
        self.fixed = False
        self.no_zeroes = False

    # -- framing ------------------------------------------------------------------------------

    def recv(self, n: int) -> bytes:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            try:
                k = self.transport.recv_into(view[got:], wait_all=True)
            except ConnectionError as err:
                raise self.dropped() from err
            if k == 0:
                raise self.dropped()
            got += k
        return bytes(buf)

    def send_option(self, opt: Opt, data: bytes = b"") -> None:
        try:
            self.transport.send([proto.OPTION_HEADER.pack(proto.IHAVEOPT, opt, len(data)), data])
        except ConnectionError as err:
            raise self.dropped() from err

    def dropped(self) -> ImageError | ProtocolError:
        """The server hung up (or reset the connection) in the middle of the handshake."""
        if self.transport.tls:
            # TLS 1.3 servers check the client certificate after the handshake has ended
            return ImageError(
                f"TLS with NBD server {self.where} failed: the server closed the connection "
                "after the TLS handshake (client certificate missing or not trusted?)"
            )
        return ProtocolError(f"NBD server {self.where} closed the connection")

    def reply(self, opt: Opt) -> tuple[int, bytes]:
        """Reads one option reply: (reply type, payload)."""
        magic, echoed, kind, length = proto.OPTION_REPLY.unpack(self.recv(proto.OPTION_REPLY.size))
        if magic != proto.OPTION_REPLY_MAGIC:
            raise ProtocolError(f"NBD server {self.where}: bad option reply magic {magic:#x}")
        if echoed != opt:
            raise ProtocolError(
                f"NBD server {self.where} replied to option {echoed} while {opt.name} was asked"
            )
        if length > MAX_OPTION_REPLY:
            raise ProtocolError(
                f"NBD server {self.where}: option reply of {length} bytes is too long"
            )
        return kind, self.recv(length) if length else b""

    def refusal(self, kind: int, data: bytes) -> str:
        """A readable description of an error reply."""
        try:
            name = Rep(kind).name
        except ValueError:
            name = f"error {kind:#x}"
        text = data.decode("utf-8", "replace").strip()
        return f"NBD_REP_{name}" + (f": {text}" if text else "")

    def unexpected(self, opt: Opt, kind: int) -> ProtocolError:
        return ProtocolError(
            f"NBD server {self.where}: unexpected reply type {kind:#x} to NBD_OPT_{opt.name}"
        )

    # -- the options --------------------------------------------------------------------------

    def greet(self) -> None:
        """Reads the server greeting and sends our client flags."""
        magic, second = struct.unpack(">QQ", self.recv(16))
        if magic != proto.NBDMAGIC:
            raise ProtocolError(f"{self.where} is not an NBD server (bad magic {magic:#x})")
        if second == OLDSTYLE_MAGIC:
            raise ImageError(
                f"NBD server {self.where} uses the oldstyle handshake, which is not supported"
            )
        if second != proto.IHAVEOPT:
            raise ProtocolError(f"NBD server {self.where}: bad handshake magic {second:#x}")
        (flags,) = struct.unpack(">H", self.recv(2))
        self.fixed = bool(flags & HandshakeFlag.FIXED_NEWSTYLE)
        self.no_zeroes = bool(flags & HandshakeFlag.NO_ZEROES)
        ours = (ClientFlag.C_FIXED_NEWSTYLE if self.fixed else 0) | (
            ClientFlag.C_NO_ZEROES if self.no_zeroes else 0
        )
        self.transport.send([proto.CLIENT_FLAGS.pack(ours)])

    def starttls(self) -> None:
        """Asks for TLS; the caller upgrades the transport on return.

        Raises:
            ImageError: the server cannot or will not do TLS.
        """
        if not self.fixed:
            raise ImageError(f"NBD server {self.where} is too old for TLS (no fixed newstyle)")
        self.send_option(Opt.STARTTLS)
        kind, data = self.reply(Opt.STARTTLS)
        if kind == Rep.ACK:
            return
        if kind & (1 << 31):
            raise ImageError(f"NBD server {self.where} refused TLS ({self.refusal(kind, data)})")
        raise self.unexpected(Opt.STARTTLS, kind)

    def structured_reply(self) -> bool:
        self.send_option(Opt.STRUCTURED_REPLY)
        kind, data = self.reply(Opt.STRUCTURED_REPLY)
        if kind == Rep.ACK:
            return True
        if kind == Rep.ERR_TLS_REQD:
            raise self.tls_required(data)
        if kind & (1 << 31):
            log.debug("%s: no structured replies (%s)", self.where, self.refusal(kind, data))
            return False
        raise self.unexpected(Opt.STRUCTURED_REPLY, kind)

    def meta_contexts(self, opt: Opt, export: str, queries: list[str]) -> dict[str, int]:
        """SET_META_CONTEXT (or LIST_META_CONTEXT): the contexts the server names, -> id.

        A server without metadata support (an error reply) gives no contexts.
        """
        self.send_option(opt, proto.encode_meta(export, queries))
        found: dict[str, int] = {}
        while True:
            kind, data = self.reply(opt)
            if kind == Rep.ACK:
                return found
            if kind == Rep.META_CONTEXT:
                if len(data) < 5:
                    raise ProtocolError(f"NBD server {self.where}: short META_CONTEXT reply")
                (ident,) = proto.META_CONTEXT_ID.unpack_from(data)
                if opt == Opt.SET_META_CONTEXT and ident in found.values():
                    raise ProtocolError(f"NBD server {self.where}: context id {ident} given twice")
                found[self.text(data[4:], "metadata context name")] = ident
                continue
            if kind == Rep.ERR_TLS_REQD:
                raise self.tls_required(data)
            if kind & (1 << 31):
                log.debug("%s: %s refused (%s)", self.where, opt.name, self.refusal(kind, data))
                return {}
            raise self.unexpected(opt, kind)

    def go(self, export: str) -> ExportInfo | None:
        """NBD_OPT_GO; None when the server does not know the option (use EXPORT_NAME).

        Raises:
            ImageError: the server refused the export.
        """
        wanted: list[int] = [Info.NAME, Info.DESCRIPTION, Info.BLOCK_SIZE]
        self.send_option(Opt.GO, proto.encode_go(export, wanted))
        info = ExportInfo(export, -1, TransmitFlag(0))
        while True:
            kind, data = self.reply(Opt.GO)
            if kind == Rep.INFO:
                self.parse_info(info, data)
            elif kind == Rep.ACK:
                if info.size < 0:
                    raise ProtocolError(
                        f"NBD server {self.where} accepted NBD_OPT_GO without NBD_INFO_EXPORT"
                    )
                return info
            elif kind == Rep.ERR_UNSUP:
                return None
            elif kind == Rep.ERR_TLS_REQD:
                raise self.tls_required(data)
            elif kind & (1 << 31):
                raise ImageError(
                    f"NBD server {self.where} refused export '{export}' "
                    f"({self.refusal(kind, data)})"
                )
            else:
                raise self.unexpected(Opt.GO, kind)

    def parse_info(self, info: ExportInfo, data: bytes) -> None:
        if len(data) < 2:
            raise ProtocolError(f"NBD server {self.where}: NBD_REP_INFO without a type")
        (kind,) = struct.unpack_from(">H", data)
        if kind == Info.EXPORT:
            if len(data) != proto.INFO_EXPORT.size:
                raise ProtocolError(
                    f"NBD server {self.where}: NBD_INFO_EXPORT of {len(data)} bytes"
                )
            _, info.size, flags = proto.INFO_EXPORT.unpack(data)
            info.flags = TransmitFlag(flags if flags & TransmitFlag.HAS_FLAGS else 0)
        elif kind == Info.BLOCK_SIZE:
            if len(data) != proto.INFO_BLOCK_SIZE.size:
                raise ProtocolError(f"NBD server {self.where}: NBD_INFO_BLOCK_SIZE of {len(data)}")
            _, minimum, preferred, maximum = proto.INFO_BLOCK_SIZE.unpack(data)
            self.check_block_sizes(minimum, preferred, maximum)
            info.min_block, info.preferred_block, info.max_payload = minimum, preferred, maximum
        elif kind == Info.NAME:
            info.name = self.text(data[2:], "export name")
        elif kind == Info.DESCRIPTION:
            info.description = self.text(data[2:], "export description")
        # other information types are ignored, as the spec requires

    def check_block_sizes(self, minimum: int, preferred: int, maximum: int) -> None:
        if minimum < 1 or minimum > 1 << 16 or minimum & (minimum - 1):
            raise ProtocolError(f"NBD server {self.where}: bad minimum block size {minimum}")
        if preferred < minimum or preferred & (preferred - 1):
            raise ProtocolError(f"NBD server {self.where}: bad preferred block size {preferred}")
        if maximum < minimum:
            raise ProtocolError(f"NBD server {self.where}: bad maximum payload {maximum}")

    def export_name(self, export: str) -> ExportInfo:
        """NBD_OPT_EXPORT_NAME, for servers without GO; a refusal closes the connection."""
        self.send_option(Opt.EXPORT_NAME, export.encode())
        try:
            size, flags = proto.EXPORT_NAME_REPLY.unpack(self.recv(proto.EXPORT_NAME_REPLY.size))
        except ProtocolError as err:
            raise ImageError(
                f"NBD server {self.where} refused export '{export}' (connection closed)"
            ) from err
        if not self.no_zeroes:
            self.recv(124)
        return ExportInfo(
            export, size, TransmitFlag(flags if flags & TransmitFlag.HAS_FLAGS else 0)
        )

    def list_exports(self) -> list[tuple[str, str]]:
        """NBD_OPT_LIST: (name, description) of each export the server shows."""
        self.send_option(Opt.LIST)
        exports: list[tuple[str, str]] = []
        while True:
            kind, data = self.reply(Opt.LIST)
            if kind == Rep.ACK:
                return exports
            if kind == Rep.SERVER:
                if len(data) < 4:
                    raise ProtocolError(f"NBD server {self.where}: short NBD_REP_SERVER")
                (n,) = struct.unpack_from(">I", data)
                if n > len(data) - 4:
                    raise ProtocolError(f"NBD server {self.where}: NBD_REP_SERVER name overflows")
                name = self.text(data[4 : 4 + n], "export name")
                exports.append((name, self.text(data[4 + n :], "export description")))
            elif kind == Rep.ERR_TLS_REQD:
                raise self.tls_required(data)
            elif kind & (1 << 31):
                raise ImageError(
                    f"NBD server {self.where} refused to list exports ({self.refusal(kind, data)})"
                )
            else:
                raise self.unexpected(Opt.LIST, kind)

    def abort(self) -> None:
        """NBD_OPT_ABORT: ends the session politely; a server that just closes is fine."""
        try:
            self.send_option(Opt.ABORT)
            self.reply(Opt.ABORT)
        except (OSError, ProtocolError, ImageError):
            pass

    # -- helpers ------------------------------------------------------------------------------

    def text(self, data: bytes, what: str) -> str:
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as err:
            raise ProtocolError(f"NBD server {self.where}: {what} is not valid UTF-8") from err

    def tls_required(self, data: bytes) -> ImageError:
        text = data.decode("utf-8", "replace").strip()
        return ImageError(
            f"NBD server {self.where} requires TLS; use an nbds:// or nbds+unix:// URI"
            + (f" (server said: {text})" if text else "")
        )
