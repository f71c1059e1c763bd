"""NBD transmission over a raw socket: data, errors as the spec's SHOULDs say, ordering.

Nodes: a raw file (host-mapped: the preadv and sendfile paths), a memory node (buffered
path), and the fault filter to fail or hold requests.
"""

from __future__ import annotations

import errno
import logging
import os
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyfleece.block.fault import FaultNode, Rule
from pyfleece.block.image import open_image
from pyfleece.block.memory import MemoryNode
from pyfleece.block.node import HostMapping, Node
from pyfleece.nbd import proto
from pyfleece.nbd.proto import Cmd, CmdFlag, Err, ReplyType
from pyfleece.nbd.server import NbdServer
from tests.nbdtest import RawClient, pattern, served, wait_for

pytestmark = pytest.mark.timeout(60)

SIZE = 4 << 20
MiB = 1 << 20


@pytest.fixture
def raw_file(tmp_path: Path) -> Path:
    """4 MiB: pattern in [0, 1 MiB) and [2 MiB, 2 MiB + 64 KiB), holes elsewhere."""
    path = tmp_path / "disk.raw"
    with open(path, "wb") as f:
        f.truncate(SIZE)
        f.write(pattern(0, MiB))
        f.seek(2 * MiB)
        f.write(pattern(2 * MiB, 64 << 10))
    return path


@pytest.fixture(params=["file", "memory"])
def node(request: pytest.FixtureRequest, raw_file: Path) -> Iterator[Node]:
    if request.param == "file":
        n = open_image(str(raw_file), "raw", read_only=False)
    else:
        n = MemoryNode("mem", SIZE)
        n.write(0, pattern(0, MiB))
        n.write(2 * MiB, pattern(2 * MiB, 64 << 10))
    yield n
    n.close()


@pytest.fixture
def server(node: Node) -> Iterator[tuple[NbdServer, str]]:
    with served(node) as (srv, path):
        srv.add_export(node, "ro", writable=False, export_id="ro")
        yield srv, path


def connect(server: tuple[NbdServer, str], name: str = "disk", **kwargs: object) -> RawClient:
    c = RawClient.connect(server[1])
    c.handshake(name, **kwargs)
    return c


@pytest.mark.parametrize("structured", [True, False], ids=["structured", "simple"])
@pytest.mark.parametrize(
    ("offset", "length"),
    [(0, 512), (1000, 3000), (4096, 64 << 10), (MiB - 100, 200), (0, 3 * MiB)],
    ids=["small", "unaligned", "sendfile-size", "data-to-hole", "large-with-holes"],
)
def test_read(server: tuple[NbdServer, str], structured: bool, offset: int, length: int) -> None:
    c = connect(server, structured=structured)
    reply = c.call(Cmd.READ, offset, length)
    assert reply.error == 0
    expected = bytearray(length)
    for start, n in ((0, MiB), (2 * MiB, 64 << 10)):
        lo, hi = max(offset, start), min(offset + length, start + n)
        if lo < hi:
            expected[lo - offset : hi - offset] = pattern(lo, hi - lo)
    assert reply.data(offset, length) == bytes(expected)


def test_large_structured_read_sends_holes(server: tuple[NbdServer, str]) -> None:
    c = connect(server)
    reply = c.call(Cmd.READ, 0, 3 * MiB)
    kinds = [ch.kind for ch in reply.chunks]
    assert ReplyType.OFFSET_HOLE in kinds and ReplyType.OFFSET_DATA in kinds
    assert reply.chunks[-1].done


def test_df_read_is_one_data_chunk(server: tuple[NbdServer, str]) -> None:
    c = connect(server)
    reply = c.call(Cmd.READ, MiB - 4096, MiB, flags=CmdFlag.DF)
    contents = [ch for ch in reply.chunks if ch.kind in (ReplyType.OFFSET_DATA, 2)]
    assert [ch.kind for ch in contents] == [ReplyType.OFFSET_DATA]
    assert reply.data(MiB - 4096, MiB) == pattern(MiB - 4096, 4096) + bytes(MiB - 4096)


