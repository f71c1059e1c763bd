"""``pyfleece nbd``: qemu-nbd's command line for exporting one image.

Supported, as qemu-nbd reads them: ``-r``, ``-f FMT``, ``-x NAME``, ``-D DESC``,
``-k SOCKET``, ``-b ADDR``, ``-p PORT``, ``-t``, ``-e N``, ``-A``, ``-v``, ``--pid-file``,
``--object tls-creds-x509,...``, ``--tls-creds ID``, ``--discard ignore|unmap``,
``--cache MODE`` (accepted; the page cache is always used), ``-h``, ``-V``.

Behaviour that matches qemu-nbd: foreground; ``-k`` wins over ``-b``/``-p``; TCP defaults
to 0.0.0.0:10809; ``-e`` (default 1) caps simultaneous clients, 0 for no cap; without
``-t`` the server exits once its last client has gone (after the first one came);
SIGTERM/SIGINT exit cleanly with status 0; bad input exits with status 1 and one line
``pyfleece nbd: <what is wrong>``. Differences: ``qemu:allocation-depth`` is always offered
(``-A`` is accepted and changes nothing); the pid file is removed at exit.
"""

from __future__ import annotations

import contextlib
import getopt
import logging
import os
import select
import signal
import ssl
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from types import FrameType

from pyfleece import __version__
from pyfleece.block.image import open_image
from pyfleece.errors import PyfleeceError
from pyfleece.nbd import tls
from pyfleece.nbd.proto import MAX_STRING
from pyfleece.nbd.server import NbdServer
from pyfleece.pidfile import write_pidfile

PROG = "pyfleece nbd"
TRY_HELP = f"Try `{PROG} --help' for more information."

USAGE = f"""\
Usage: {PROG} [OPTIONS] FILE
Export FILE (a disk image) over NBD, like qemu-nbd.

  -h, --help                display this help and exit
  -V, --version             output version information and exit

Connection properties:
  -p, --port=PORT           port to listen on (default `10809')
  -b, --bind=IFACE          interface to bind to (default `0.0.0.0')
  -k, --socket=PATH         path to the unix socket
  -e, --shared=NUM          device can be shared by NUM clients (default '1', 0 = no limit)
  -t, --persistent          don't exit on the last connection
  -v, --verbose             display extra debugging information
  -x, --export-name=NAME    expose export by name (default is empty string)
  -D, --description=TEXT    export a human-readable description
  -A, --allocation-depth    expose the allocation depth (always on)

General purpose options:
  --object type,id=ID,...   define an object: tls-creds-x509,id=ID,endpoint=server,dir=DIR
                            [,verify-peer=on|off]
  --tls-creds=ID            use id of an earlier --object to provide TLS
  --pid-file=PATH           store the server's process ID in the given file

Block device options:
  -f, --format=FORMAT       set image format (raw, qcow2, ...)
  -r, --read-only           export read-only
      --discard=MODE        set discard mode (ignore, unmap)
      --cache=MODE          accepted for compatibility (the host page cache is used)
"""

SHORT = "hVp:b:k:e:tvx:D:Arf:"
LONG = [
    "help",
    "version",
    "port=",
    "bind=",
    "socket=",
    "shared=",
    "persistent",
    "verbose",
    "export-name=",
    "description=",
    "allocation-depth",
    "read-only",
    "format=",
    "object=",
    "tls-creds=",
    "pid-file=",
    "discard=",
    "cache=",
]
_DISCARD = {"ignore": False, "off": False, "unmap": True, "on": True}
_CACHE = ("none", "writeback", "writethrough", "directsync", "unsafe")
INT_MAX = (1 << 31) - 1


class UsageError(Exception):
    """A command-line error; the message is printed after the program name."""

    def __init__(self, message: str, *, hint: bool = False) -> None:
        super().__init__(message)
        self.hint = hint


