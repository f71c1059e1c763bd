"""Listening sockets shared by the NBD server and the monitors.

``listen_unix`` replaces a stale socket file left by a killed process (nobody accepts on it)
but refuses to steal one that a live process is serving, or to remove a non-socket file.
``listen_tcp`` binds IPv4 or IPv6 (``::`` accepts both where the host allows).
"""

from __future__ import annotations

import errno
import os
import socket
import stat

from pyfleece.errors import ConfigError


def listen_unix(path: str, backlog: int = 128) -> socket.socket:
    """Binds and listens on a Unix socket at ``path``, replacing a stale one.

    Raises:
        ConfigError: the path is in use by a live server, or is not a socket.
    """
    _remove_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        sock.listen(backlog)
    except OSError as err:
        sock.close()
        raise ConfigError(
            f"Failed to bind socket to {path}: {os.strerror(err.errno or 5)}"
        ) from err
    return sock


def _remove_stale(path: str) -> None:
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ConfigError(f"Failed to bind socket to {path}: the path exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError as err:
        if err.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise ConfigError(f"Failed to bind socket to {path}: {err}") from err
        os.unlink(path)  # stale: left behind by a process that is gone
        return
    finally:
        probe.close()
    raise ConfigError(f"Failed to bind socket to {path}: Address already in use")


def listen_tcp(host: str, port: int, backlog: int = 128) -> list[socket.socket]:
    """Listens on every address ``host`` resolves to (one socket each), TCP_NODELAY set on
    accepted sockets by the caller.

    Raises:
        ConfigError: the name does not resolve, or no address can be bound.
    """
    try:
        infos = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as err:
        # QEMU prints gai_strerror() alone, without Python's "[Errno -2]" prefix.
        reason = err.strerror or str(err)
        raise ConfigError(f"address resolution failed for {host}:{port}: {reason}") from err
    socks: list[socket.socket] = []
    errors: list[str] = []
    for family, kind, proto, _, addr in infos:
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(addr)
            sock.listen(backlog)
        except OSError as err:
            sock.close()
            errors.append(os.strerror(err.errno or 5))
            continue
        socks.append(sock)
    if not socks:
        # QEMU's words; the address is in the option the user gave, not repeated here.
        reasons = "; ".join(dict.fromkeys(errors))
        raise ConfigError(f"Failed to find an available port: {reasons}")
    return socks


def tune_accepted(sock: socket.socket) -> None:
    """Settings every accepted data connection gets (TCP_NODELAY on TCP)."""
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
