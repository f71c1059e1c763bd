"""Hostile clients against ``pyfleece nbd``: garbage, absurd lengths, option floods,
half-open and abruptly closed connections, hundreds of clients at once. The server must keep
serving a well-behaved client throughout, and its memory must stay bounded."""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyfleece.nbd import proto
from pyfleece.nbd.proto import Cmd, Opt, Rep
from tests.nbdtest import RawClient, nbd_tool, pattern, short_tempdir, wait_for

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def tool() -> Iterator[tuple[str, int]]:
    with short_tempdir() as tmp:
        image = tmp / "disk.raw"
        image.write_bytes(pattern(0, 1 << 20))
        sock = str(tmp / "s")
        args = ["-f", "raw", "-x", "disk", "-k", sock, "-t", "-e", "0", str(image)]
        with nbd_tool(args, tmp / "pid") as proc:
            yield sock, proc.pid


def healthy(sock: str) -> None:
    """A well-behaved client still gets the right data."""
    c = RawClient.connect(sock)
    c.handshake("disk")
    assert c.call(Cmd.READ, 4096, 4096).data(4096, 4096) == pattern(4096, 4096)
    c.request(Cmd.DISC)
    c.close()


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


@pytest.mark.parametrize(
    "payload",
    [
        os.urandom(4096),
        b"\xff" * 4,
        struct.pack(">I", 3) + b"IHAVEOPT" * 100,
        struct.pack(">I", 3) + proto.OPTION_HEADER.pack(proto.IHAVEOPT, Opt.GO, 0xFFFFFFFF),
        struct.pack(">I", 3) + proto.OPTION_HEADER.pack(proto.IHAVEOPT, 0x55, 0x7FFFFFFF),
        struct.pack(">I", 3) + proto.OPTION_HEADER.pack(0x1234, Opt.LIST, 0),
    ],
    ids=["random", "bad-flags", "magic-soup", "absurd-go", "absurd-unknown", "bad-opt-magic"],
)
def test_garbage_handshakes_close_only_their_connection(
    tool: tuple[str, int], payload: bytes
) -> None:
    sock, _ = tool
    c = RawClient.connect(sock)
    c.recv_exact(18)
    c.send(payload)
    assert c.closed_by_server()
    healthy(sock)


def test_option_flood_is_cut_off(tool: tuple[str, int]) -> None:
    sock, _ = tool
    c = RawClient.connect(sock)
    c.greeting()
    flood = proto.OPTION_HEADER.pack(proto.IHAVEOPT, 0xBAD, 3) + b"abc"
    answered = 0
    c.send(flood * 3000)
    try:
        while True:
            opt, rep, _ = c.option_reply()
            assert (opt, rep) == (0xBAD, Rep.ERR_UNSUP)
            answered += 1
    except (EOFError, ConnectionResetError):
        pass
    assert answered == 1024  # the cap: then the server hangs up
    healthy(sock)


def test_garbage_requests_close_only_their_connection(tool: tuple[str, int]) -> None:
    sock, _ = tool
    c = RawClient.connect(sock)
    c.handshake("disk")
    c.send(os.urandom(1 << 16))
    assert c.closed_by_server()
    healthy(sock)


def _abrupt(sock: str, stage: int) -> None:
    s = socket.socket(socket.AF_UNIX)
    s.connect(sock)
    if stage >= 1:
        s.recv(18)
    if stage >= 2:
        s.sendall(struct.pack(">I", 3) + proto.OPTION_HEADER.pack(proto.IHAVEOPT, Opt.GO, 64))
    if stage >= 3:
        s.sendall(b"\0" * 10)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()


def test_hundreds_of_hostile_clients_at_once(tool: tuple[str, int]) -> None:
    """300 half-open connections and 200 abrupt ones: the server serves on, its memory
    stays bounded, and it lets go of everything once they are gone."""
    sock, pid = tool
    healthy(sock)
    base_rss, base_threads = rss_kib(pid), threads(pid)
    idle = []
    for i in range(300):
        s = socket.socket(socket.AF_UNIX)
        s.connect(sock)
        if i % 2:
            s.sendall(struct.pack(">I", 3))  # then nothing: a half-open handshake
        idle.append(s)
    for i in range(200):
        _abrupt(sock, i % 4)
    for s in idle[:50]:
        s.recv(18)
    healthy(sock)
    grown = rss_kib(pid) - base_rss
    assert threads(pid) >= base_threads + 250  # they really are being served
    print(f"RSS {base_rss} KiB -> +{grown} KiB with 300 idle connections")
    assert grown < 32 * 1024, f"RSS grew by {grown} KiB for 300 idle connections"
    for s in idle:
        s.close()
    healthy(sock)
    wait_for(lambda: threads(pid) <= base_threads + 5, "the sessions to end")


def test_clients_that_leave_mid_transmission(tool: tuple[str, int]) -> None:
    sock, _ = tool
    for cut in range(0, 40, 7):
        c = RawClient.connect(sock)
        c.handshake("disk")
        message = proto.encode_request(0, Cmd.WRITE, 9, 0, 1 << 20) + bytes(8)
        c.request(Cmd.READ, 0, 1 << 20)  # a reply the client never reads
        c.send(message[:cut])
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        c.close()
    healthy(sock)