@dataclass
class Config:
    filename: str = ""
    fmt: str | None = None
    read_only: bool = False
    name: str = ""
    description: str = ""
    socket: str | None = None
    bind: str = "0.0.0.0"
    port: str = "10809"
    shared: int = 1
    persistent: bool = False
    verbose: bool = False
    unmap: bool = False
    pid_file: str | None = None
    tls_creds: str | None = None
    objects: dict[str, tls.TlsCredsX509] = field(default_factory=dict)


def parse_args(argv: list[str]) -> Config | None:
    """The configuration, or None after --help/--version were printed.

    Raises:
        UsageError: the command line is wrong.
    """
    try:
        opts, args = getopt.gnu_getopt(argv, SHORT, LONG)
    except getopt.GetoptError as err:  # both lines prefixed, as qemu-nbd prints them
        raise UsageError(f"{_getopt_message(err)}\n{PROG}: {TRY_HELP}") from err
    config = Config()
    for opt, value in opts:
        if opt in ("-h", "--help"):
            sys.stdout.write(USAGE)
            return None
        if opt in ("-V", "--version"):
            print(f"{PROG} (pyfleece) {__version__}")
            return None
        _apply(config, opt, value)
    if len(args) != 1:
        raise UsageError("Invalid number of arguments", hint=True)
    config.filename = args[0]
    return config


def _getopt_message(err: getopt.GetoptError) -> str:
    """glibc getopt's words, which qemu-nbd prints."""
    short = len(err.opt) == 1
    if "requires argument" in err.msg:
        if short:
            return f"option requires an argument -- '{err.opt}'"
        return f"option '--{err.opt}' requires an argument"
    if "must not have an argument" in err.msg:
        return f"option '--{err.opt}' doesn't allow an argument"
    if short:
        return f"invalid option -- '{err.opt}'"
    return f"unrecognized option '--{err.opt}'"


def _apply(config: Config, opt: str, value: str) -> None:
    simple: dict[str, Callable[[], None]] = {
        "-r": lambda: setattr(config, "read_only", True),
        "-t": lambda: setattr(config, "persistent", True),
        "-v": lambda: setattr(config, "verbose", True),
        "-A": lambda: None,
        "-f": lambda: setattr(config, "fmt", value),
        "-k": lambda: setattr(config, "socket", value),
        "-b": lambda: setattr(config, "bind", value),
        "-p": lambda: setattr(config, "port", value),
        "--pid-file": lambda: setattr(config, "pid_file", value),
        "--tls-creds": lambda: setattr(config, "tls_creds", value),
    }
    key = _SHORT_OF.get(opt, opt)
    if key in simple:
        simple[key]()
    elif key == "-x":
        config.name = _bounded(value, "export name")
    elif key == "-D":
        config.description = _bounded(value, "description")
    elif key == "-e":
        config.shared = _shared(value)
    elif key == "--discard":
        if value not in _DISCARD:
            raise UsageError(f"Invalid discard mode `{value}'")
        config.unmap = _DISCARD[value]
    elif key == "--cache":
        if value not in _CACHE:
            raise UsageError(f"Invalid cache mode `{value}'")
    elif key == "--object":
        _add_object(config, value)


_SHORT_OF = {
    "--read-only": "-r",
    "--persistent": "-t",
    "--verbose": "-v",
    "--allocation-depth": "-A",
    "--format": "-f",
    "--socket": "-k",
    "--bind": "-b",
    "--port": "-p",
    "--export-name": "-x",
    "--description": "-D",
    "--shared": "-e",
}


def _bounded(value: str, what: str) -> str:
    if len(value.encode()) > MAX_STRING:
        raise UsageError(f"{what} '{value}' too long")
    return value


def _shared(value: str) -> int:
    try:
        shared = int(value, 0)
    except ValueError:
        shared = -1
    if not 0 <= shared <= INT_MAX:  # qemu-nbd reads an int
        raise UsageError(f"Invalid shared device number '{value}'")
    return shared


def _add_object(config: Config, text: str) -> None:
    try:
        creds = tls.creds_from_object(tls.parse_object(text))
    except PyfleeceError as err:
        raise UsageError(str(err)) from err
    if creds.id in config.objects:
        raise UsageError(f"attempt to add duplicate property '{creds.id}' to object")
    config.objects[creds.id] = creds


