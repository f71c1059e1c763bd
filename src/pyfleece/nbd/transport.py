"""Byte transports under an NBD connection: a plain socket, or TLS over it.

Both offer the same small interface to the handshake and the session:
``recv_into`` (0 means the peer closed), ``sendmsg_all`` (a list of buffers, written whole,
never concatenated), ``sendfile`` (plain sockets only: ``zero_copy`` says whether it is real)
and ``shutdown``. Writers hold ``wlock`` around everything that must reach the peer
contiguously (one reply); the transport never takes it on the write path itself.

TLS is done with ``ssl.MemoryBIO`` rather than ``SSLSocket``: OpenSSL forbids using one
connection object from two threads at once, and a session reads requests in one thread while
workers write replies from others. Here every call into the ``SSLObject`` is brief, in memory
and under ``_ssl_lock``; the blocking socket I/O happens outside it. Ciphertext leaves in the
order it was produced because producing and sending both happen under ``wlock``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import ssl
import threading
import time
from collections.abc import Sequence
from typing import cast

from pyfleece.errors import ProtocolError

Buffer = bytes | bytearray | memoryview

#: Errors that mean the peer is gone (not that our disk failed).
PEER_GONE = frozenset(
    {errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.ESHUTDOWN, errno.EBADF, errno.ETIMEDOUT}
)


class ConnectionClosed(Exception):
    """The peer went away, or the connection was shut down under us."""


class HandshakeTimeout(ProtocolError):
    """The client did not finish the handshake in time."""


class PlainTransport:
    """A connected stream socket, in blocking mode once the handshake is over."""

    zero_copy = True
    is_tls = False

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.wlock = threading.Lock()
        self._deadline: float | None = None

    # -- deadlines (handshake only: the data path stays in plain blocking mode) --------------

    def set_deadline(self, deadline: float | None) -> None:
        """Makes every blocking call fail with HandshakeTimeout after ``deadline``
        (``time.monotonic()`` based); None restores plain blocking mode."""
        self._deadline = deadline
        if deadline is None:
            self.sock.settimeout(None)

    @property
    def deadline(self) -> float | None:
        return self._deadline

    def _arm(self) -> None:
        if self._deadline is not None:
            left = self._deadline - time.monotonic()
            if left <= 0:
                raise HandshakeTimeout("the handshake took too long")
            self.sock.settimeout(left)

    # -- the interface -----------------------------------------------------------------------

    def recv_into(self, view: memoryview) -> int:
        self._arm()
        try:
            return self.sock.recv_into(view)
        except TimeoutError as err:
            raise HandshakeTimeout("the handshake took too long") from err
        except OSError as err:
            raise ConnectionClosed(str(err)) from err

    def sendmsg_all(self, buffers: Sequence[Buffer], *, more: bool = False) -> None:
        """Sends every buffer, in order, resuming after partial writes; ``more`` tells a TCP
        socket that more data follows at once (MSG_MORE), so a header and its sendfile
        payload share packets."""
        self._arm()
        try:
            sent = self.sock.sendmsg(buffers, (), socket.MSG_MORE if more else 0)
            total = 0
            for b in buffers:
                total += len(b)
            if sent < total:
                self._send_rest(buffers, sent)
        except TimeoutError as err:
            raise HandshakeTimeout("the handshake took too long") from err
        except OSError as err:
            raise ConnectionClosed(str(err)) from err

    def _send_rest(self, buffers: Sequence[Buffer], sent: int) -> None:
        for b in buffers:
            n = len(b)
            if sent >= n:
                sent -= n
                continue
            view = memoryview(b)[sent:]
            sent = 0
            while len(view):
                k = self.sock.send(view)
                view = view[k:]

    def sendfile(self, fd: int, offset: int, length: int) -> tuple[int, OSError | None]:
        """Sends up to ``length`` bytes of ``fd`` from ``offset``.

        Returns how many bytes went (fewer at the file's end, or when reading the file
        failed) and the disk error met, if any. A peer error raises ConnectionClosed.
        """
        out = self.sock.fileno()
        done = 0
        while done < length:
            try:
                n = os.sendfile(out, fd, offset + done, length - done)
            except OSError as err:
                if err.errno in PEER_GONE:
                    raise ConnectionClosed(str(err)) from err
                return done, err
            if n == 0:
                break
            done += n
        return done, None

    def shutdown(self, how: int = socket.SHUT_RDWR) -> None:
        """Wakes up whoever blocks on the socket; harmless on a dead one."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(how)

    def close(self) -> None:
        self.sock.close()


