"""``pyfleece daemon``'s command line: qemu-storage-daemon's options, plus ``--drive``.

Options are kept in the order given, because each may refer to what an earlier one created
(an export names a node, a monitor names a chardev, an NBD server names TLS credentials).
Values are parsed from keyval (or JSON for ``--blockdev``) here; what they mean is decided
by the same code that serves the equivalent QMP command.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pyfleece.errors import ConfigError
from pyfleece.keyval import parse_json_or_keyval, parse_keyval

USAGE = """\
Usage: pyfleece daemon [options]
pyfleece storage daemon (qemu-storage-daemon's command line, plus --drive)

  -h, --help             display this help and exit
  -V, --version          output version information and exit

  --blockdev [driver=]<driver>[,node-name=<N>][,read-only=on|off]
             [,driver specific parameters...]     (or a JSON object)
                         configure a block node
  --drive file=<file>[,format=<fmt>],id=<id>,if=none[,backing=<node>]
          [,readonly=on|off][,node-name=<N>]
                         add a drive: <id> names the drive and its top node
  --chardev socket,id=<id>,path=<path>,server=on,wait=off
  --chardev socket,id=<id>,host=<host>,port=<port>,server=on,wait=off
                         configure a socket for a monitor
  --monitor [chardev=]<id>[,mode=control|readline][,pretty=on|off]
                         serve QMP (control) or HMP (readline) on a chardev
  --nbd-server addr.type=unix,addr.path=<path>[,tls-creds=<id>][,max-connections=<n>]
  --nbd-server addr.type=inet,addr.host=<host>,addr.port=<port>[,tls-creds=<id>]
               [,max-connections=<n>]
                         start the NBD server
  --export [type=]nbd,id=<id>,node-name=<node>[,name=<export-name>]
           [,writable=on|off][,description=<text>]
                         export a block node over NBD (requires --nbd-server)
  --object tls-creds-x509,id=<id>,endpoint=server,dir=<dir>[,verify-peer=on|off]
                         create TLS credentials
  --daemonize            daemonize the process, and have the parent exit
                         once startup is complete
  --pidfile <path>       write the process ID to a file once ready

Stop it with SIGTERM, SIGINT, or 'quit' on a QMP or HMP monitor.
"""

#: option -> (implied key for keyval, accepts JSON)
_OPTIONS: dict[str, tuple[str | None, bool]] = {
    "blockdev": ("driver", True),
    "drive": (None, False),
    "chardev": ("backend", False),
    "monitor": ("chardev", False),
    "nbd-server": (None, False),
    "export": ("type", False),
    "object": ("qom-type", True),
}


@dataclass(frozen=True)
class Action:
    """One option from the command line, parsed, in command-line order."""

    kind: str
    options: dict[str, Any]
    text: str


@dataclass
class DaemonArgs:
    actions: list[Action]
    pidfile: str | None = None
    show_help: bool = False
    show_version: bool = False
    daemonize: bool = False


def parse_args(argv: list[str]) -> DaemonArgs:
    """Parses the command line into ordered actions.

    Raises:
        ConfigError: unknown option, missing value, or a value that does not parse.
    """
    result = DaemonArgs(actions=[])
    it = iter(argv)
    for arg in it:
        if arg in ("-h", "--help"):
            result.show_help = True
            continue
        if arg in ("-V", "--version"):
            result.show_version = True
            continue
        if arg == "--daemonize":
            result.daemonize = True
            continue
        name, sep, value = arg.partition("=")
        if arg.startswith("-") and not arg.startswith("--") and len(arg) > 1:
            raise ConfigError(f"invalid option -- '{arg[1]}'")  # glibc getopt's words
        if not name.startswith("--"):
            raise ConfigError(f"{arg}: Unexpected argument")
        key = name[2:]
        if key not in _OPTIONS and key != "pidfile":
            raise ConfigError(f"unrecognized option '{name}'")
        if not sep:
            value_or_none = next(it, None)
            if value_or_none is None:
                raise ConfigError(f"option '{name}' requires an argument")
            value = value_or_none
        if key == "pidfile":
            result.pidfile = value
            continue
        implied, json_ok = _OPTIONS[key]
        try:
            parsed = (
                parse_json_or_keyval(value, implied) if json_ok else parse_keyval(value, implied)
            )
        except ConfigError as err:
            raise ConfigError(f"{name} {value}: {err}") from err
        result.actions.append(Action(key, parsed, value))
    return result
