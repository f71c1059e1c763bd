"""The client's handshake against a scripted server: fallbacks for old servers, refusals
turned into clear ImageErrors, and broken greetings into ProtocolErrors."""

from __future__ import annotations

import errno
import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyfleece.errors import BlockError, ImageError, ProtocolError
from pyfleece.nbd import proto
from pyfleece.nbd.client import NbdClient, list_exports, list_meta_contexts
from pyfleece.nbd.proto import Opt, Rep
from tests.unit.nbd_fake_server import FakeServer, Make


@pytest.fixture
def make(tmp_path: Path) -> Iterator[Make]:
    servers: list[FakeServer] = []

    def factory(**kwargs: object) -> FakeServer:
        server = FakeServer(tmp_path, **kwargs)  # type: ignore[arg-type]
        servers.append(server)
        return server

    yield factory
    for server in servers:
        server.close()
        assert not server.errors, server.errors


def test_go_with_block_sizes_and_contexts(make: Make) -> None:
    server = make(block_size=(512, 4096, 1 << 20))
    with NbdClient.connect(server.uri("x"), timeout=10) as client:
        assert (client.size, client.info.name, client.info.structured) == (1 << 20, "disk", True)
        assert (client.info.min_block, client.info.max_payload) == (512, 1 << 20)
        assert client.contexts == {"base:allocation": 7}
    assert server.options == [Opt.STRUCTURED_REPLY, Opt.SET_META_CONTEXT, Opt.GO]


def test_falls_back_to_export_name_without_go(make: Make) -> None:
    server = make(go=False)
    server.disk[:5] = b"hello"
    with NbdClient.connect(server.uri(), timeout=10) as client:
        assert client.size == 1 << 20 and client.info.structured
        assert client.read(0, 5) == b"hello"
    assert server.options[-2:] == [Opt.GO, Opt.EXPORT_NAME]


def test_without_structured_replies(make: Make) -> None:
    server = make(structured=False)
    server.disk[:5] = b"hello"
    with NbdClient.connect(server.uri(), timeout=10) as client:
        assert not client.info.structured and client.contexts == {}
        assert client.read(0, 5) == b"hello"
        with pytest.raises(BlockError) as info:
            list(client.block_status())
        assert info.value.errno == errno.ENOTSUP
    assert Opt.SET_META_CONTEXT not in server.options


def test_server_without_the_asked_context(make: Make) -> None:
    server = make(contexts={})
    with NbdClient.connect(server.uri(), timeout=10) as client:
        assert client.info.structured and client.contexts == {}


@pytest.mark.parametrize(
    ("rep", "message", "expected"),
    [
        (Rep.ERR_UNKNOWN, "no such export", "refused export 'nope' (NBD_REP_ERR_UNKNOWN: no such"),
        (Rep.ERR_TLS_REQD, "", "requires TLS; use an nbds://"),
        (Rep.ERR_SHUTDOWN, "", "NBD_REP_ERR_SHUTDOWN"),
        (Rep.ERR_POLICY, "go away", "NBD_REP_ERR_POLICY: go away"),
    ],
    ids=["unknown", "tls-required", "shutdown", "policy"],
)
def test_go_refused(make: Make, rep: Rep, message: str, expected: str) -> None:
    server = make(go_error=(rep, message))
    with pytest.raises(ImageError) as info:
        NbdClient.connect(server.uri("nope"), timeout=10)
    assert expected in str(info.value)


@pytest.mark.parametrize(
    ("greeting", "error", "message"),
    [
        (b"HTTP/1.1 400 Bad Request\r\n\r\n", ProtocolError, "is not an NBD server"),
        (struct.pack(">QQ", proto.NBDMAGIC, 0x00420281861253), ImageError, "oldstyle"),
        (struct.pack(">QQ", proto.NBDMAGIC, 0x1234), ProtocolError, "bad handshake magic"),
        (b"NBDM", ProtocolError, "closed the connection"),
    ],
    ids=["garbage", "oldstyle", "bad-second-magic", "truncated"],
)
def test_bad_greetings(make: Make, greeting: bytes, error: type, message: str) -> None:
    server = make(greeting=greeting)
    with pytest.raises(error, match=message):
        NbdClient.connect(server.uri(), timeout=10)


@pytest.mark.parametrize("sizes", [(3, 4096, 65536), (512, 1000, 65536), (4096, 4096, 512)])
def test_invalid_block_sizes(make: Make, sizes: tuple[int, int, int]) -> None:
    server = make(block_size=sizes)
    with pytest.raises(ProtocolError, match="bad"):
        NbdClient.connect(server.uri(), timeout=10)


def test_list_exports_and_contexts(make: Make) -> None:
    server = make(contexts={"base:allocation": 1, "qemu:allocation-depth": 2})
    assert list_exports(server.uri()) == [("disk", "the disk"), ("other", "")]
    # the scripted server answers LIST_META_CONTEXT with ERR_UNSUP: no contexts, no error
    assert list_meta_contexts(server.uri()) == []
    assert server.options.count(Opt.ABORT) == 2  # each query ends politely


def test_unreachable_servers(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match=r"Failed to connect to .*No such file"):
        NbdClient.connect(f"nbd+unix:///?socket={tmp_path}/missing.sock", timeout=5)
    with socket.socket() as placeholder:  # a port nobody listens on
        placeholder.bind(("127.0.0.1", 0))
        port = placeholder.getsockname()[1]
        with pytest.raises(ImageError, match=f"127.0.0.1:{port}: Connection refused"):
            NbdClient.connect(f"nbd://127.0.0.1:{port}/", timeout=5)


def test_silent_server_times_out(tmp_path: Path) -> None:
    path = str(tmp_path / "silent.sock")
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(path)
        listener.listen(1)
        accepted = threading.Event()

        def accept() -> None:
            conn, _ = listener.accept()
            accepted.set()
            conn.recv(1)  # until the client gives up
            conn.close()

        thread = threading.Thread(target=accept, daemon=True)
        thread.start()
        with pytest.raises(ImageError, match="timed out"):
            NbdClient.connect(f"nbd+unix:///?socket={path}", timeout=0.3)
        thread.join(10)
        assert accepted.is_set()
