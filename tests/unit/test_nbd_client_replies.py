"""The client's transmission phase against a scripted server: structured replies are
reassembled, error replies become BlockError with the connection kept, and every protocol
violation becomes ProtocolError for all requests in flight and after."""

from __future__ import annotations

import errno
import itertools
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pyfleece.errors import BlockError, ProtocolError
from pyfleece.nbd import proto
from pyfleece.nbd.client import NbdClient
from pyfleece.nbd.proto import Cmd, ReplyFlag, ReplyType, TransmitFlag
from tests.unit.nbd_fake_server import (
    DEFAULT_FLAGS,
    FakeServer,
    Make,
    chunk,
    error_payload,
    serve_disk,
)

DONE = ReplyFlag.DONE
Conn = socket.socket
Req = proto.Request


@pytest.fixture
def pattern() -> bytes:
    return bytes(range(256)) * 4096  # 1 MiB


def connect(server: FakeServer, **kwargs: object) -> NbdClient:
    return NbdClient.connect(server.uri(), timeout=10, **kwargs)  # type: ignore[arg-type]


@pytest.fixture
def make(tmp_path: Path) -> Iterator[Make]:
    servers: list[FakeServer] = []

    def factory(handler: object = None, **kwargs: object) -> FakeServer:
        server = FakeServer(tmp_path, handler=handler, **kwargs)  # type: ignore[arg-type]
        servers.append(server)
        return server

    yield factory
    for server in servers:
        server.close()
        assert not server.errors, server.errors


def test_read_reassembles_data_and_holes_in_any_order(make: Make, pattern: bytes) -> None:
    def handler(srv: FakeServer, conn: Conn, req: Req, data: bytes) -> None:
        if req.type != Cmd.READ:
            return serve_disk(srv, conn, req, data)
        mid = req.offset + 8192
        tail = pattern[mid : req.offset + req.length]
        conn.sendall(
            proto.chunk_data_header(req.cookie, mid, len(tail), done=False)
            + tail
            + proto.chunk_hole(req.cookie, req.offset, 4096, done=False)
            + proto.chunk_data_header(req.cookie, req.offset + 4096, 4096, done=False)
            + pattern[req.offset + 4096 : mid]
            + proto.chunk_none(req.cookie)
        )
        return None

    server = make(handler)
    with connect(server) as client:
        got = client.read(65536, 65536)
    assert got == bytes(4096) + pattern[65536 + 4096 : 131072]


def test_error_chunk_keeps_connection(make: Make, pattern: bytes) -> None:
    def handler(srv: FakeServer, conn: Conn, req: Req, data: bytes) -> None:
        if req.type == Cmd.READ and req.offset == 0:
            conn.sendall(
                chunk(DONE, ReplyType.ERROR_OFFSET, req.cookie, error_payload(5, "bad sector", 512))
            )
            return None
        return serve_disk(srv, conn, req, data)

    server = make(handler)
    server.disk[4096:8192] = pattern[:4096]
    with connect(server) as client:
        with pytest.raises(BlockError) as info:
            client.read(0, 4096)
        assert info.value.errno == errno.EIO
        assert "bad sector (at offset 512)" in str(info.value)
        assert client.read(4096, 4096) == pattern[:4096]


@pytest.mark.parametrize(
    ("wire", "host"),
    [(28, errno.ENOSPC), (1, errno.EPERM), (95, errno.ENOTSUP), (9999, errno.EINVAL)],
    ids=["ENOSPC", "EPERM", "ENOTSUP", "unknown-is-EINVAL"],
)
def test_simple_error_replies(make: Make, wire: int, host: int) -> None:
    def handler(srv: FakeServer, conn: Conn, req: Req, data: bytes) -> None:
        if req.type == Cmd.WRITE:
            conn.sendall(proto.simple_reply(req.cookie, wire))
            return None
        return serve_disk(srv, conn, req, data)

    server = make(handler)
    with connect(server) as client:
        with pytest.raises(BlockError) as info:
            client.write(0, b"x" * 512)
        assert info.value.errno == host
        client.flush()


def test_unknown_error_chunk_type_is_an_error_not_a_violation(make: Make) -> None:
    def handler(srv: FakeServer, conn: Conn, req: Req, data: bytes) -> None:
        if req.type == Cmd.FLUSH:
            conn.sendall(chunk(DONE, 0x8077, req.cookie, error_payload(22, "odd")))
            return None
        return serve_disk(srv, conn, req, data)

    server = make(handler)
    with connect(server) as client:
        with pytest.raises(BlockError, match="odd") as info:
            client.flush()
        assert info.value.errno == errno.EINVAL
        assert client.read(0, 10) == bytes(10)


