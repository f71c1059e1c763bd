"""The NBD server: listeners, the export table, and the sessions of its clients.

What the daemon (``nbd-server-start``, ``block-export-add``/``nbd-server-add``,
``block-export-del``/``nbd-server-remove``, ``nbd-server-stop``) and ``pyfleece nbd`` call::

    server = NbdServer(tls=creds.server_context(), max_connections=100, events=bus)
    server.listen_unix("/run/nbd.sock")            # or listen_tcp("::", 10809)
    server.add_export(node, name="disk", writable=True, description="...")
    server.remove_export("disk", mode="safe")      # or "hard"
    server.stop()

Threads: one accept thread for all listeners (a selector plus a wake-up pipe), one thread per
connection (``session.Session``) and its private workers. Nothing else blocks.

Invariants:
- at most ``max_connections`` connections (0: unlimited) exist at once; at the limit the
  server stops accepting, and clients wait in the listen backlog, as QEMU does;
- an export leaves the table only after all its sessions have closed, so no request reaches
  its node afterwards; BLOCK_EXPORT_DELETED is emitted then, once per export;
- ``stop`` returns with every listener closed and every thread it started joined.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import selectors
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any

from pyfleece import sockets
from pyfleece.block.node import Node
from pyfleece.events import EventBus
from pyfleece.nbd.exports import Export, ExportError, ExportExists, ExportInUse, ExportNotFound
from pyfleece.nbd.handshake import HandshakeLimits
from pyfleece.nbd.replies import DataPath
from pyfleece.nbd.session import Session, SessionConfig

log = logging.getLogger(__name__)

REMOVE_MODES = ("safe", "hard")


class NbdServer:
    """An NBD server. See the module docstring for the calls and the invariants."""

    def __init__(
        self,
        *,
        tls: ssl.SSLContext | None = None,
        max_connections: int = 100,
        handshake_timeout: float = 10.0,
        events: EventBus | None = None,
        grace: float = 5.0,
        limits: HandshakeLimits | None = None,
        path: DataPath | None = None,
        on_disconnect: Callable[[int], None] | None = None,
    ) -> None:
        """
        Args:
            tls: require TLS (NBD's FORCEDTLS mode) with this server context.
            max_connections: simultaneous connections allowed, 0 for no limit.
            handshake_timeout: seconds a client has to finish the handshake.
            events: where BLOCK_EXPORT_DELETED goes.
            grace: seconds disconnected clients get to collect replies in flight.
            on_disconnect: called with the number of connections left after each one ends.
        """
        if max_connections < 0:
            raise ExportError(f"max-connections must not be negative, got {max_connections}")
        self.max_connections = max_connections
        self.events = events
        self.grace = grace
        self._on_disconnect = on_disconnect
        base = limits or HandshakeLimits()
        limits = HandshakeLimits(
            timeout=handshake_timeout,
            max_option=base.max_option,
            max_drain=base.max_drain,
            max_options=base.max_options,
        )
        self._config = SessionConfig(
            lookup=self.find_export,
            exports=self.exports,
            tls=tls,
            limits=limits,
            path=path or DataPath(),
        )
        self._lock = threading.Lock()
        self._exports: dict[str, Export] = {}  # by id
        self._sessions: dict[Session, threading.Thread] = {}
        # Every session thread not yet joined: a thread leaves ``_sessions`` a moment before
        # it ends (it still wakes the acceptor and calls ``on_disconnect``), and ``stop``
        # must outlive that moment.
        self._threads: set[threading.Thread] = set()
        self._listeners: list[socket.socket] = []
        self._unlink: list[str] = []
        self._ids = itertools.count(1)
        self._stopping = False
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._acceptor: threading.Thread | None = None
        self.connections_total = 0

    # -- listeners ---------------------------------------------------------------------------

    def listen_unix(self, path: str) -> str:
        """Listens on a Unix socket (a stale socket file is replaced); removed at stop.

        Raises:
            ConfigError: the path is in use by a live server, or cannot be bound.
        """
        sock = sockets.listen_unix(path)
        self.add_listener(sock, unlink=path)
        return path

    def listen_tcp(self, host: str, port: int) -> list[tuple[str, int]]:
        """Listens on every address ``host`` resolves to; returns the bound addresses.

        Raises:
            ConfigError: the name does not resolve or nothing could be bound.
        """
        bound = []
        for sock in sockets.listen_tcp(host, port):
            self.add_listener(sock)
            name = sock.getsockname()
            bound.append((str(name[0]), int(name[1])))
        return bound

    def add_listener(self, sock: socket.socket, *, unlink: str | None = None) -> None:
        """Accepts clients on an already listening socket (owned by the server from now)."""
        sock.setblocking(False)
        with self._lock:
            if self._stopping:
                sock.close()
                raise ExportError("the NBD server is stopping")
            self._listeners.append(sock)
            if unlink is not None:
                self._unlink.append(unlink)
            if self._acceptor is None:
                self._acceptor = threading.Thread(
                    target=self._accept_loop, name="nbd-accept", daemon=True
                )
                self._acceptor.start()
        self._wake()

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError):  # a full pipe: already awake
            os.write(self._wake_w, b"!")

    def _accept_loop(self) -> None:
        selector = selectors.DefaultSelector()
        selector.register(self._wake_r, selectors.EVENT_READ)
        watched: set[socket.socket] = set()
        try:
            while True:
                with self._lock:
                    if self._stopping:
                        return
                    room = not self.max_connections or len(self._sessions) < self.max_connections
                    wanted = set(self._listeners) if room else set()
                for sock in watched - wanted:
                    selector.unregister(sock)
                for sock in wanted - watched:
                    selector.register(sock, selectors.EVENT_READ)
                watched = wanted
                for key, _ in selector.select():
                    if key.fileobj == self._wake_r:
                        self._drain_wake()
                    elif isinstance(key.fileobj, socket.socket):
                        self._accept(key.fileobj)
                        break  # recheck the limit before accepting more
        finally:
            selector.close()

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_r, 256):
                pass
        except BlockingIOError:
            pass

    def _accept(self, listener: socket.socket) -> None:
        try:
            sock, addr = listener.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return
        except OSError as err:
            log.warning("accept failed: %s", err)
            return
        sock.setblocking(True)
        sockets.tune_accepted(sock)
        peer = f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) else "unix"
        session = Session(sock, next(self._ids), peer, self._config)
        thread = threading.Thread(
            target=self._run_session, args=(session,), name=f"nbd-conn{session.ident}", daemon=True
        )
        with self._lock:
            if self._stopping:
                sock.close()
                return
            self._sessions[session] = thread
            self._threads = {t for t in self._threads if t.is_alive()}
            self._threads.add(thread)
            self.connections_total += 1
        thread.start()

    def _run_session(self, session: Session) -> None:
        try:
            session.run()
        finally:
            with self._lock:
                self._sessions.pop(session, None)
                left = len(self._sessions)
            self._wake()
            if self._on_disconnect is not None:
                self._on_disconnect(left)

    # -- exports -----------------------------------------------------------------------------

    def add_export(self, node: Node, name: str | None = None, **options: Any) -> Export:
        """Exports ``node`` under ``name`` (default: its node name).

        Options: ``export_id`` (default: the name), ``description``, ``writable``, ``unmap``
        (trim and may-unmap zeroing reach the node; default on), ``allocation_depth``
        (offer ``qemu:allocation-depth``; default on), ``multi_conn`` (default: unless
        ``max_connections`` is 1). The export holds a soft reference on the node; releasing it
        (drive_del) removes the export as ``mode=hard`` would.

        Raises:
            ExportExists: the id or the name is taken.
            ExportError: the options are invalid.
            PermissionConflict, LockConflict: the node's other users (in this process or
                another) forbid what the export needs.
        """
        options.setdefault("multi_conn", self.max_connections != 1)
        export = Export(node, node.node_name if name is None else name, **options)
        with self._lock:
            if self._stopping:
                raise ExportError("the NBD server is stopping")
            if export.id in self._exports:
                raise ExportExists(f"Block export id '{export.id}' is already in use")
            if any(e.name == export.name for e in self._exports.values()):
                raise ExportExists(f"NBD server already has export named '{export.name}'")
            self._exports[export.id] = export
        try:
            export.hold(lambda: self._released(export))
        except BaseException:
            with self._lock:
                self._exports.pop(export.id, None)
            raise
        log.info("export '%s' added (node '%s')", export.name, node.node_name)
        return export

    def remove_export(self, export_id: str, mode: str = "safe") -> None:
        """Removes an export. ``safe`` refuses while clients are connected; ``hard``
        disconnects them (requests in flight finish first). Returns once it is gone.

        Raises:
            ExportNotFound: no export has this id.
            ExportInUse: ``safe`` and clients are connected.
        """
        if mode not in REMOVE_MODES:
            raise ExportError(f"Parameter 'mode' does not accept value '{mode}'")
        with self._lock:
            export = self._exports.get(export_id)
        if export is None or export.closing:
            raise ExportNotFound(f"Export '{export_id}' is not found")
        if mode == "safe":
            if not export.close_if_unused():
                raise ExportInUse(f"export '{export_id}' still in use")
            self._finish_removal(export, [])
        else:
            self._finish_removal(export, export.begin_close())

    def _released(self, export: Export) -> None:
        """The node's drive is being deleted: the export goes first (its on_release)."""
        if not export.closing:
            self._finish_removal(export, export.begin_close())

    def _finish_removal(self, export: Export, sessions: list[Any]) -> None:
        self._disconnect(sessions)
        with self._lock:
            gone = self._exports.pop(export.id, None) is export
        export.release()
        if gone:
            log.info("export '%s' removed", export.name)
            if self.events is not None:
                self.events.emit("BLOCK_EXPORT_DELETED", {"id": export.id})

    def _disconnect(self, sessions: list[Any]) -> None:
        for session in sessions:
            session.begin_disconnect()
        deadline = time.monotonic() + self.grace
        for session in sessions:
            if not session.wait_closed(max(0.0, deadline - time.monotonic())):
                session.force_disconnect()
        for session in sessions:
            session.wait_closed(None)

    def find_export(self, name: str) -> Export | None:
        """The export clients reach under ``name`` (None while it is being removed)."""
        with self._lock:
            for export in self._exports.values():
                if export.name == name and not export.closing:
                    return export
        return None

    def get_export(self, export_id: str) -> Export:
        with self._lock:
            export = self._exports.get(export_id)
        if export is None:
            raise ExportNotFound(f"Export '{export_id}' is not found")
        return export

    def exports(self) -> list[Export]:
        with self._lock:
            return [e for e in self._exports.values() if not e.closing]

    def sessions(self) -> list[Session]:
        with self._lock:
            return list(self._sessions)

    # -- stopping ----------------------------------------------------------------------------

    def stop(self) -> None:
        """Closes the listeners, disconnects every client, removes every export (emitting
        BLOCK_EXPORT_DELETED), and joins every thread. Idempotent."""
        with self._lock:
            if self._stopping:
                return
            self._stopping = True
            listeners, self._listeners = self._listeners, []
            acceptor = self._acceptor
        self._wake()
        if acceptor is not None:
            acceptor.join()
        for sock in listeners:
            sock.close()
        for path in self._unlink:
            _unlink_quietly(path)
        with self._lock:
            sessions = list(self._sessions)
            exports = list(self._exports.values())
        for export in exports:
            export.begin_close()
        self._disconnect(sessions)
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join()
        for export in exports:
            self._finish_removal(export, [])
        os.close(self._wake_r)
        os.close(self._wake_w)
        log.info("NBD server stopped")


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)
