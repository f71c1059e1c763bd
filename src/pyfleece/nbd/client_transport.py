"""Byte transports under the NBD client: a plain socket, or TLS over one (nbd-proto.md, "TLS
support").

Both offer the same four operations: ``send`` (several buffers, all of them, in order),
``recv_into`` (some bytes; 0 at end of stream), ``shutdown`` and ``close``. Exactly one thread
receives (the client's reader), while any number of threads may send under the client's send
lock.

TLS runs on an ``ssl.SSLObject`` over memory BIOs rather than an ``SSLSocket``, because
OpenSSL does not allow one thread to read while another writes the same SSL connection: here
every call into the SSL object is made under one short lock, and the socket reads and writes
happen outside it, so the reader can wait for data while senders encrypt and send.

Invariants: ciphertext leaves in the order the SSL object produced it (whoever takes bytes
from the outgoing BIO sends them before releasing the transport's send lock); no SSL call
blocks on the network.
"""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Sequence
from contextlib import suppress
from typing import cast

Buffer = bytes | bytearray | memoryview

#: Ciphertext read from the socket per call in TLS mode.
_TLS_RECV = 256 << 10
#: Plaintext encrypted per step when sending, bounding the outgoing BIO's size.
_TLS_SEND = 256 << 10


class PlainTransport:
    """A connected stream socket (TCP or Unix)."""

    tls = False

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def send(self, bufs: Sequence[Buffer]) -> None:
        """Sends every buffer, in order (one ``sendmsg`` when the kernel takes it all)."""
        if len(bufs) == 1:
            self.sock.sendall(bufs[0])
            return
        views = [memoryview(b).cast("B") for b in bufs]
        while views:
            sent = self.sock.sendmsg(views)
            while views and sent >= len(views[0]):
                sent -= len(views[0])
                views.pop(0)
            if views and sent:
                views[0] = views[0][sent:]

    def recv_into(self, view: memoryview, *, wait_all: bool = False) -> int:
        """Receives into ``view``; with ``wait_all`` the kernel fills it unless the stream
        ends. Returns the count, 0 at the end of the stream."""
        return self.sock.recv_into(view, len(view), socket.MSG_WAITALL if wait_all else 0)

    def shutdown(self) -> None:
        """Wakes a thread blocked receiving and stops further traffic."""
        with suppress(OSError):  # already disconnected
            self.sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.sock.close()


class TlsTransport:
    """TLS over a connected socket, driven through memory BIOs (see the module docstring)."""

    tls = True

    def __init__(self, sock: socket.socket, ctx: ssl.SSLContext, hostname: str | None) -> None:
        self.sock = sock
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._obj = ctx.wrap_bio(self._in, self._out, server_side=False, server_hostname=hostname)
        self._ssl_lock = threading.Lock()
        self._send_lock = threading.Lock()

    def handshake(self) -> None:
        """Runs the TLS handshake to completion.

        Raises:
            ssl.SSLError: the handshake failed (certificate not trusted, refused, ...).
            ConnectionError: the server closed the connection during it.
        """
        while True:
            try:
                with self._ssl_lock:
                    self._obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._flush(block=True)
                if not self._feed():
                    raise ConnectionError(
                        "the server closed the connection during the TLS handshake"
                    ) from None
        self._flush(block=True)

    def send(self, bufs: Sequence[Buffer]) -> None:
        with self._send_lock:
            for buf in bufs:
                view = memoryview(buf).cast("B")
                for start in range(0, len(view), _TLS_SEND):
                    with self._ssl_lock:
                        self._obj.write(view[start : start + _TLS_SEND])
                        out = self._out.read()
                    self.sock.sendall(out)

    def recv_into(self, view: memoryview, *, wait_all: bool = False) -> int:
        got = 0
        while got < len(view):
            try:
                with self._ssl_lock:
                    # with a buffer, read() returns a count (typeshed says bytes)
                    n = cast(int, self._obj.read(len(view) - got, view[got:]))
            except ssl.SSLWantReadError:
                n = -1
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return got
            if self._out.pending:  # e.g. a reply to a key update
                self._flush(block=False)
            if n > 0:
                got += n
                if not wait_all:
                    return got
            elif n == 0 or not self._feed():
                return got
        return got

    def shutdown(self) -> None:
        try:
            with self._ssl_lock:
                self._obj.unwrap()
        except (ssl.SSLError, ValueError):
            pass  # close_notify is queued; the peer's answer is not awaited
        try:
            self._flush(block=False)
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self) -> None:
        self.sock.close()

    def _feed(self) -> bool:
        """Moves ciphertext from the socket into the SSL object; False at end of stream."""
        data = self.sock.recv(_TLS_RECV)
        with self._ssl_lock:
            if data:
                self._in.write(data)
            else:
                self._in.write_eof()
        return bool(data)

    def _flush(self, *, block: bool) -> None:
        """Sends pending ciphertext. Without ``block``, leaves it to the sender holding the
        send lock (the reader must never wait behind a sender stalled on a full socket)."""
        if not self._send_lock.acquire(blocking=block):
            return
        try:
            with self._ssl_lock:
                out = self._out.read()
            if out:
                self.sock.sendall(out)
        finally:
            self._send_lock.release()


Transport = PlainTransport | TlsTransport
