"""A scripted NBD server for client tests: it speaks just enough of the protocol (built from
``pyfleece.nbd.proto``'s encoders) to reach transmission, then lets each test decide what
every request gets back, including replies no honest server would send."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from collections.abc import Callable
from pathlib import Path

from pyfleece.nbd import proto
from pyfleece.nbd.proto import Cmd, Info, Opt, Rep, TransmitFlag

DEFAULT_FLAGS = (
    TransmitFlag.HAS_FLAGS
    | TransmitFlag.SEND_FLUSH
    | TransmitFlag.SEND_FUA
    | TransmitFlag.SEND_TRIM
    | TransmitFlag.SEND_WRITE_ZEROES
    | TransmitFlag.SEND_CACHE
)

#: handler(server, conn, request, payload) -> False to close the connection.
Handler = Callable[["FakeServer", socket.socket, proto.Request, bytes], bool | None]
#: The tests' fixture: makes a server from FakeServer's keyword arguments.
Make = Callable[..., "FakeServer"]


def recv_exact(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data


class FakeServer:
    """Serves connections on a Unix socket until ``close``; records every request."""

    def __init__(
        self,
        tmp_path: Path,
        *,
        size: int = 1 << 20,
        flags: int = DEFAULT_FLAGS,
        structured: bool = True,
        go: bool = True,
        contexts: dict[str, int] | None = None,
        block_size: tuple[int, int, int] | None = None,
        greeting: bytes | None = None,
        go_error: tuple[Rep, str] | None = None,
        handler: Handler | None = None,
    ) -> None:
        self.path = str(tmp_path / "fake.sock")
        self.size = size
        self.flags = flags
        self.structured = structured
        self.go = go
        self.contexts = {"base:allocation": 7} if contexts is None else contexts
        self.block_size = block_size
        self.greeting = greeting
        self.go_error = go_error
        self.handler = handler or serve_disk
        self.disk = bytearray(size)
        self.requests: list[proto.Request] = []
        self.options: list[int] = []
        self.errors: list[BaseException] = []
        self.disconnected = threading.Event()
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.path)
        self.listener.listen(8)
        self.thread = threading.Thread(target=self._accept_loop, daemon=True)
        self.thread.start()

    def uri(self, export: str = "disk") -> str:
        return f"nbd+unix:///{export}?socket={self.path}"

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        self.thread.join(10)

    def __enter__(self) -> FakeServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- serving ------------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                if self._handshake(conn):
                    self._transmit(conn)
            except (EOFError, ConnectionError):
                pass  # the client hung up, as it may
            except BaseException as err:
                self.errors.append(err)
            finally:
                self.disconnected.set()

    def _handshake(self, conn: socket.socket) -> bool:
        if self.greeting is not None:
            conn.sendall(self.greeting)
            return False
        flags = proto.HandshakeFlag.FIXED_NEWSTYLE | proto.HandshakeFlag.NO_ZEROES
        conn.sendall(proto.SERVER_GREETING.pack(proto.NBDMAGIC, proto.IHAVEOPT, flags))
        recv_exact(conn, 4)
        while True:
            _, opt, length = proto.OPTION_HEADER.unpack(recv_exact(conn, 16))
            data = recv_exact(conn, length)
            self.options.append(opt)
            result = self._option(conn, opt, data)
            if result is not None:
                return result

    def _option(self, conn: socket.socket, opt: int, data: bytes) -> bool | None:
        reply = proto.option_reply
        if opt == Opt.STRUCTURED_REPLY and self.structured:
            conn.sendall(reply(opt, Rep.ACK))
        elif opt == Opt.SET_META_CONTEXT and self.structured:
            for query in proto.decode_meta(data).queries:
                if query in self.contexts:
                    ident = self.contexts[query]
                    conn.sendall(reply(opt, Rep.META_CONTEXT, proto.rep_meta_context(ident, query)))
            conn.sendall(reply(opt, Rep.ACK))
        elif opt == Opt.LIST:
            conn.sendall(reply(opt, Rep.SERVER, proto.rep_server("disk", "the disk")))
            conn.sendall(reply(opt, Rep.SERVER, proto.rep_server("other")))
            conn.sendall(reply(opt, Rep.ACK))
        elif opt == Opt.ABORT:
            conn.sendall(reply(opt, Rep.ACK))
            return False
        elif opt == Opt.GO and self.go:
            return self._go(conn, opt)
        elif opt == Opt.EXPORT_NAME:
            conn.sendall(proto.EXPORT_NAME_REPLY.pack(self.size, self.flags))
            return True
        else:
            conn.sendall(reply(opt, Rep.ERR_UNSUP))
        return None

    def _go(self, conn: socket.socket, opt: int) -> bool | None:
        if self.go_error is not None:
            rep, message = self.go_error
            conn.sendall(proto.option_error(opt, rep, message))
            return None
        conn.sendall(proto.option_reply(opt, Rep.INFO, proto.info_export(self.size, self.flags)))
        if self.block_size is not None:
            sizes = proto.info_block_size(*self.block_size)
            conn.sendall(proto.option_reply(opt, Rep.INFO, sizes))
        conn.sendall(proto.option_reply(opt, Rep.INFO, proto.info_string(Info.NAME, "disk")))
        conn.sendall(proto.option_reply(opt, Rep.ACK))
        return True

    def _transmit(self, conn: socket.socket) -> None:
        while True:
            req = proto.decode_request(recv_exact(conn, proto.REQUEST.size))
            self.requests.append(req)
            if req.type == Cmd.DISC:
                return
            payload = recv_exact(conn, req.length) if req.type == Cmd.WRITE else b""
            if self.handler(self, conn, req, payload) is False:
                return


def serve_disk(server: FakeServer, conn: socket.socket, req: proto.Request, data: bytes) -> None:
    """An honest server over ``server.disk``: one data chunk per read (a simple reply without
    structured replies), simple replies to the rest."""
    if req.type == Cmd.READ:
        body = bytes(server.disk[req.offset : req.offset + req.length])
        if server.structured:
            head = proto.chunk_data_header(req.cookie, req.offset, len(body), done=True)
        else:
            head = proto.simple_reply(req.cookie)
        conn.sendall(head + body)
    elif req.type == Cmd.WRITE:
        server.disk[req.offset : req.offset + len(data)] = data
        conn.sendall(proto.simple_reply(req.cookie))
    elif req.type in (Cmd.WRITE_ZEROES, Cmd.TRIM):
        server.disk[req.offset : req.offset + req.length] = bytes(req.length)
        conn.sendall(proto.simple_reply(req.cookie))
    elif req.type == Cmd.BLOCK_STATUS:
        half = max(req.length // 2, 1)
        extents = [(half, 0), (req.length - half, 3)] if req.length > 1 else [(1, 0)]
        conn.sendall(proto.chunk_block_status(req.cookie, 7, extents, done=True))
    else:
        conn.sendall(proto.simple_reply(req.cookie))


def chunk(flags: int, kind: int, cookie: int, payload: bytes) -> bytes:
    """A structured reply chunk with any type and payload."""
    return proto.chunk_header(flags, kind, cookie, len(payload)) + payload


def error_payload(err: int, message: str, offset: int | None = None) -> bytes:
    text = message.encode()
    tail = b"" if offset is None else struct.pack(">Q", offset)
    return proto.CHUNK_ERROR.pack(err, len(text)) + text + tail
