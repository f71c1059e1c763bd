"""MonitorServer: listens on the monitors' sockets and runs a session per connection.

Threads (the whole picture of monitor concurrency): one *acceptor* thread per listening socket;
per connection, a session thread (QMP sessions add a writer thread, see qmp.py). Commands from
every session are serialised by the dispatcher's lock. Unlike QEMU's socket chardev, which
serves one client at a time, a socket here serves any number of clients at once.

Shutdown (``stop``) happens in a fixed order: stop accepting (close the listeners and remove
the Unix socket files we created), then end every session — QMP sessions first get a moment
(``drain``) to deliver the reply of the request in progress (``quit``) and queued output —
then join every thread.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import select
import selectors
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from pyfleece.errors import ConfigError
from pyfleece.monitor.dispatch import Dispatcher
from pyfleece.monitor.options import ChardevSpec, MonitorSpec
from pyfleece.monitor.qmp import QmpLimits, QmpSession
from pyfleece.monitor.readline import HmpSession
from pyfleece.sockets import listen_tcp, listen_unix, tune_accepted

log = logging.getLogger(__name__)


class Session(Protocol):
    def run(self) -> None: ...

    def close(self, *, drain: float = 0.0) -> None: ...


@dataclass
class _Listener:
    monitor: MonitorSpec
    sock: socket.socket
    path: str | None  # the Unix socket file to remove at shutdown
    inode: tuple[int, int] | None


class MonitorServer:
    """Serves the monitors of a daemon until ``stop``.

    Args:
        dispatcher: runs the commands.
        ctx: the context handlers receive (must satisfy ``dispatch.MonitorContext``).
        monitors: what to serve, each on one of ``chardevs`` (by id).
        limits: bounds for each QMP connection.
        hmp_echo: whether HMP sessions echo input (see readline.py).
    """

    def __init__(
        self,
        dispatcher: Dispatcher,
        ctx: Any,
        monitors: list[MonitorSpec],
        chardevs: list[ChardevSpec],
        *,
        limits: QmpLimits | None = None,
        hmp_echo: bool = True,
    ) -> None:
        self.dispatcher = dispatcher
        self.ctx = ctx
        self.limits = limits or QmpLimits()
        self.hmp_echo = hmp_echo
        by_id = {c.id: c for c in chardevs}
        if len(by_id) != len(chardevs):
            raise ConfigError("duplicate chardev id")
        self._plan: list[tuple[MonitorSpec, ChardevSpec]] = []
        for monitor in monitors:
            chardev = by_id.get(monitor.chardev)
            if chardev is None:
                raise ConfigError(f'chardev "{monitor.chardev}" not found')
            if any(c is chardev for _, c in self._plan):
                raise ConfigError(f"chardev '{chardev.id}' is already used by another monitor")
            self._plan.append((monitor, chardev))
        self._listeners: list[_Listener] = []
        self._threads: list[threading.Thread] = []
        self._sessions: set[Session] = set()
        self._lock = threading.Lock()
        self._stopping = False
        self._wake_r = self._wake_w = -1  # wakes the acceptors at stop (made by start)
        self._ids = itertools.count(1)

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Binds every monitor's socket and starts accepting.

        Raises:
            ConfigError: a socket cannot be bound (the ones already bound are closed).
        """
        try:
            for monitor, chardev in self._plan:
                self._listeners.extend(self._bind(monitor, chardev))
        except ConfigError:
            self._close_listeners()
            raise
        self._wake_r, self._wake_w = os.pipe()
        for listener in self._listeners:
            self._spawn(f"monitor-accept-{listener.monitor.chardev}", self._accept_loop, listener)

    def addresses(self) -> dict[str, list[Any]]:
        """Where each chardev listens (Unix path, or TCP (host, port) with the real port)."""
        result: dict[str, list[Any]] = {}
        for listener in self._listeners:
            result.setdefault(listener.monitor.chardev, []).append(listener.sock.getsockname())
        return result

    def stop(self, *, drain: float = 1.0, timeout: float = 5.0) -> None:
        """Stops accepting, ends every session, joins every thread (see the module docstring)."""
        with self._lock:
            if self._stopping:
                return
            self._stopping = True
            sessions = list(self._sessions)
        if self._wake_w >= 0:
            os.write(self._wake_w, b"x")
        deadline = time.monotonic() + drain  # one drain budget shared by all sessions
        for session in sessions:
            session.close(drain=max(0.0, deadline - time.monotonic()))
        for thread in list(self._threads):
            thread.join(timeout)
            if thread.is_alive():
                log.warning("monitor thread %s did not stop within %.1fs", thread.name, timeout)
        self._close_listeners()
        if self._wake_w >= 0:
            os.close(self._wake_r)
            os.close(self._wake_w)

    # -- internals -------------------------------------------------------------------------

    def _bind(self, monitor: MonitorSpec, chardev: ChardevSpec) -> list[_Listener]:
        if chardev.path is not None:
            sock = listen_unix(chardev.path)
            st = os.stat(chardev.path)
            return [_Listener(monitor, sock, chardev.path, (st.st_dev, st.st_ino))]
        socks = listen_tcp(chardev.host or "", chardev.port or 0)
        return [_Listener(monitor, s, None, None) for s in socks]

    def _close_listeners(self) -> None:
        for listener in self._listeners:
            listener.sock.close()
            if listener.path is not None:
                with contextlib.suppress(OSError):
                    st = os.stat(listener.path)
                    if (st.st_dev, st.st_ino) == listener.inode:  # still ours
                        os.unlink(listener.path)
        self._listeners = []

    def _spawn(self, name: str, target: Callable[..., None], *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(thread)
        thread.start()

    def _accept_loop(self, listener: _Listener) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(listener.sock, selectors.EVENT_READ)
            selector.register(self._wake_r, selectors.EVENT_READ)
            while not self._stopping:
                ready = {key.fileobj for key, _ in selector.select()}
                if self._stopping or self._wake_r in ready:
                    return
                try:
                    conn, _ = listener.sock.accept()
                except OSError as err:  # EMFILE and the like: wait a little, or for stop
                    log.warning("accept on %s failed: %s", listener.monitor.chardev, err)
                    select.select([self._wake_r], [], [], 0.1)
                    continue
                self._start_session(listener.monitor, conn)

    def _start_session(self, monitor: MonitorSpec, conn: socket.socket) -> None:
        tune_accepted(conn)
        name = f"{'qmp' if monitor.mode == 'control' else 'hmp'}{next(self._ids)}"
        session: Session
        if monitor.mode == "control":
            session = QmpSession(
                conn,
                self.dispatcher,
                self.ctx,
                pretty=monitor.pretty,
                limits=self.limits,
                name=name,
            )
        else:
            session = HmpSession(conn, self.dispatcher, self.ctx, echo=self.hmp_echo, name=name)
        with self._lock:
            if self._stopping:
                conn.close()
                return
            self._sessions.add(session)
        log.info("monitor %s: %s client connected", monitor.chardev, name)
        self._spawn(f"monitor-{name}", self._run_session, session)

    def _run_session(self, session: Session) -> None:
        try:
            session.run()
        except Exception:  # a session's bug must not take the server down
            log.exception("monitor session failed")
        finally:
            with self._lock:
                self._sessions.discard(session)
