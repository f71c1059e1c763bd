"""Helpers for the monitor tests (no tests here): our server, qemu-storage-daemon, waiting.

``wait_until`` is the one way these tests wait for something: it polls a condition with a
deadline and fails loudly, so a deadlock fails the test instead of hanging it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pyfleece.events import EventBus
from pyfleece.monitor.core import create_dispatcher
from pyfleece.monitor.dispatch import Dispatcher
from pyfleece.monitor.options import ChardevSpec, MonitorSpec
from pyfleece.monitor.qapi.commands import DESCRIBED
from pyfleece.monitor.qmp import QmpLimits
from pyfleece.monitor.server import MonitorServer
from tests.conftest import require_tool


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    """Polls ``predicate`` until it holds; fails after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(0.005)


class Context:
    """The smallest daemon context: an event bus and a quit request flag."""

    def __init__(self) -> None:
        self.events = EventBus()
        self.quit_requested = threading.Event()

    def request_quit(self) -> None:
        self.quit_requested.set()


@contextmanager
def serving(
    tmp_path: Path,
    *,
    hmp: bool = False,
    limits: QmpLimits | None = None,
    dispatcher: Dispatcher | None = None,
) -> Iterator[tuple[MonitorServer, Context, str, str]]:
    """Our monitors on Unix sockets: QMP at ``qmp.sock`` (and HMP at ``hmp.sock``)."""
    ctx = Context()
    qmp_path, hmp_path = str(tmp_path / "qmp.sock"), str(tmp_path / "hmp.sock")
    chardevs = [ChardevSpec("qmp", path=qmp_path)]
    monitors = [MonitorSpec("qmp")]
    if hmp:
        chardevs.append(ChardevSpec("hmp", path=hmp_path))
        monitors.append(MonitorSpec("hmp", mode="readline"))
    server = MonitorServer(
        dispatcher or create_dispatcher(), ctx, monitors, chardevs, limits=limits
    )
    server.start()
    try:
        yield server, ctx, qmp_path, hmp_path
    finally:
        server.stop(drain=0.5, timeout=5)


@contextmanager
def qemu_storage_daemon(tmp_path: Path) -> Iterator[str]:
    """A real qemu-storage-daemon with a QMP monitor; yields its socket path."""
    binary = require_tool("qemu-storage-daemon")
    sock, pidfile = tmp_path / "qsd.sock", tmp_path / "qsd.pid"
    proc = subprocess.Popen(
        [
            binary,
            "--chardev",
            f"socket,path={sock},server=on,wait=off,id=m",
            "--monitor",
            "chardev=m",
            "--pidfile",
            str(pidfile),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:

        def ready() -> bool:
            if proc.poll() is not None:
                err = proc.stderr.read().decode() if proc.stderr else ""
                raise AssertionError(f"qemu-storage-daemon exited: {err}")
            return pidfile.exists() and pidfile.stat().st_size > 0

        wait_until(ready, 10, "qemu-storage-daemon to start")
        yield str(sock)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        if proc.stderr:
            proc.stderr.close()


def rss_bytes() -> int:
    """This process's resident memory."""
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def register_stubs(dispatcher: Dispatcher, handler: Callable[[Any, dict[str, Any]], Any]) -> None:
    """Registers ``handler`` for every described command not registered yet, so that their
    arguments get validated (the daemon will register the real ones)."""
    for name in DESCRIBED:
        if dispatcher.qmp.lookup(name) is None:
            dispatcher.qmp.register(name, handler)
