"""Every bad request of issue 3, sent by libnbd with strict mode off: the server answers with
the errno the spec's SHOULDs name and keeps the connection."""

from __future__ import annotations

import errno
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.nbdtest import nbd_tool, pattern, require_module, short_tempdir

nbd: Any = require_module("nbd")
pytestmark = pytest.mark.timeout(120)

SIZE = 16 << 20
MiB = 1 << 20


@pytest.fixture(scope="module")
def uris() -> Iterator[dict[str, str]]:
    """A writable and a read-only export of the same kind of image."""
    with short_tempdir() as tmp:
        rw, ro = tmp / "rw.raw", tmp / "ro.raw"
        for path in (rw, ro):
            with open(path, "wb") as f:
                f.truncate(SIZE)
                f.write(pattern(0, MiB))
        common = ["-f", "raw", "-x", "disk", "-t", "-e", "8"]
        with (
            nbd_tool([*common, "-k", str(tmp / "rw"), str(rw)], tmp / "rw.pid"),
            nbd_tool([*common, "-r", "-k", str(tmp / "ro"), str(ro)], tmp / "ro.pid"),
        ):
            yield {
                "rw": f"nbd+unix:///disk?socket={tmp / 'rw'}",
                "ro": f"nbd+unix:///disk?socket={tmp / 'ro'}",
                "rw_file": str(rw),
            }


def lax(uri: str) -> Any:
    h = nbd.NBD()
    h.set_strict_mode(0)
    h.add_meta_context("base:allocation")
    h.connect_uri(uri)
    return h


def still_serves(h: Any) -> None:
    assert h.pread(64, 0) == pattern(0, 64)


Request = Callable[[Any], object]

BAD: list[tuple[str, str, Request, int]] = [
    ("read-past-end", "rw", lambda h: h.pread(8192, SIZE - 4096), errno.EINVAL),
    ("read-over-32MiB", "rw", lambda h: h.pread(32 * MiB + 512, 0), errno.EINVAL),
    ("trim-past-end", "rw", lambda h: h.trim(8192, SIZE - 4096), errno.EINVAL),
    ("cache-past-end", "rw", lambda h: h.cache(8192, SIZE - 4096), errno.EINVAL),
    (
        "status-past-end",
        "rw",
        lambda h: h.block_status(8192, SIZE - 4096, lambda *a: 0),
        errno.EINVAL,
    ),
    ("status-empty", "rw", lambda h: h.block_status(0, 0, lambda *a: 0), errno.EINVAL),
    ("write-past-end", "rw", lambda h: h.pwrite(bytes(8192), SIZE - 4096), errno.ENOSPC),
    ("zero-past-end", "rw", lambda h: h.zero(8192, SIZE - 4096), errno.ENOSPC),
    ("write-over-32MiB", "rw", lambda h: h.pwrite(bytes(32 * MiB + 512), 0), errno.EINVAL),
    ("write-read-only", "ro", lambda h: h.pwrite(bytes(512), 0), errno.EPERM),
    ("zero-read-only", "ro", lambda h: h.zero(512, 0), errno.EPERM),
    ("trim-read-only", "ro", lambda h: h.trim(512, 0), errno.EPERM),
    ("read-unknown-flag", "rw", lambda h: h.pread(512, 0, flags=1 << 9), errno.EINVAL),
    ("read-req-one", "rw", lambda h: h.pread(512, 0, nbd.CMD_FLAG_REQ_ONE), errno.EINVAL),
    ("zero-df", "rw", lambda h: h.zero(512, 0, nbd.CMD_FLAG_DF), errno.EINVAL),
    ("flush-no-hole", "rw", lambda h: h.flush(nbd.CMD_FLAG_NO_HOLE), errno.EINVAL),
    ("trim-fast-zero", "rw", lambda h: h.trim(512, 0, nbd.CMD_FLAG_FAST_ZERO), errno.EINVAL),
]


@pytest.mark.parametrize(
    ("which", "request_", "err"), [b[1:] for b in BAD], ids=[b[0] for b in BAD]
)
def test_bad_request(uris: dict[str, str], which: str, request_: Request, err: int) -> None:
    h = lax(uris[which])
    with pytest.raises(nbd.Error) as info:
        request_(h)
    assert info.value.errnum == err, info.value
    still_serves(h)
    h.shutdown()


ZERO_LENGTH: list[tuple[str, Request]] = [
    ("read", lambda h: h.pread(0, 4096)),
    ("write", lambda h: h.pwrite(b"", 4096)),
    ("trim", lambda h: h.trim(0, 4096)),
    ("zero", lambda h: h.zero(0, 4096)),
    ("cache", lambda h: h.cache(0, 4096)),
    ("read-at-end", lambda h: h.pread(0, SIZE)),
]


@pytest.mark.parametrize("request_", [z[1] for z in ZERO_LENGTH], ids=[z[0] for z in ZERO_LENGTH])
def test_zero_length_requests_succeed(uris: dict[str, str], request_: Request) -> None:
    h = lax(uris["rw"])
    request_(h)
    still_serves(h)
    h.shutdown()


def test_disconnect_finishes_requests_in_flight(uris: dict[str, str]) -> None:
    h = lax(uris["rw"])
    blocks = [bytes([i + 1]) * 65536 for i in range(32)]
    for i, block in enumerate(blocks):
        h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(block)), 8 * MiB + i * 65536)
    h.shutdown()  # NBD_CMD_DISC behind the writes in flight
    data = Path(uris["rw_file"]).read_bytes()[8 * MiB : 10 * MiB]
    assert data == b"".join(blocks)


def test_structured_read_flags(uris: dict[str, str]) -> None:
    """DF gives one data chunk, with the hole's zeros in it."""
    h = lax(uris["rw"])
    chunks: list[tuple[int, int, int]] = []

    def chunk(buf: bytes, offset: int, status: int, error: Any) -> int:
        chunks.append((offset, len(buf), status))
        return 0

    data = h.pread_structured(2 * MiB, 0, chunk, nbd.CMD_FLAG_DF)
    assert data == pattern(0, MiB) + bytes(MiB)
    assert chunks == [(0, 2 * MiB, nbd.READ_DATA)]
    chunks.clear()
    h.pread_structured(2 * MiB, 0, chunk)
    assert (MiB, MiB, nbd.READ_HOLE) in chunks
    h.shutdown()
