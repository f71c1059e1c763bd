"""sockets.py: listening sockets and the errors they report in QEMU's words."""

from __future__ import annotations

import socket

import pytest

from pyfleece.errors import ConfigError
from pyfleece.sockets import listen_tcp


def test_unresolvable_host_reads_like_qemu() -> None:
    # qsd 7.2: "address resolution failed for nosuchhost.invalid:10809: Name or service
    # not known" (gai_strerror alone, no "[Errno -2]").
    with pytest.raises(socket.gaierror) as resolver:
        socket.getaddrinfo("nosuchhost.invalid", 10809, type=socket.SOCK_STREAM)
    with pytest.raises(ConfigError) as failed:
        listen_tcp("nosuchhost.invalid", 10809)
    expected = f"address resolution failed for nosuchhost.invalid:10809: {resolver.value.strerror}"
    assert str(failed.value) == expected
    assert "[Errno" not in expected


def test_listens_on_an_ephemeral_port() -> None:
    socks = listen_tcp("127.0.0.1", 0)
    try:
        assert [s.family for s in socks] == [socket.AF_INET]
        assert socks[0].getsockname()[1] > 0
    finally:
        for sock in socks:
            sock.close()
