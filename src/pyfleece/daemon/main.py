"""``pyfleece daemon``: parse the command line, start everything, serve until told to stop.

Exit status: 0 after a clean stop (signal or ``quit``), 1 when start-up fails; a failed
start-up leaves no socket and no pidfile behind. ``--daemonize`` forks as QEMU does: the
parent waits until the daemon is ready (pidfile written) and exits 0, or with 1 if the daemon
failed to start; the daemon then detaches its standard streams. Unlike QEMU it keeps its
working directory, so relative paths given later over QMP mean what they meant at start.
"""

from __future__ import annotations

import logging
import os
import sys

from pyfleece import __version__
from pyfleece.daemon.args import USAGE, parse_args
from pyfleece.daemon.core import Daemon, write_daemon_pidfile
from pyfleece.errors import PyfleeceError
from pyfleece.pidfile import remove_pidfile

log = logging.getLogger(__name__)


def main(argv: list[str]) -> int:
    try:
        args = parse_args(argv)
    except PyfleeceError as err:
        sys.stderr.write(f"pyfleece daemon: {err}\nTry 'pyfleece daemon --help'.\n")
        return 1
    if args.show_help:
        sys.stdout.write(USAGE)
        return 0
    if args.show_version:
        print(f"pyfleece daemon {__version__} (speaks QEMU 7.2's protocols)")
        return 0
    ready_fd = -1
    if args.daemonize:
        ready_fd = _daemonize()  # returns only in the daemon
    daemon = Daemon()
    daemon.install_signal_handlers()
    try:
        for action in args.actions:
            try:
                daemon.apply(action)
            except PyfleeceError as err:
                raise PyfleeceError(f"--{action.kind} {action.text}: {err}") from err
        daemon.start_monitors()
        if args.pidfile:
            write_daemon_pidfile(args.pidfile)
    except PyfleeceError as err:
        sys.stderr.write(f"pyfleece daemon: {err}\n{_hint(err)}")
        daemon.shutdown()
        return 1
    log.info("ready")
    if ready_fd >= 0:
        _detach(ready_fd)
    try:
        daemon.wait()
    finally:
        daemon.shutdown()
        if args.pidfile:
            remove_pidfile(args.pidfile)
    return 0


def _hint(err: BaseException | None) -> str:
    """QEMU's hint line for an error (a locked image's "Is another process using the image
    [x]?"), found along the chain of causes; "" when there is none."""
    while err is not None:
        hint = getattr(err, "hint", "")
        if isinstance(hint, str) and hint:
            return hint + "\n"
        err = err.__cause__ or err.__context__
    return ""


def _daemonize() -> int:
    """Forks twice (no controlling terminal); the original process waits on a pipe and
    exits with 0 once the daemon reports readiness, 1 if it never does. Returns, in the
    daemon, the pipe's write end."""
    read_fd, write_fd = os.pipe()
    if os.fork() > 0:
        os.close(write_fd)
        ready = os.read(read_fd, 1)
        os._exit(0 if ready == b"R" else 1)
    os.close(read_fd)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)  # the intermediate process; its parent waits on the pipe, not on it
    return write_fd


def _detach(ready_fd: int) -> None:
    """Tells the waiting parent that the daemon is ready, then leaves the terminal."""
    os.write(ready_fd, b"R")
    os.close(ready_fd)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
