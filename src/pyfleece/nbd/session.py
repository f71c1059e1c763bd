"""One NBD connection from accept to close: the handshake, the transmission phase, and the
workers that serve its slow requests out of order.

A session owns one thread (the one that runs ``run``), which reads every request; it starts
private worker threads on demand, at most ``workers`` of them, for the requests the
transmission phase hands off (see ``requests``). Workers are per session on purpose: a client
that stops reading its replies blocks only its own workers, never another client's.

Lifecycle (``state``): HANDSHAKE -> TRANSMISSION -> CLOSING -> CLOSED. Whatever ends the
session (DISC, EOF, a protocol error, ``disconnect``), the requests in flight finish and
their replies are attempted before the session detaches from its export and closes the
socket; ``closed`` is set last.

Disconnecting from outside (export removal, server stop) is two-step, as the spec asks of a
server shutting down: ``begin_disconnect`` stops reading (SHUT_RD) and answers requests
already received with ESHUTDOWN; ``force_disconnect`` (after a grace period) breaks sends
too, for clients that do not read.
"""

from __future__ import annotations

import enum
import logging
import queue
import socket
import threading
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

from pyfleece.errors import ProtocolError
from pyfleece.nbd.exports import Export
from pyfleece.nbd.handshake import Handshake, HandshakeLimits
from pyfleece.nbd.replies import DataPath
from pyfleece.nbd.requests import Transmission
from pyfleece.nbd.transport import ConnectionClosed, PlainTransport, TlsTransport

log = logging.getLogger(__name__)


class State(enum.Enum):
    HANDSHAKE = "handshake"
    TRANSMISSION = "transmission"
    CLOSING = "closing"
    CLOSED = "closed"


@dataclass(frozen=True)
class SessionConfig:
    """What every session of a server shares."""

    lookup: Callable[[str], Export | None]
    exports: Callable[[], list[Export]]
    tls: Any = None  # ssl.SSLContext | None
    limits: HandshakeLimits = field(default_factory=HandshakeLimits)
    path: DataPath = field(default_factory=DataPath)
    workers: int = 2
    depth: int = 16


class _ConnLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, Any]:
        return f"[{self.extra['conn'] if self.extra else '?'}] {msg}", kwargs


class Workers:
    """Private worker threads of one session, started on demand; ``depth`` bounds the
    requests in flight (the reader waits for a slot: that is the backpressure)."""

    def __init__(self, name: str, threads: int, depth: int, on_crash: Callable[[], None]):
        self._name = name
        self._max = threads
        self._queue: queue.SimpleQueue[tuple[Callable[..., None], tuple[Any, ...]] | None]
        self._queue = queue.SimpleQueue()
        self._slots = threading.Semaphore(depth)
        self._cond = threading.Condition()
        self._inflight = 0
        self._idle = 0
        self._threads: list[threading.Thread] = []
        self._on_crash = on_crash

    def submit(self, fn: Callable[..., None], *args: Any) -> None:
        self._slots.acquire()
        with self._cond:
            self._inflight += 1
            if self._idle:
                self._idle -= 1  # an idle worker will take it
            elif len(self._threads) < self._max:
                thread = threading.Thread(
                    target=self._run, name=f"{self._name}-w{len(self._threads)}", daemon=True
                )
                self._threads.append(thread)
                thread.start()
            # otherwise it waits in the queue for the first worker done
        self._queue.put((fn, args))

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            fn, args = item
            try:
                fn(*args)
            except (ConnectionClosed, OSError):  # disk errors arrive as BlockError, handled
                self._on_crash()
            except Exception:
                log.exception("%s: request failed unexpectedly", self._name)
                self._on_crash()
            finally:
                self._slots.release()
                with self._cond:
                    self._inflight -= 1
                    self._idle += 1
                    self._cond.notify_all()

    def drain(self) -> None:
        """Waits until every submitted request has finished."""
        with self._cond:
            self._cond.wait_for(lambda: self._inflight == 0)

    def stop(self) -> None:
        for _ in self._threads:
            self._queue.put(None)
        for thread in self._threads:
            thread.join()