def test_replies_out_of_order(make: Make) -> None:
    held: list[Req] = []
    both = threading.Event()

    def handler(srv: FakeServer, conn: Conn, req: Req, data: bytes) -> None:
        held.append(req)
        if len(held) < 2:
            return None
        both.set()
        for r in reversed(held):  # answer the second first
            body = bytes([r.offset // 4096]) * r.length
            conn.sendall(proto.chunk_data_header(r.cookie, r.offset, r.length, done=True) + body)
        held.clear()
        return None

    server = make(handler)
    with connect(server) as client:
        a = memoryview(bytearray(4096))
        b = memoryview(bytearray(4096))
        first = client.submit_read(4096, a)
        second = client.submit_read(8192, b)
        second.wait(10)
        first.wait(10)
        assert both.is_set()
        assert bytes(a) == b"\x01" * 4096 and bytes(b) == b"\x02" * 4096


def test_many_threads_share_one_connection(make: Make, pattern: bytes) -> None:
    server = make()
    server.disk[:] = pattern
    failures: list[BaseException] = []
    with connect(server) as client:

        def worker(k: int) -> None:
            try:
                for i in range(20):
                    off = ((k * 20 + i) * 4096) % (1 << 20)
                    if client.read(off, 4096) != pattern[off : off + 4096]:
                        raise AssertionError(f"bad data at {off}")
            except BaseException as err:
                failures.append(err)

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    assert not failures
    assert len([r for r in server.requests if r.type == Cmd.READ]) == 160


def test_block_status_extents(make: Make) -> None:
    server = make()
    with connect(server) as client:
        assert client.contexts == {"base:allocation": 7}
        once = client.block_status_once(4096, 8192)
        assert [tuple(e) for e in once["base:allocation"]] == [(4096, 4096, 0), (8192, 4096, 3)]
        walked = list(client.block_status(0, 1 << 20))
    assert walked[0].offset == 0 and sum(e.length for e in walked) == 1 << 20
    assert all(a.offset + a.length == b.offset for a, b in itertools.pairwise(walked))


def test_splits_to_maximum_payload_and_pads_to_minimum_block(make: Make, pattern: bytes) -> None:
    server = make(block_size=(512, 4096, 65536))
    server.disk[:] = pattern
    with connect(server) as client:
        assert client.max_io == 65536
        assert client.read(100, 200_000) == pattern[100:200_100]
        reads = [r for r in server.requests if r.type == Cmd.READ]
        assert all(r.offset % 512 == 0 and r.length % 512 == 0 for r in reads)
        assert max(r.length for r in reads) == 65536
        server.requests.clear()
        client.write(1000, b"\xee" * 100)
        kinds = [(r.type, r.offset, r.length) for r in server.requests]
        assert kinds == [(Cmd.READ, 512, 1024), (Cmd.WRITE, 512, 1024)]
        assert client.read(990, 120) == pattern[990:1000] + b"\xee" * 100 + pattern[1100:1110]


def test_fua_emulated_by_flush_when_not_advertised(make: Make) -> None:
    server = make(flags=DEFAULT_FLAGS & ~TransmitFlag.SEND_FUA)
    with connect(server) as client:
        client.write(0, b"a" * 512, fua=True)
    kinds = [(r.type, r.flags) for r in server.requests]
    assert kinds[:2] == [(Cmd.WRITE, 0), (Cmd.FLUSH, 0)]


def test_strict_mode_refuses_locally(make: Make) -> None:
    flags = (DEFAULT_FLAGS | TransmitFlag.READ_ONLY) & ~TransmitFlag.SEND_TRIM
    server = make(flags=flags)
    with connect(server) as client:
        with pytest.raises(BlockError) as info:
            client.read(1 << 20, 1)
        assert info.value.errno == errno.EINVAL
        with pytest.raises(BlockError) as info:
            client.write(0, b"x")
        assert info.value.errno == errno.EPERM
        assert client.read(0, 0) == b""
    assert [r.type for r in server.requests] == [Cmd.DISC]


def test_eshutdown_makes_the_client_disconnect(make: Make) -> None:
    def handler(srv: FakeServer, conn: Conn, req: Req, data: bytes) -> None:
        conn.sendall(proto.simple_reply(req.cookie, 108))
        return None

    server = make(handler)
    client = connect(server)
    with pytest.raises(BlockError) as info:
        client.flush()
    assert info.value.errno == errno.ESHUTDOWN
    assert server.disconnected.wait(10)
    assert server.requests[-1].type == Cmd.DISC
    with pytest.raises(BlockError):
        client.flush()
    client.close()


# -- protocol violations: the connection is dropped, every caller hears ProtocolError ----

Build = Callable[[Req], bytes]
VIOLATIONS: list[tuple[str, Build, str]] = [
    ("unknown-cookie", lambda r: proto.simple_reply(r.cookie + 1000), "unknown cookie"),
    ("bad-magic", lambda r: b"\x12\x34\x56\x78" + bytes(12), "bad reply magic"),
    (
        "data-outside-request",
        lambda r: proto.chunk_data_header(r.cookie, r.offset + 4096, 16, done=True) + bytes(16),
        "outside the request",
    ),
    (
        "overlapping-chunks",
        lambda r: (
            proto.chunk_hole(r.cookie, r.offset, 4096, done=False)
            + proto.chunk_hole(r.cookie, r.offset + 1024, 1024, done=True)
        ),
        "overlapping read chunks",
    ),
    (
        "success-without-all-data",
        lambda r: proto.chunk_hole(r.cookie, r.offset, 1024, done=True),
        "without covering the whole request",
    ),
    ("unknown-chunk-type", lambda r: chunk(DONE, 77, r.cookie, b""), "unknown reply chunk type 77"),
    (
        "hole-of-wrong-length",
        lambda r: chunk(DONE, ReplyType.OFFSET_HOLE, r.cookie, bytes(8)),
        "OFFSET_HOLE of length 8",
    ),
    (
        "status-for-a-read",
        lambda r: proto.chunk_block_status(r.cookie, 7, [(4096, 0)], done=True),
        "block status chunk in reply to NBD_CMD_READ",
    ),
    (
        "huge-error-chunk",
        lambda r: proto.chunk_header(DONE, ReplyType.ERROR, r.cookie, 0xFFFFFFFF),
        "error chunk of length 4294967295",
    ),
    (
        "error-message-overflow",
        lambda r: chunk(DONE, ReplyType.ERROR, r.cookie, proto.CHUNK_ERROR.pack(5, 100) + b"x"),
        "overflows the chunk",
    ),
    (
        "none-without-done",
        lambda r: proto.chunk_header(0, ReplyType.NONE, r.cookie, 0),
        "NONE with a payload or without DONE",
    ),
    (
        "closed-mid-reply",
        lambda r: proto.chunk_data_header(r.cookie, r.offset, r.length, done=True) + bytes(100),
        "closed the connection in the middle of a reply",
    ),
    ("closed-with-request-in-flight", lambda r: b"", "with 1 request\\(s\\) in flight"),
]


@pytest.mark.parametrize(
    ("build", "message"), [v[1:] for v in VIOLATIONS], ids=[v[0] for v in VIOLATIONS]
)
def test_protocol_violation_drops_the_connection(make: Make, build: Build, message: str) -> None:
    def handler(srv: FakeServer, conn: Conn, req: Req, data: bytes) -> bool:
        conn.sendall(build(req))
        return False  # and hang up

    server = make(handler)
    client = connect(server)
    with pytest.raises(ProtocolError, match=message):
        client.read(0, 4096)
    with pytest.raises(ProtocolError):
        client.read(0, 4096)
    client.close()


def test_violation_fails_every_request_in_flight(make: Make) -> None:
    seen = threading.Event()

    def handler(srv: FakeServer, conn: Conn, req: Req, data: bytes) -> bool | None:
        if req.offset == 0:
            return None  # never answered
        seen.set()
        conn.sendall(proto.simple_reply(0xDEAD))
        return False

    server = make(handler)
    client = connect(server)
    first = client.submit_read(0, memoryview(bytearray(512)))
    client.submit_read(512, memoryview(bytearray(512)))
    with pytest.raises(ProtocolError, match="unknown cookie"):
        first.wait(10)
    assert seen.is_set()
    client.close()


def test_close_gives_up_on_a_server_that_never_answers(make: Make) -> None:
    def handler(srv: FakeServer, conn: Conn, req: Req, data: bytes) -> None:
        return None  # swallows every request

    server = make(handler)
    client = connect(server)
    stuck = client.submit_read(0, memoryview(bytearray(512)))
    client.close(timeout=0.2)
    with pytest.raises(ProtocolError, match="did not answer in time"):
        stuck.wait(10)