@pytest.mark.parametrize("fua", [0, CmdFlag.FUA], ids=["plain", "fua"])
def test_write_then_read(server: tuple[NbdServer, str], fua: int) -> None:
    c = connect(server)
    data = os.urandom(10_000)
    assert c.call(Cmd.WRITE, 12345, len(data), payload=data, flags=fua).error == 0
    assert c.call(Cmd.READ, 12345, len(data)).data(12345, len(data)) == data


def test_pipelined_requests_all_answered(server: tuple[NbdServer, str]) -> None:
    c = connect(server)
    cookies = {}
    for i in range(200):
        if i % 3 == 0:
            cookies[c.request(Cmd.WRITE, i * 4096, 4096, payload=bytes([i % 251]) * 4096)] = i
        else:
            cookies[c.request(Cmd.READ, i * 512, 512)] = i
    replies = c.replies(len(cookies))
    assert set(replies) == set(cookies)
    assert all(r.error == 0 for r in replies.values())


@pytest.mark.parametrize(
    ("kind", "offset", "length", "flags", "error"),
    [
        (Cmd.READ, SIZE - 10, 20, 0, Err.EINVAL),
        (Cmd.READ, 1 << 62, 1, 0, Err.EINVAL),
        (Cmd.READ, 0, (32 << 20) + 1, 0, Err.EINVAL),
        (Cmd.TRIM, SIZE, 1, 0, Err.EINVAL),
        (Cmd.CACHE, SIZE - 1, 2, 0, Err.EINVAL),
        (Cmd.BLOCK_STATUS, SIZE, 4096, 0, Err.EINVAL),
        (Cmd.BLOCK_STATUS, 0, 0, 0, Err.EINVAL),
        (Cmd.WRITE_ZEROES, SIZE - 4096, 8192, 0, Err.ENOSPC),
        (Cmd.READ, 0, 512, 1 << 7, Err.EINVAL),
        (Cmd.READ, 0, 512, CmdFlag.REQ_ONE, Err.EINVAL),
        (Cmd.FLUSH, 0, 0, CmdFlag.NO_HOLE, Err.EINVAL),
        (Cmd.WRITE_ZEROES, 0, 512, CmdFlag.DF, Err.EINVAL),
        (Cmd.BLOCK_STATUS, 0, 512, CmdFlag.FAST_ZERO, Err.EINVAL),
        (Cmd.RESIZE, 0, 0, 0, Err.EINVAL),
        (200, 0, 0, 0, Err.EINVAL),
    ],
    ids=[
        "read-past-end",
        "read-far-past-end",
        "read-over-32MiB",
        "trim-past-end",
        "cache-past-end",
        "status-past-end",
        "status-empty",
        "zeroes-past-end",
        "read-unknown-flag",
        "read-req-one",
        "flush-no-hole",
        "zeroes-df",
        "status-fast-zero",
        "resize",
        "unknown-command",
    ],
)
def test_bad_requests_get_errors_and_the_connection_stays(
    server: tuple[NbdServer, str], kind: int, offset: int, length: int, flags: int, error: int
) -> None:
    c = connect(server, contexts=("base:allocation",))
    assert c.call(kind, offset, length, flags=flags).error == error
    assert c.call(Cmd.READ, 0, 8).data(0, 8) == pattern(0, 8)


def test_df_without_structured_replies_is_invalid(server: tuple[NbdServer, str]) -> None:
    c = connect(server, structured=False)
    assert c.call(Cmd.READ, 0, 512, flags=CmdFlag.DF).error == Err.EINVAL
    assert c.call(Cmd.READ, 0, 8).chunks[0].payload == pattern(0, 8)