class Session:
    """One client connection. The server starts ``run`` on a thread of its own."""

    def __init__(self, sock: socket.socket, ident: int, peer: str, config: SessionConfig):
        self.ident = ident
        self.peer = peer
        self.state = State.HANDSHAKE
        self.export: Export | None = None
        self.transport = PlainTransport(sock)
        self.closed = threading.Event()
        self.log = _ConnLog(log, {"conn": f"conn{ident} {peer}"})
        self._config = config
        self._transmission: Transmission | None = None
        self._stopping = False
        self._lock = threading.Lock()
        self._workers = Workers(f"nbd-conn{ident}", config.workers, config.depth, self._broken)

    def run(self) -> None:
        """Serves the connection to its end; never raises."""
        clean = False
        try:
            clean = self._run()
        except ProtocolError as err:
            self.log.warning("closing the connection: %s", err)
        except (ConnectionClosed, OSError) as err:
            self.log.debug("connection closed: %s", err)
        except Exception:
            self.log.exception("closing the connection after an internal error")
        finally:
            self._close(clean)

    def _run(self) -> bool:
        self.log.debug("connected")
        handshake = Handshake(
            self.transport,
            lookup=self._config.lookup,
            exports=self._config.exports,
            attach=self._attach,
            tls=self._config.tls,
            limits=self._config.limits,
            log=self.log,
        )
        try:
            negotiated = handshake.run()
        finally:
            self.transport = handshake.transport
        if negotiated is None:
            return True
        export = negotiated.export
        transmission = Transmission(
            negotiated.transport,
            export.node,
            size=export.size,
            writable=export.writable,
            unmap=export.unmap,
            structured=negotiated.structured,
            contexts=negotiated.contexts,
            submit=self._workers.submit,
            path=self._config.path,
            log=self.log,
        )
        with self._lock:
            self._transmission = transmission
            self.state = State.TRANSMISSION
            transmission.stopping = self._stopping
        self.log.info("serving export '%s'", export.name)
        transmission.serve()
        return True

    def _attach(self, export: Export) -> bool:
        with self._lock:
            if self._stopping or not export.attach(self):
                return False
            self.export = export
            return True

    def _broken(self) -> None:
        """A worker lost the connection: make the reader notice too."""
        self.transport.shutdown()

    def _close(self, clean: bool) -> None:
        with self._lock:
            self.state = State.CLOSING
        self._workers.drain()
        self._workers.stop()
        if self.export is not None:
            self.export.detach(self)
        transport = self.transport
        if clean and isinstance(transport, TlsTransport):
            transport.close_tls()
        transport.shutdown()
        transport.close()
        with self._lock:
            self.state = State.CLOSED
        self.log.debug("closed")
        self.closed.set()

    # -- disconnection from outside ----------------------------------------------------------

    def begin_disconnect(self) -> None:
        """Stops taking requests: those already received get ESHUTDOWN, those in flight
        finish. The connection closes once they are done."""
        with self._lock:
            self._stopping = True
            if self._transmission is not None:
                self._transmission.stopping = True
        self.transport.shutdown(socket.SHUT_RD)

    @property
    def stopping(self) -> bool:
        """True once ``begin_disconnect`` was called."""
        return self._stopping

    def force_disconnect(self) -> None:
        """Breaks the connection both ways (a client that does not read its replies)."""
        self.transport.shutdown(socket.SHUT_RDWR)

    def disconnect(self, *, grace: float) -> None:
        self.begin_disconnect()
        if not self.closed.wait(grace):
            self.force_disconnect()

    def wait_closed(self, timeout: float | None) -> bool:
        return self.closed.wait(timeout)

    def __repr__(self) -> str:
        return f"<Session {self.ident} {self.peer} {self.state.value}>"
