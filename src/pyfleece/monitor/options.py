"""``--chardev`` and ``--monitor``, as qemu-storage-daemon reads them.

``--chardev socket,id=ID,path=PATH,server=on,wait=off`` (or ``host=H,port=P`` for TCP) declares
a listening socket; ``--monitor [chardev=]ID[,mode=control|readline][,pretty=on|off][,id=X]``
serves a monitor on it. ``mode=control`` is QMP (the default, as in qemu-storage-daemon);
``mode=readline`` is HMP, which qemu-storage-daemon lacks and we add.

Chardev options are QemuOpts-style: ``,,`` is a literal comma, and the deprecated short forms
``server``, ``nowait`` (a bare ``NAME`` for ``NAME=on``, ``noNAME`` for ``NAME=off``) are
accepted, as QEMU 7.2 still accepts them. Only server sockets are supported (``server=on``), and
only ``wait=off``: the daemon does not block at start-up for a monitor client.
"""

from __future__ import annotations

from dataclasses import dataclass

from pyfleece.errors import ConfigError
from pyfleece.keyval import parse_keyval, split_items

_TRUE = ("on", "yes", "true", "y")
_FALSE = ("off", "no", "false", "n")

#: chardev socket options we take, and those accepted and ignored (harmless for a server)
_CHARDEV_KEYS = {"id", "path", "host", "port", "server", "wait"}
_CHARDEV_IGNORED = {"ipv4", "ipv6", "to", "nodelay", "numeric", "abstract", "tight"}
_CHARDEV_BOOLS = {"server", "wait", "ipv4", "ipv6", "nodelay", "numeric", "abstract", "tight"}


@dataclass(frozen=True)
class ChardevSpec:
    """A listening socket: Unix (``path``) or TCP (``host``, ``port``; port 0 picks one)."""

    id: str
    path: str | None = None
    host: str | None = None
    port: int | None = None


@dataclass(frozen=True)
class MonitorSpec:
    """A monitor on a chardev: QMP (``control``) or HMP (``readline``)."""

    chardev: str
    mode: str = "control"
    pretty: bool = False
    id: str | None = None


def _parse_bool(key: str, value: str) -> bool:
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ConfigError(f"Parameter '{key}' expects 'on' or 'off'")


def _chardev_items(text: str) -> tuple[str, dict[str, str]]:
    items = split_items(text)
    backend = items[0] if items and "=" not in items[0] else ""
    if not backend:
        raise ConfigError("chardev: the backend is missing (socket,id=...)")
    options: dict[str, str] = {}
    for item in items[1:]:
        key, sep, value = item.partition("=")
        if not sep:  # QEMU's deprecated short form of a boolean: NAME, or noNAME
            if key in _CHARDEV_BOOLS:
                value = "on"
            elif key.startswith("no") and key[2:] in _CHARDEV_BOOLS:
                key, value = key[2:], "off"
            else:
                raise ConfigError(f"Invalid parameter '{item}'")
        if key not in _CHARDEV_KEYS | _CHARDEV_IGNORED:
            raise ConfigError(f"Invalid parameter '{key}'")
        options[key] = value
    return backend, options


def parse_chardev(text: str) -> ChardevSpec:
    """Parses a ``--chardev`` value.

    Raises:
        ConfigError: with the offending part named.
    """
    backend, options = _chardev_items(text)
    if backend != "socket":
        raise ConfigError(f"'{backend}' is not a valid char driver name")
    ident = options.get("id")
    if not ident:
        raise ConfigError("chardev: no id specified")
    flags = {k: _parse_bool(k, v) for k, v in options.items() if k in _CHARDEV_BOOLS}
    if not flags.get("server", False):
        raise ConfigError(f"chardev '{ident}': only listening sockets (server=on) are supported")
    if flags.get("wait", True):
        raise ConfigError(f"chardev '{ident}': only wait=off is supported")
    path = options.get("path")
    if path is not None:
        if "host" in options or "port" in options:
            raise ConfigError(f"chardev '{ident}': give either path= or host=/port=, not both")
        return ChardevSpec(ident, path=path)
    if "port" not in options:
        raise ConfigError(f"chardev '{ident}': a socket needs path= or port=")
    try:
        port = int(options["port"])
    except ValueError:
        raise ConfigError(f"chardev '{ident}': port '{options['port']}' is not a number") from None
    if not 0 <= port <= 65535:
        raise ConfigError(f"chardev '{ident}': port {port} is out of range")
    return ChardevSpec(ident, host=options.get("host", ""), port=port)


def parse_monitor(text: str) -> MonitorSpec:
    """Parses a ``--monitor`` value.

    Raises:
        ConfigError: with QEMU's wording where it has one.
    """
    options = parse_keyval(text, implied_key="chardev")
    for key in options:
        if key not in ("chardev", "mode", "pretty", "id"):
            raise ConfigError(f"Parameter '{key}' is unexpected")
    chardev = options.get("chardev")
    if not isinstance(chardev, str) or not chardev:
        raise ConfigError("Parameter 'chardev' is missing")
    mode = options.get("mode", "control")
    if mode not in ("control", "readline"):
        raise ConfigError(f"Parameter 'mode' does not accept value '{mode}'")
    pretty = options.get("pretty", "off")
    if pretty not in ("on", "off"):
        raise ConfigError("Parameter 'pretty' expects 'on' or 'off'")
    ident = options.get("id")
    return MonitorSpec(chardev, mode, pretty == "on", ident if isinstance(ident, str) else None)