@pytest.mark.parametrize(
    ("name", "offset", "length", "error"),
    [
        ("disk", SIZE - 100, 4096, Err.ENOSPC),
        ("ro", 0, 4096, Err.EPERM),
        ("disk", 0, (32 << 20) + 4096, Err.EINVAL),
    ],
    ids=["past-end", "read-only", "over-32MiB"],
)
def test_refused_write_drains_its_payload(
    server: tuple[NbdServer, str], name: str, offset: int, length: int, error: int
) -> None:
    c = connect(server, name)
    payload = b"\xee" * length
    assert c.call(Cmd.WRITE, offset, length, payload=payload).error == error
    assert c.call(Cmd.READ, 0, 8).data(0, 8) == pattern(0, 8)


def test_write_beyond_the_drain_cap_disconnects_only_that_client(
    server: tuple[NbdServer, str],
) -> None:
    other = connect(server)
    c = connect(server)
    c.request(Cmd.WRITE, 0, 0xFFFFFF00)
    assert c.closed_by_server()
    assert other.call(Cmd.READ, 0, 8).data(0, 8) == pattern(0, 8)


@pytest.mark.parametrize("kind", [Cmd.TRIM, Cmd.WRITE_ZEROES, Cmd.WRITE], ids=["trim", "zero", "w"])
def test_writing_commands_on_read_only_export_are_eperm(
    server: tuple[NbdServer, str], kind: int
) -> None:
    c = connect(server, "ro")
    payload = bytes(512) if kind == Cmd.WRITE else b""
    assert c.call(kind, 0, 512, payload=payload).error == Err.EPERM
    assert c.call(Cmd.READ, 0, 8).data(0, 8) == pattern(0, 8)


@pytest.mark.parametrize("structured", [True, False], ids=["structured", "simple"])
def test_zero_length_requests_never_disconnect(
    server: tuple[NbdServer, str], structured: bool
) -> None:
    c = connect(server, structured=structured)
    for kind in (Cmd.READ, Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES, Cmd.CACHE, Cmd.FLUSH):
        assert c.call(kind, 4096, 0).error == 0, kind
    assert c.call(Cmd.READ, SIZE, 0).error == 0
    assert c.call(Cmd.READ, 0, 8).data(0, 8) == pattern(0, 8)


def test_bad_magic_disconnects_only_that_client(server: tuple[NbdServer, str]) -> None:
    other = connect(server)
    c = connect(server)
    c.send(struct.pack(">IHHQQI", 0xDEADBEEF, 0, 0, 1, 0, 512))
    assert c.closed_by_server()
    assert other.call(Cmd.READ, 0, 8).data(0, 8) == pattern(0, 8)


def test_trim_and_write_zeroes_read_back_zeros(server: tuple[NbdServer, str]) -> None:
    c = connect(server)
    assert c.call(Cmd.WRITE_ZEROES, 4096, 8192).error == 0
    assert c.call(Cmd.WRITE_ZEROES, 65536, 4096, flags=CmdFlag.NO_HOLE | CmdFlag.FUA).error == 0
    assert c.call(Cmd.TRIM, 3 * MiB, 4096, flags=CmdFlag.FUA).error == 0
    assert c.call(Cmd.READ, 4096, 8192).data(4096, 8192) == bytes(8192)
    assert c.call(Cmd.READ, 65536, 4096).data(65536, 4096) == bytes(4096)
    assert c.call(Cmd.READ, 0, 4096).data(0, 4096) == pattern(0, 4096)


def test_cache_and_flush_succeed(server: tuple[NbdServer, str]) -> None:
    c = connect(server)
    assert c.call(Cmd.CACHE, 0, MiB).error == 0
    assert c.call(Cmd.FLUSH).error == 0
    assert c.call(Cmd.FLUSH, flags=CmdFlag.FUA).error == 0


def _extents(chunk_payload: bytes) -> tuple[int, list[tuple[int, int]]]:
    (ident,) = struct.unpack_from(">I", chunk_payload)
    body = chunk_payload[4:]
    return ident, [struct.unpack_from(">II", body, i) for i in range(0, len(body), 8)]


