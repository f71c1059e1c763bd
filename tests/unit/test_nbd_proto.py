"""NBD codec: layouts match the spec's field tables; malformed payloads are rejected."""

from __future__ import annotations

import errno

import pytest

from pyfleece.errors import ProtocolError
from pyfleece.nbd import proto


def test_request_roundtrip() -> None:
    raw = proto.encode_request(proto.CmdFlag.FUA, proto.Cmd.WRITE, 7, 4096, 512)
    assert len(raw) == 28
    assert proto.decode_request(raw) == proto.Request(1, 1, 7, 4096, 512)


def test_bad_request_magic() -> None:
    raw = bytearray(proto.encode_request(0, 0, 1, 0, 1))
    raw[0] ^= 0xFF
    with pytest.raises(ProtocolError, match="bad request magic"):
        proto.decode_request(raw)


def test_reply_layouts() -> None:
    assert len(proto.simple_reply(1, 22)) == 16
    assert len(proto.chunk_none(1)) == 20
    hole = proto.chunk_hole(5, 100, 200, done=True)
    assert len(hole) == 20 + 12 and hole[4:6] == b"\x00\x01"
    err = proto.chunk_error(5, proto.Err.EIO, "boom")
    assert err[6:8] == b"\x80\x01" and err.endswith(b"boom")
    status = proto.chunk_block_status(9, 1, [(4096, 3), (512, 0)], done=False)
    assert len(status) == 20 + 4 + 16


def test_go_and_meta_roundtrip() -> None:
    go = proto.decode_go(proto.encode_go("disk", [proto.Info.BLOCK_SIZE]))
    assert go == proto.GoRequest("disk", [3])
    meta = proto.decode_meta(proto.encode_meta("", ["base:", "qemu:allocation-depth"]))
    assert meta.queries == ["base:", "qemu:allocation-depth"]


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00\x00\x00\x10ab",
        proto.encode_go("x", []) + b"junk",
        b"\x00\x00\x00\x01\xff\x00\x00",
    ],
)
def test_malformed_go(data: bytes) -> None:
    with pytest.raises(proto.OptionInvalid):
        proto.decode_go(data)


def test_too_many_meta_queries() -> None:
    with pytest.raises(proto.OptionInvalid):
        proto.decode_meta(proto.encode_meta("", ["a"] * 5), max_queries=4)


def test_wire_errno_table() -> None:
    assert proto.wire_errno(errno.ENOSPC) == proto.Err.ENOSPC
    assert proto.wire_errno(errno.EROFS) == proto.Err.EPERM
    assert proto.wire_errno(errno.ENOENT) == proto.Err.EIO
