"""The daemon: owns the graph, drives, jobs, NBD server and monitors, and their order.

Start-up applies the command line in order (objects, nodes, drives, the NBD server and its
exports, monitors), then writes the pidfile: a client that sees the pidfile finds everything
ready, as with QEMU. Shutdown, on SIGTERM, SIGINT or ``quit``, goes in the one order that loses
nothing: stop accepting monitor connections, stop the NBD server (clients disconnected after
their requests in flight), cancel the jobs (copy-before-write detached), flush and close every
node, then end the monitor sessions (so ``quit`` still gets its reply) and remove the pidfile.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable
from typing import Any

from pyfleece.block.graph import Graph
from pyfleece.daemon.args import Action
from pyfleece.daemon.commands import register_all
from pyfleece.daemon.commands.nbd import add_object, nbd_server_args
from pyfleece.daemon.drives import DriveTable
from pyfleece.errors import ConfigError, PyfleeceError
from pyfleece.events import EventBus
from pyfleece.jobs.manager import JobManager
from pyfleece.monitor.core import create_dispatcher
from pyfleece.monitor.dispatch import Dispatcher
from pyfleece.monitor.options import ChardevSpec, MonitorSpec, parse_chardev, parse_monitor
from pyfleece.monitor.server import MonitorServer
from pyfleece.pidfile import write_pidfile

log = logging.getLogger(__name__)


class Daemon:
    """Everything one ``pyfleece daemon`` process serves; the monitors' handler context."""

    def __init__(self) -> None:
        self.events = EventBus()
        self.graph = Graph()
        self.drives = DriveTable(self.graph)
        self.jobs = JobManager(self.events)
        #: ``--object``/``object-add`` objects by id (TLS credentials).
        self.objects: dict[str, Any] = {}
        #: Nodes blockdev-add created (only those may go with blockdev-del, as in QEMU).
        self.monitor_owned: set[str] = set()
        #: The NBD server, while ``nbd-server-start`` has it running.
        self.nbd: Any = None
        self.dispatcher: Dispatcher = create_dispatcher()
        self._chardevs: list[ChardevSpec] = []
        self._monitors: list[MonitorSpec] = []
        self.monitor_server: MonitorServer | None = None
        self._quit = threading.Event()
        self._stopped = False
        register_all(self.dispatcher)

    # -- MonitorContext ---------------------------------------------------------------------

    def request_quit(self) -> None:
        self._quit.set()

    # -- start-up ---------------------------------------------------------------------------

    def apply(self, action: Action) -> None:
        """Applies one command-line option, through the same code as its QMP command.

        Raises:
            PyfleeceError: the option is invalid or cannot be carried out.
        """
        handler = self._appliers().get(action.kind)
        if handler is None:
            raise ConfigError(f"unsupported option --{action.kind}")
        handler(action)

    def _appliers(self) -> dict[str, Callable[[Action], None]]:
        return {
            "object": lambda a: self._add_object(a.options),
            "blockdev": lambda a: self.run_qmp("blockdev-add", a.options),
            "drive": lambda a: self.drives.add(a.options),
            "nbd-server": lambda a: self._start_nbd(a.options),
            "export": lambda a: self.run_qmp("block-export-add", a.options),
            "chardev": lambda a: self._add_chardev(parse_chardev(a.text)),
            "monitor": lambda a: self._monitors.append(parse_monitor(a.text)),
        }

    def _start_nbd(self, options: dict[str, Any]) -> None:
        """``--nbd-server`` takes a flat SocketAddress: errors name its members as the user
        wrote them (``addr.path``), not as the legacy shape they became (``addr.data.path``)."""
        try:
            self.run_qmp("nbd-server-start", nbd_server_args(options))
        except PyfleeceError as err:
            text = str(err).replace("'addr.data.", "'addr.")
            if text == str(err):
                raise
            raise ConfigError(text) from err

    def _add_chardev(self, spec: ChardevSpec) -> None:
        if any(c.id == spec.id for c in self._chardevs):
            raise ConfigError(f"Duplicate ID '{spec.id}' for chardev")
        self._chardevs.append(spec)

    def _add_object(self, props: dict[str, Any]) -> None:
        add_object(self, props)

    def run_qmp(self, name: str, arguments: dict[str, Any]) -> Any:
        """Runs a QMP command on behalf of the command line (keyval strings are typed
        first, as QEMU's keyval input visitor does)."""
        from pyfleece.daemon.keyval_types import typed_arguments

        spec = self.dispatcher.qmp.spec(name)
        args = typed_arguments(spec.args if spec else None, arguments)
        return self.dispatcher.execute(self, name, args)

    def start_monitors(self) -> None:
        if not self._monitors:
            return
        self.monitor_server = MonitorServer(self.dispatcher, self, self._monitors, self._chardevs)
        self.monitor_server.start()

    # -- running and stopping ---------------------------------------------------------------

    def wait(self) -> None:
        """Blocks until ``quit`` or a signal asks the daemon to stop."""
        while not self._quit.wait(3600):
            pass

    def install_signal_handlers(self) -> None:
        def on_signal(signum: int, frame: Any) -> None:
            log.info("signal %d: shutting down", signum)
            self._quit.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)

    def shutdown(self) -> None:
        """Stops everything in the order the module docstring gives; idempotent."""
        if self._stopped:
            return
        self._stopped = True
        steps: list[tuple[str, Callable[[], None]]] = [
            ("stop the NBD server", self._stop_nbd),
            ("cancel the jobs", self.jobs.shutdown),
            ("flush the nodes", self._flush_all),
            ("close the nodes", self.graph.close_all),
        ]
        with self.dispatcher.lock:
            for what, step in steps:
                try:
                    step()
                except Exception:  # shutdown goes on: later steps protect data too
                    log.exception("shutdown: failed to %s", what)
        if self.monitor_server is not None:
            self.monitor_server.stop(drain=1.0)

    def _stop_nbd(self) -> None:
        if self.nbd is not None:
            self.nbd.stop()
            self.nbd = None

    def _flush_all(self) -> None:
        for node in self.graph:
            if not node.read_only and not node.closed:
                try:
                    node.flush()
                except PyfleeceError as err:
                    log.error("shutdown: flush of %s failed: %s", node.node_name, err)


def write_daemon_pidfile(path: str) -> None:
    """Writes the pidfile (see pyfleece.pidfile).

    Raises:
        ConfigError: the file cannot be written (QEMU's wording).
    """
    try:
        write_pidfile(path)
    except OSError as err:
        reason = os.strerror(err.errno or 5)
        raise ConfigError(f"cannot create PID file: Could not create '{path}': {reason}") from err