def test_block_status_both_contexts(server: tuple[NbdServer, str]) -> None:
    c = connect(server, contexts=("base:allocation", "qemu:allocation-depth"))
    reply = c.call(Cmd.BLOCK_STATUS, 0, SIZE)
    assert reply.error == 0 and len(reply.chunks) == 2 and reply.chunks[-1].done
    by_id = dict(_extents(ch.payload) for ch in reply.chunks)
    extents = sorted(by_id.values(), key=len)
    depth, alloc = extents[0], extents[1]
    assert depth == [(SIZE, 1)]
    assert alloc[0] == (MiB, 0)
    assert (MiB, 3) in alloc and sum(n for n, _ in alloc) == SIZE


def test_block_status_req_one_is_one_extent_within_length(server: tuple[NbdServer, str]) -> None:
    c = connect(server, contexts=("base:allocation",))
    reply = c.call(Cmd.BLOCK_STATUS, 4096, 100, flags=CmdFlag.REQ_ONE)
    _, extents = _extents(reply.chunks[0].payload)
    assert extents == [(100, 0)]


def test_block_status_without_contexts_is_invalid(server: tuple[NbdServer, str]) -> None:
    c = connect(server)
    assert c.call(Cmd.BLOCK_STATUS, 0, 4096).error == Err.EINVAL


# -- nodes that fail or hold requests ---------------------------------------------------------


class SlowZeroNode(MemoryNode):
    def can_fast_zero(self) -> bool:
        return False


@pytest.fixture
def fault() -> Iterator[FaultNode]:
    image = SlowZeroNode("img", SIZE)
    image.write(0, pattern(0, MiB))
    node = FaultNode("fault", image, owned=True, rules=[])
    yield node
    node.close()


@pytest.fixture
def fault_server(fault: FaultNode) -> Iterator[tuple[NbdServer, str]]:
    with served(fault) as srv:
        yield srv


@pytest.mark.parametrize(
    ("op", "kind", "err", "wire"),
    [
        ("read", Cmd.READ, errno.EIO, Err.EIO),
        ("read", Cmd.READ, errno.ENOENT, Err.EIO),
        ("write", Cmd.WRITE, errno.ENOSPC, Err.ENOSPC),
        ("write", Cmd.WRITE, errno.EDQUOT, Err.ENOSPC),
        ("write-zeroes", Cmd.WRITE_ZEROES, errno.EROFS, Err.EPERM),
        ("discard", Cmd.TRIM, errno.EIO, Err.EIO),
        ("flush", Cmd.FLUSH, errno.EIO, Err.EIO),
    ],
)
def test_node_errors_map_to_wire_errnos(
    fault: FaultNode, fault_server: tuple[NbdServer, str], op: str, kind: int, err: int, wire: int
) -> None:
    fault.add_rule(Rule(op=op, errno=err))
    c = connect(fault_server)
    payload = bytes(4096) if kind == Cmd.WRITE else b""
    length = 0 if kind == Cmd.FLUSH else 4096
    assert c.call(kind, 0, length, payload=payload).error == wire
    assert c.call(Cmd.READ, 0, 8).data(0, 8) == pattern(0, 8)


def test_fast_zero_fails_fast_when_it_would_be_slow(fault_server: tuple[NbdServer, str]) -> None:
    c = connect(fault_server)
    assert c.call(Cmd.WRITE_ZEROES, 0, 4096, flags=CmdFlag.FAST_ZERO).error == Err.ENOTSUP
    assert c.call(Cmd.READ, 0, 8).data(0, 8) == pattern(0, 8)
    assert c.call(Cmd.WRITE_ZEROES, 0, 4096).error == 0


def test_replies_come_out_of_order(fault: FaultNode, fault_server: tuple[NbdServer, str]) -> None:
    hold = threading.Event()
    rule = fault.add_rule(Rule(op="flush", pause=hold))
    c = connect(fault_server)
    flush = c.request(Cmd.FLUSH)
    assert rule.reached.wait(10)
    read = c.request(Cmd.READ, 0, 4096)
    first = c.chunk()
    assert first.cookie == read
    hold.set()
    assert c.replies(1)[flush].error == 0


