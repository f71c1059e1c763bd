"""Hostile replies, generated: whatever bytes a server sends, the client's reply reader
either applies them within the requests' bounds or raises ProtocolError; it never writes
outside a read's buffer, never completes a request twice, and never fails another way."""

from __future__ import annotations

import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyfleece.errors import BlockError, ProtocolError
from pyfleece.nbd import proto
from pyfleece.nbd.client_replies import Command, Receiver, ReplyReader
from pyfleece.nbd.proto import Cmd

READ_OFFSET, READ_LENGTH = 4096, 8192


class BytesTransport:
    """Hands out a byte string in pieces of the given sizes, then the end of the stream."""

    tls = False

    def __init__(self, data: bytes, cuts: list[int]) -> None:
        self.data = data
        self.pos = 0
        self.cuts = cuts or [len(data) or 1]

    def recv_into(self, view: memoryview, *, wait_all: bool = False) -> int:
        want = len(view) if wait_all else min(len(view), self.cuts[self.pos % len(self.cuts)])
        n = min(want, len(self.data) - self.pos)
        view[:n] = self.data[self.pos : self.pos + n]
        self.pos += n
        return n


# mostly plausible values, so that streams get past their first message
cookies = st.sampled_from([1, 1, 1, 2, 2, 3, 4, 0xDEAD])
offsets = st.one_of(
    st.sampled_from([READ_OFFSET, READ_OFFSET + 512, READ_OFFSET + 4096]),
    st.integers(READ_OFFSET - 16, READ_OFFSET + READ_LENGTH + 16),
    st.integers(0, 2**64 - 1),
)
small = st.one_of(st.sampled_from([512, 4096]), st.integers(0, 9000))
head = proto.chunk_header


@st.composite
def message(draw: st.DrawFn) -> bytes:
    kinds = ["simple", "data", "data", "hole", "hole", "status", "error", "none", "noise"]
    kind = draw(st.sampled_from(kinds))
    cookie = draw(cookies)
    flags = draw(st.sampled_from([0, 0, 1, 1, 0xFFFF]))
    if kind == "simple":
        return proto.simple_reply(cookie, draw(st.sampled_from([0, 0, 5, 22, 108, 9999])))
    if kind == "data":
        body = draw(st.binary(min_size=1, max_size=64)) * draw(st.sampled_from([1, 8, 64, 200]))
        payload = struct.pack(">Q", draw(offsets)) + body
        return head(flags, proto.ReplyType.OFFSET_DATA, cookie, len(payload)) + payload
    if kind == "hole":
        payload = proto.CHUNK_HOLE.pack(draw(offsets), draw(small))
        return proto.chunk_header(flags, proto.ReplyType.OFFSET_HOLE, cookie, 12) + payload
    if kind == "status":
        extents = draw(st.lists(st.tuples(small, st.integers(0, 3)), max_size=5))
        body = proto.CHUNK_STATUS_ID.pack(draw(st.sampled_from([7, 8])))
        body += b"".join(proto.EXTENT.pack(n, f) for n, f in extents)
        return proto.chunk_header(flags, proto.ReplyType.BLOCK_STATUS, cookie, len(body)) + body
    if kind == "error":
        text = draw(st.binary(max_size=20))
        kind_code = draw(st.sampled_from([0x8001, 0x8002, 0x8077]))
        payload = proto.CHUNK_ERROR.pack(draw(st.integers(0, 200)), draw(st.integers(0, 40)))
        payload += text + draw(st.binary(max_size=8))
        return proto.chunk_header(flags, kind_code, cookie, len(payload)) + payload
    if kind == "none":
        return head(flags, proto.ReplyType.NONE, cookie, draw(st.sampled_from([0, 4])))
    return draw(st.binary(min_size=1, max_size=40))


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    messages=st.lists(message(), max_size=8),
    cuts=st.lists(st.integers(1, 64), max_size=4),
    structured=st.sampled_from([True, True, True, False]),
)
def test_reply_reader_survives_any_reply_stream(
    messages: list[bytes], cuts: list[int], structured: bool
) -> None:
    guard = b"\xa5" * 64
    backing = bytearray(guard + bytes(READ_LENGTH) + guard)
    buf = memoryview(backing)[64 : 64 + READ_LENGTH]
    commands = {
        1: Command(Cmd.READ, READ_OFFSET, READ_LENGTH, buf),
        2: Command(Cmd.BLOCK_STATUS, 0, 1 << 20, None),
        3: Command(Cmd.FLUSH, 0, 0, None),
        4: Command(Cmd.WRITE, 0, 512, None),
    }
    rx = Receiver(BytesTransport(b"".join(messages), cuts))  # type: ignore[arg-type]
    reader = ReplyReader(rx, "fuzz", structured, {7: "base:allocation"}, dict(commands))
    finished: list[int] = []
    try:
        for _ in range(len(messages) + 1):
            ended = reader.next_reply()
            if ended is None:
                continue
            cookie, error = ended
            assert error is None or isinstance(error, BlockError)
            assert cookie not in finished
            finished.append(cookie)
            reader.lookup.pop(cookie)
    except (ProtocolError, EOFError):
        pass
    assert backing[:64] == guard and backing[-64:] == guard