def _port(config: Config) -> int:
    try:
        port = int(config.port)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise UsageError(
            f"address resolution failed for {config.bind}:{config.port}: "
            "Servname not supported for ai_socktype"
        )
    return port


def _tls_context(config: Config) -> ssl.SSLContext | None:
    if config.tls_creds is None:
        return None
    creds = config.objects.get(config.tls_creds)
    if creds is None:
        missing = config.tls_creds
        raise UsageError(f"Failed to get TLS creds: No TLS credentials with id '{missing}'")
    try:
        return creds.server_context()
    except PyfleeceError as err:
        raise UsageError(str(err)) from err


class _Wakeup:
    """The main thread's sleep: woken by SIGTERM/SIGINT or by the last client leaving."""

    CLIENTS_GONE = b"\xff"

    def __init__(self) -> None:
        self.rfd, self.wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._old_fd = signal.set_wakeup_fd(self.wfd)
        self._old = {s: signal.signal(s, self._ignore) for s in (signal.SIGTERM, signal.SIGINT)}

    @staticmethod
    def _ignore(signum: int, frame: FrameType | None) -> None:
        """The wake-up fd carries the signal; the handler only keeps the process alive."""

    def poke(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.write(self.wfd, self.CLIENTS_GONE)

    def wait(self) -> str:
        """Blocks until a reason to stop arrives; returns it."""
        stops = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "SIGINT"}
        while True:
            select.select([self.rfd], [], [])
            try:
                data = os.read(self.rfd, 64)
            except BlockingIOError:
                continue
            for byte in data:
                if byte in stops:
                    return stops[signal.Signals(byte)]
                if bytes([byte]) == self.CLIENTS_GONE:
                    return "last client disconnected"

    def close(self) -> None:
        signal.set_wakeup_fd(self._old_fd)
        for signum, handler in self._old.items():
            signal.signal(signum, handler)
        os.close(self.rfd)
        os.close(self.wfd)


def serve(config: Config) -> int:
    """Exports the image until a signal, or until the last client leaves (without -t)."""
    if config.verbose:
        logging.getLogger("pyfleece").setLevel(logging.INFO)
    context = _tls_context(config)
    port = None if config.socket else _port(config)
    try:
        node = open_image(config.filename, config.fmt, read_only=config.read_only)
    except PyfleeceError as err:
        raise UsageError(f"Failed to blk_new_open '{config.filename}': {err}") from err
    wakeup = _Wakeup()
    server = NbdServer(
        tls=context,
        max_connections=config.shared,
        on_disconnect=lambda left: wakeup.poke() if left == 0 and not config.persistent else None,
    )
    try:
        _listen(server, config, port)
        server.add_export(
            node,
            config.name,
            description=config.description,
            writable=not config.read_only,
            unmap=config.unmap,
        )
        _write_pid_file(config.pid_file)
        reason = wakeup.wait()
        logging.getLogger(__name__).info("exiting: %s", reason)
        return 0
    finally:
        server.stop()
        node.close()
        wakeup.close()
        if config.pid_file:
            _unlink_quietly(config.pid_file)


def _listen(server: NbdServer, config: Config, port: int | None) -> None:
    try:
        if config.socket:
            server.listen_unix(config.socket)
        else:
            server.listen_tcp(config.bind, port or 0)
    except PyfleeceError as err:
        raise UsageError(str(err)) from err


def _write_pid_file(path: str | None) -> None:
    if not path:
        return
    try:
        write_pidfile(path)
    except OSError as err:  # qemu-nbd's words
        raise UsageError(f"Could not create '{path}': {os.strerror(err.errno or 5)}") from err


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def main(argv: list[str]) -> int:
    """``pyfleece nbd ARGS``: returns the exit status."""
    try:
        config = parse_args(argv)
        if config is None:
            return 0
        return serve(config)
    except UsageError as err:
        sys.stderr.write(f"{PROG}: {err}\n")
        if err.hint:
            sys.stderr.write(f"{TRY_HELP}\n")
        return 1
