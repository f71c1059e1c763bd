"""The command registry and dispatcher shared by every monitor (QMP and HMP).

The concurrency model, in one place: each monitor connection has its own thread(s), but every
command — from any QMP or HMP session, or from ``human-monitor-command`` — runs while holding
``Dispatcher.lock``, so commands are serialised as they are by QEMU's main loop. The lock is
re-entrant because ``human-monitor-command`` runs an HMP command from inside a QMP one.
Handlers may block (they hold the lock while they do); long work belongs in jobs.

Registering is separate from describing: ``qapi/commands.py`` describes every command's
arguments; ``CommandRegistry.register`` attaches a handler. Until then a described command is
unknown to clients, with QEMU's ``CommandNotFound`` answer.

A handler is ``handler(ctx, args) -> result``: ``ctx`` is whatever the daemon passes in (it must
at least satisfy ``MonitorContext``), ``args`` is the validated argument dict (absent optional
members absent), and ``result`` is JSON-able (``None`` means ``{}``).

Errors become replies here and nowhere else (see errors.py): ``CommandError`` keeps its QEMU
error class; any other ``PyfleeceError`` is a ``GenericError`` with its message; anything else
is a bug: it is logged with its traceback and answered with a ``GenericError``, and the daemon
keeps serving.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from pyfleece.errors import CommandError, PyfleeceError
from pyfleece.events import EventBus
from pyfleece.monitor.hmp import HmpTable, execute_line
from pyfleece.monitor.qapi.commands import DESCRIBED, CommandSpec
from pyfleece.monitor.schema import validate

log = logging.getLogger(__name__)

#: A QMP command's implementation: ``handler(ctx, args) -> JSON-able result``.
Handler = Callable[[Any, dict[str, Any]], Any]


class MonitorContext(Protocol):
    """What the monitor framework itself needs from the daemon's context object."""

    @property
    def events(self) -> EventBus:
        """The bus whose events every negotiated QMP session receives."""
        ...

    def request_quit(self) -> None:
        """Asks the daemon to shut down (QMP ``quit``, HMP ``quit``); returns at once."""
        ...


@dataclass(frozen=True)
class Registered:
    spec: CommandSpec
    handler: Handler


class CommandRegistry:
    """QMP commands by name: described schemas, and the handlers registered for them."""

    def __init__(self, described: Mapping[str, CommandSpec] = DESCRIBED) -> None:
        self._described = dict(described)
        self._handlers: dict[str, Registered] = {}
        self._lock = threading.Lock()

    def describe(self, spec: CommandSpec) -> None:
        """Adds (or replaces) the description of a command not in ``qapi/commands.py``."""
        with self._lock:
            self._described[spec.name] = spec

    def register(self, name: str, handler: Handler, *, replace: bool = False) -> None:
        """Makes a described command available to clients.

        Raises:
            ValueError: the command is not described, or already registered (unless
                ``replace``). These are programming errors, raised at start-up.
        """
        with self._lock:
            spec = self._described.get(name)
            if spec is None:
                raise ValueError(f"QMP command '{name}' has no argument description")
            if name in self._handlers and not replace:
                raise ValueError(f"QMP command '{name}' is already registered")
            self._handlers[name] = Registered(spec, handler)

    def unregister(self, name: str) -> None:
        with self._lock:
            self._handlers.pop(name, None)

    def lookup(self, name: str) -> Registered | None:
        with self._lock:
            return self._handlers.get(name)

    def spec(self, name: str) -> CommandSpec | None:
        """The description of a command, registered or not."""
        with self._lock:
            return self._described.get(name)

    def names(self) -> list[str]:
        """Registered command names, in registration order."""
        with self._lock:
            return list(self._handlers)


class Dispatcher:
    """Runs QMP and HMP commands from every monitor, one at a time.

    Attributes:
        lock: held while any command runs (see the module docstring).
        qmp: the QMP command registry.
        hmp: the HMP command table (its ``info`` sub-table is ``hmp.info``).
    """

    def __init__(self, described: Mapping[str, CommandSpec] = DESCRIBED) -> None:
        self.lock = threading.RLock()
        self.qmp = CommandRegistry(described)
        self.hmp = HmpTable()

    def execute(self, ctx: Any, name: str, arguments: Mapping[str, Any]) -> Any:
        """Validates and runs one QMP command; returns its result.

        Raises:
            CommandError: CommandNotFound for an unregistered command, GenericError for bad
                arguments, or whatever the handler raised.
            PyfleeceError, Exception: anything else the handler raised (see ``qmp_reply``).
        """
        with self.lock:
            entry = self.qmp.lookup(name)
            if entry is None:
                raise CommandError(f"The command {name} has not been found", "CommandNotFound")
            args = validate(entry.spec.args, arguments)
            result = entry.handler(ctx, args)
        return {} if result is None else result

    def qmp_reply(self, ctx: Any, name: str, arguments: Mapping[str, Any]) -> dict[str, Any]:
        """Runs a command and turns its outcome into a reply body (``return`` or ``error``)."""
        try:
            return {"return": self.execute(ctx, name, arguments)}
        except Exception as err:  # every failure becomes a reply: the monitor keeps serving
            error_class, desc = error_reply(err, f"QMP command {name}")
            return {"error": {"class": error_class, "desc": desc}}

    def run_hmp(self, ctx: Any, line: str) -> str:
        """Runs one HMP command line; returns its output ("\\n" line ends)."""
        with self.lock:
            return execute_line(self.hmp, ctx, line, self._hmp_error)

    @staticmethod
    def _hmp_error(err: BaseException) -> str:
        return error_reply(err, "HMP command")[1]


def error_reply(err: BaseException, what: str) -> tuple[str, str]:
    """The QMP error class and description for an exception (the one mapping point)."""
    if isinstance(err, CommandError):
        return err.error_class, str(err)
    if isinstance(err, PyfleeceError):
        log.debug("%s failed: %s", what, err)
        return "GenericError", str(err)
    log.error("%s failed unexpectedly", what, exc_info=err)
    return "GenericError", f"internal error: {type(err).__name__}: {err}"
