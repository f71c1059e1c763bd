"""Helpers for the daemon tests (no tests here): pyfleece and qemu-storage-daemon side by side.

``Served`` is one running daemon, ours or qsd, started in its own directory with a QMP monitor
on ``qmp.sock`` and ready once its pidfile exists. Tests give both the same command line with
relative paths, so that what the two daemons report (file names included) can be compared as
it is. ``pair`` starts both; each test then runs the same commands on each and compares.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path
from typing import Any

from pyfleece.monitor.client import HmpConnection, QmpConnection
from tests.conftest import require_tool
from tests.support import PYFLEECE, run, running, wait_until

#: The monitor options every daemon here gets (QMP at qmp.sock).
QMP_ARGS = ["--chardev", "socket,path=qmp.sock,server=on,wait=off,id=qmp0",
            "--monitor", "chardev=qmp0"]  # fmt: skip
HMP_ARGS = ["--chardev", "socket,path=hmp.sock,server=on,wait=off,id=hmp0",
            "--monitor", "chardev=hmp0,mode=readline"]  # fmt: skip


def short_dir(prefix: str) -> Path:
    """A fresh directory with a short path (Unix socket paths are limited to 107 bytes)."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


class Served:
    """One running daemon and a negotiated QMP connection to it."""

    def __init__(self, kind: str, workdir: Path, proc: subprocess.Popen[bytes]) -> None:
        self.kind = kind
        self.dir = workdir
        self.proc = proc
        self.qmp = QmpConnection(str(workdir / "qmp.sock"), timeout=20.0)
        self.qmp.negotiate()

    def execute(self, name: str, /, **arguments: Any) -> dict[str, Any]:
        """The reply, ``return`` or ``error``, with the id removed."""
        reply = self.qmp.execute(name, arguments)
        reply.pop("id", None)
        return reply

    def ok(self, name: str, /, **arguments: Any) -> Any:
        reply = self.execute(name, **arguments)
        assert "return" in reply, f"{self.kind}: {name} {arguments}: {reply}"
        return reply["return"]

    def error(self, name: str, /, **arguments: Any) -> tuple[str, str]:
        reply = self.execute(name, **arguments)
        assert "error" in reply, f"{self.kind}: {name} {arguments} succeeded: {reply}"
        return reply["error"]["class"], reply["error"]["desc"]

    def event(self, name: str, timeout: float = 20.0) -> dict[str, Any]:
        """The next event called ``name`` (earlier events of other names are dropped)."""
        found: list[dict[str, Any]] = []

        def arrived() -> bool:
            for i, event in enumerate(self.qmp.events):
                if event.get("event") == name:
                    found.append(event)
                    del self.qmp.events[: i + 1]
                    return True
            with suppress(TimeoutError):
                self.qmp.events.append(self.qmp.receive())
            return False

        timeout_before = self.qmp.timeout
        self.qmp.timeout = 0.2
        try:
            wait_until(arrived, timeout, f"{self.kind}: event {name}")
        finally:
            self.qmp.timeout = timeout_before
        return found[0]

    def drain_events(self) -> list[dict[str, Any]]:
        """The events received so far (after a synchronising command), emptied."""
        self.ok("query-version")
        events, self.qmp.events = self.qmp.events, []
        return events

    def events_until_closed(self) -> list[dict[str, Any]]:
        """Every event until the daemon closes the connection (it is stopping)."""
        events, self.qmp.events = self.qmp.events, []
        while True:
            try:
                message = self.qmp.receive()
            except ConnectionError:
                return events
            if "event" in message:
                events.append(message)

    def hmp(self, line: str) -> str:
        """An HMP command through human-monitor-command ("\\n" line ends)."""
        out = self.ok("human-monitor-command", **{"command-line": line})
        return str(out).replace("\r\n", "\n")

    def uri(self, export: str, sock: str = "nbd.sock") -> str:
        return f"nbd+unix:///{export}?socket={self.dir / sock}"


def daemon_env() -> dict[str, str]:
    """The environment for a daemon started in another directory: this tree's sources
    first on the path, whatever the relative PYTHONPATH the suite runs with."""
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[2] / "src")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH", "")]))
    return env


def daemon_argv(kind: str) -> list[str]:
    if kind == "qsd":
        return [require_tool("qemu-storage-daemon")]
    return [*PYFLEECE, "daemon"]


@contextmanager
def serve(
    kind: str, workdir: Path, args: Sequence[str], *, monitors: Sequence[str] = QMP_ARGS
) -> Iterator[Served]:
    """Starts one daemon (``kind``: "qsd" or "ours") in ``workdir`` with ``args``."""
    pidfile = workdir / "pid"
    argv = [*daemon_argv(kind), *monitors, *args, "--pidfile", str(pidfile)]
    with running(argv, pidfile, cwd=workdir, env=daemon_env()) as proc:
        served = Served(kind, workdir, proc)
        try:
            yield served
        finally:
            served.qmp.close()


@contextmanager
def pair(
    tmp_path: Path,
    args: Sequence[str],
    prepare: Callable[[Path], None] | None = None,
    *,
    monitors: Sequence[str] = QMP_ARGS,
) -> Iterator[tuple[Served, Served]]:
    """qsd and pyfleece, each in its own directory prepared by ``prepare``, same args."""
    with ExitStack() as stack:
        served = []
        for kind in ("qsd", "ours"):
            workdir = tmp_path / kind
            workdir.mkdir()
            if prepare is not None:
                prepare(workdir)
            served.append(stack.enter_context(serve(kind, workdir, args, monitors=monitors)))
        yield served[0], served[1]


def make_images(workdir: Path, *specs: tuple[str, str, str]) -> None:
    """Creates images (name, format, size) with qemu-img in ``workdir``."""
    for name, fmt, size in specs:
        run(["qemu-img", "create", "-q", "-f", fmt, str(workdir / name), size])


def hmp_socket(served: Served) -> HmpConnection:
    return HmpConnection(str(served.dir / "hmp.sock"))