def test_large_unmapped_read_is_served_by_a_worker(
    fault: FaultNode, fault_server: tuple[NbdServer, str]
) -> None:
    hold = threading.Event()
    rule = fault.add_rule(Rule(op="read", length=1, pause=hold))
    c = connect(fault_server)
    big = c.request(Cmd.READ, 0, 2 * MiB)
    assert rule.reached.wait(10)
    small = c.request(Cmd.READ, 3 * MiB, 512)
    assert c.chunk().cookie == small
    hold.set()
    assert c.replies(1)[big].data(0, 2 * MiB)[:MiB] == pattern(0, MiB)


def test_disc_finishes_requests_in_flight(
    fault: FaultNode, fault_server: tuple[NbdServer, str]
) -> None:
    hold = threading.Event()
    rule = fault.add_rule(Rule(op="flush", pause=hold))
    c = connect(fault_server)
    flush = c.request(Cmd.FLUSH)
    assert rule.reached.wait(10)
    c.request(Cmd.DISC)
    hold.set()
    assert c.replies(1)[flush].error == 0
    assert c.closed_by_server()


def test_client_vanishing_mid_request_is_cleaned_up_quietly(
    fault_server: tuple[NbdServer, str], caplog: pytest.LogCaptureFixture
) -> None:
    srv, _ = fault_server
    caplog.set_level(logging.DEBUG, logger="pyfleece")
    message = proto.encode_request(0, Cmd.WRITE, 1, 0, 65536) + bytes(100)
    for cut in (10, len(message)):  # mid-header, mid-payload
        c = connect(fault_server)
        c.send(message[:cut])
        c.close()
    wait_for(lambda: not srv.sessions(), "the sessions to end")
    assert connect(fault_server).call(Cmd.READ, 0, 8).data(0, 8) == pattern(0, 8)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


class BrokenMapNode(MemoryNode):
    """Maps its data to a host fd that sendfile cannot read: a disk error mid-reply."""

    def __init__(self, size: int, fd: int) -> None:
        super().__init__("broken", size)
        self._fd = fd

    def _host_map(self, offset: int, length: int) -> HostMapping | None:
        return HostMapping(self._fd, offset, length)


@pytest.fixture
def broken_server() -> Iterator[tuple[NbdServer, str]]:
    fd = os.open("/", os.O_RDONLY)  # sendfile from a directory fails with EINVAL
    node = BrokenMapNode(SIZE, fd)
    try:
        with served(node) as srv:
            yield srv
    finally:
        os.close(fd)


def test_disk_error_during_sendfile_completes_the_chunk_then_reports(
    broken_server: tuple[NbdServer, str],
) -> None:
    c = connect(broken_server)
    reply = c.call(Cmd.READ, 65536, 131072, flags=CmdFlag.DF)
    data, error = reply.chunks[0], reply.chunks[-1]
    assert data.kind == ReplyType.OFFSET_DATA and not data.done
    assert len(data.payload) == 8 + 131072  # padded to its announced length
    assert error.kind == ReplyType.ERROR_OFFSET and error.done
    err, msg_len = struct.unpack_from(">IH", error.payload)
    assert err == Err.EINVAL
    assert struct.unpack_from(">Q", error.payload, 6 + msg_len)[0] == 65536
    assert c.call(Cmd.READ, 0, 8).error == Err.EIO  # preadv: EISDIR, mapped to EIO
    assert c.call(Cmd.FLUSH).error == 0  # and the connection goes on


def test_disk_error_during_sendfile_with_simple_replies_disconnects(
    broken_server: tuple[NbdServer, str],
) -> None:
    c = connect(broken_server, structured=False)
    c.request(Cmd.READ, 0, 131072)
    header = c.recv_exact(16)
    assert struct.unpack(">IIQ", header)[1] == 0  # the header already promised data
    assert c.closed_by_server()