class TlsTransport(PlainTransport):
    """TLS on top of a connected socket, through memory BIOs (see the module docstring)."""

    zero_copy = False
    is_tls = True

    def __init__(self, sock: socket.socket, context: ssl.SSLContext) -> None:
        super().__init__(sock)
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._obj = context.wrap_bio(self._in, self._out, server_side=True)
        self._ssl_lock = threading.Lock()

    def handshake(self) -> None:
        """Runs the TLS handshake as the server.

        Raises:
            ProtocolError: the handshake failed (bad certificate, not TLS at all...).
            ConnectionClosed: the peer went away.
        """
        while True:
            try:
                with self._ssl_lock:
                    self._obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._flush_out()
                self._feed()
            except ssl.SSLError as err:
                self._flush_out_quietly()
                raise ProtocolError(f"TLS handshake failed: {err}") from err
        self._flush_out()

    def peer_certificate(self) -> dict[str, object] | None:
        cert = self._obj.getpeercert()
        return dict(cert) if cert else None

    def _feed(self) -> bool:
        """Moves ciphertext from the socket into the TLS engine; False at end of stream."""
        self._arm()
        try:
            data = self.sock.recv(65536)
        except TimeoutError as err:
            raise HandshakeTimeout("the handshake took too long") from err
        except OSError as err:
            raise ConnectionClosed(str(err)) from err
        if not data:
            self._in.write_eof()
            return False
        self._in.write(data)
        return True

    def _flush_out(self) -> None:
        with self.wlock:
            self._send_pending()

    def _flush_out_quietly(self) -> None:
        with contextlib.suppress(ConnectionClosed, OSError):
            self._flush_out()

    def _send_pending(self) -> None:
        """Sends what the TLS engine produced; the caller holds ``wlock``."""
        with self._ssl_lock:
            data = self._out.read()
        if data:
            super().sendmsg_all([data])

    def recv_into(self, view: memoryview) -> int:
        while True:
            try:
                with self._ssl_lock:
                    # With a buffer, SSLObject.read returns a count (typeshed says bytes).
                    n = cast(int, self._obj.read(len(view), view))
                    pending = self._out.pending
            except ssl.SSLWantReadError:
                n = -1
                pending = self._out.pending
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return 0
            except ssl.SSLError as err:
                raise ProtocolError(f"TLS error: {err}") from err
            if pending and self.wlock.acquire(blocking=False):
                # TLS output produced by reading (a key update, an alert). If a writer holds
                # the lock, it sends this too when it drains the engine; waiting for it here
                # could deadlock with a peer that only reads once its writes get through.
                try:
                    self._send_pending()
                finally:
                    self.wlock.release()
            if n >= 0:
                return n
            self._feed()

    def sendmsg_all(self, buffers: Sequence[Buffer], *, more: bool = False) -> None:
        try:
            with self._ssl_lock:
                for b in buffers:
                    if len(b):
                        self._obj.write(b)
        except ssl.SSLError as err:
            raise ConnectionClosed(f"TLS error: {err}") from err
        self._send_pending()

    def sendfile(self, fd: int, offset: int, length: int) -> tuple[int, OSError | None]:
        raise NotImplementedError("TLS connections cannot use sendfile")

    def close_tls(self) -> None:
        """Sends TLS close_notify (the spec's "shut down the TLS session"); best effort."""
        try:
            with self._ssl_lock:
                self._obj.unwrap()
        except ssl.SSLError:
            pass
        self._flush_out_quietly()
