"""Fuzzing the NBD server's handshake and request parser (hypothesis, bounded time).

Invariant: whatever bytes a client sends, the server answers or hangs up on that client
alone, never logs an internal error, and goes on serving a well-behaved client.
"""

from __future__ import annotations

import logging
import selectors
import socket
import struct
import time
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyfleece.block.memory import MemoryNode
from pyfleece.nbd import proto
from pyfleece.nbd.handshake import HandshakeLimits
from pyfleece.nbd.proto import Cmd, Opt
from tests.nbdtest import RawClient, pattern, served

pytestmark = pytest.mark.timeout(120)

SIZE = 1 << 20


class Internal(logging.Handler):
    """Collects what the server logs as an internal error (anything with a traceback)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info or record.levelno >= logging.ERROR:
            self.records.append(record)


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, Internal]]:
    handler = Internal()
    logger = logging.getLogger("pyfleece.nbd")
    logger.addHandler(handler)
    node = MemoryNode("m", SIZE)
    node.write(0, pattern(0, SIZE))
    limits = HandshakeLimits(max_options=64)
    options = {"handshake_timeout": 2.0, "limits": limits}
    try:
        with served(node, "", server=options) as (srv, path):
            ro = MemoryNode("ro", 4096)
            ro.write(0, pattern(0, 4096))
            ro.read_only = True
            srv.add_export(ro, "ro", writable=False)
            yield path, handler
    finally:
        logger.removeHandler(handler)


def exchange(path: str, data: bytes, timeout: float = 10.0) -> None:
    """Sends ``data`` while draining replies, half-closes, and waits for the server to hang
    up. A server that never hangs up fails the example."""
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(path)
    sock.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE)
    view = memoryview(data)
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            assert left > 0, "the server neither answered nor hung up"
            for _, mask in sel.select(left):
                if mask & selectors.EVENT_READ:
                    try:
                        if not sock.recv(1 << 16):
                            return
                    except ConnectionResetError:
                        return
                if mask & selectors.EVENT_WRITE:
                    try:
                        view = view[sock.send(view[: 1 << 16]) :]
                    except (BrokenPipeError, ConnectionResetError):
                        view = view[:0]
                    if not view:
                        sock.shutdown(socket.SHUT_WR)
                        sel.modify(sock, selectors.EVENT_READ)
    finally:
        sel.close()
        sock.close()


def healthy(path: str) -> None:
    c = RawClient.connect(path)
    c.handshake("ro")
    assert c.call(Cmd.READ, 8, 16).data(8, 16) == pattern(8, 16)
    c.close()


u32 = st.integers(0, 0xFFFFFFFF)
names = st.sampled_from(["", "ro", "nope", "\u00e9", "x" * 5000])
queries = st.lists(
    st.sampled_from(["base:", "base:allocation", "qemu:", "qemu:allocation-depth", "x", ""]),
    max_size=4,
)


@st.composite
def option(draw: st.DrawFn) -> bytes:
    opt = draw(st.one_of(st.sampled_from(list(Opt)), u32))
    body = draw(
        st.one_of(
            st.builds(proto.encode_go, names, st.lists(st.integers(0, 0xFFFF), max_size=5)),
            st.builds(proto.encode_meta, names, queries),
            st.binary(max_size=64),
        )
    )
    length = draw(st.one_of(st.just(len(body)), u32, st.integers(0, len(body) + 8)))
    magic = draw(st.sampled_from([proto.IHAVEOPT] * 9 + [0x0102030405060708]))
    return proto.OPTION_HEADER.pack(magic, opt, length) + body


@st.composite
def handshake(draw: st.DrawFn) -> bytes:
    flags = draw(st.one_of(st.sampled_from([0, 1, 3]), u32))
    opts = draw(st.lists(option(), max_size=8))
    tail = draw(st.binary(max_size=32))
    return struct.pack(">I", flags) + b"".join(opts) + tail


@settings(
    max_examples=600,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(data=handshake())
def test_fuzz_handshake(server: tuple[str, Internal], data: bytes) -> None:
    path, internal = server
    exchange(path, data)
    assert internal.records == []
    healthy(path)


@st.composite
def request(draw: st.DrawFn) -> bytes:
    kind = draw(st.one_of(st.sampled_from(list(Cmd)), st.integers(0, 0xFFFF)))
    flags = draw(st.one_of(st.sampled_from([0, 1, 2, 4, 8, 16, 0x1F]), st.integers(0, 0xFFFF)))
    offset = draw(st.sampled_from([0, 1, 4096, SIZE - 512, SIZE, 1 << 63, (1 << 64) - 1]))
    length = draw(st.sampled_from([0, 1, 512, 4096, 65536, SIZE, (32 << 20) + 1, 0xFFFFFFFF]))
    magic = draw(st.sampled_from([proto.REQUEST_MAGIC] * 19 + [0x25609514]))
    header = struct.pack(">IHHQQI", magic, flags, kind, draw(u32), offset, length)
    payload = b""
    if kind == Cmd.WRITE:
        payload = b"\xa5" * min(length, draw(st.integers(0, 8192)))
    return header + payload


@st.composite
def transmission(draw: st.DrawFn) -> tuple[bytes, bytes]:
    structured = draw(st.booleans())
    contexts = draw(queries) if structured else []
    name = draw(st.sampled_from(["", "ro"]))
    prologue = struct.pack(">I", 3)
    if structured:
        prologue += proto.OPTION_HEADER.pack(proto.IHAVEOPT, Opt.STRUCTURED_REPLY, 0)
        meta = proto.encode_meta(name, contexts)
        prologue += proto.OPTION_HEADER.pack(proto.IHAVEOPT, Opt.SET_META_CONTEXT, len(meta))
        prologue += meta
    go = proto.encode_go(name, [])
    prologue += proto.OPTION_HEADER.pack(proto.IHAVEOPT, Opt.GO, len(go)) + go
    return prologue, b"".join(draw(st.lists(request(), min_size=1, max_size=12)))


@settings(
    max_examples=600,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(case=transmission())
def test_fuzz_requests(server: tuple[str, Internal], case: tuple[bytes, bytes]) -> None:
    path, internal = server
    exchange(path, case[0] + case[1])
    assert internal.records == []
    healthy(path)
