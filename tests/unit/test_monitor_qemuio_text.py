"""qemu-io's number, option and report formats (the integration test checks them against
real qemu-io; these pin the edge cases down)."""

from __future__ import annotations

import pytest

from pyfleece.monitor.qemuio_text import (
    ParseError,
    cvtnum,
    cvtstr,
    dump,
    getopt,
    parse_pattern,
    report,
    timestr,
)


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("0", 0), ("010", 10), ("0x10", 16), ("64k", 65536), ("1.5k", 1536), ("1.k", 1024),
        ("1.1k", 1126), ("0.0001k", 0), ("1B", 1), ("1.0", 1), ("7E", 7 << 60),
        ("9223372036854775807", (1 << 63) - 1),
    ],
)  # fmt: skip
def test_cvtnum(text: str, value: int) -> None:
    assert cvtnum(text)[0] == value


def test_cvtnum_errors_and_warning() -> None:
    for bad in ("", "abc", "1.5", "0.5b", ".5k", "1kb", "0x", "0x1.8k", "-1", "1e3"):
        with pytest.raises(ParseError, match="non-numeric"):
            cvtnum(bad)
    for big in ("8E", "9223372036854775808", "16E"):
        with pytest.raises(ParseError, match="too large"):
            cvtnum(big)
    assert cvtnum("0x1k") == (1024, "warning: Using a multiplier suffix on hex numbers "
                                    "is deprecated: 0x1k")  # fmt: skip


def test_parse_pattern() -> None:
    assert [parse_pattern(t) for t in ("0xab", "65", "0101", "0", "+7")] == [171, 65, 65, 0, 7]
    for bad in ("256", "-1", "0x", "ab", "08"):
        with pytest.raises(ParseError, match=f"{bad} is not a valid pattern byte"):
            parse_pattern(bad)


def test_getopt_permutes_like_gnu() -> None:
    assert list(getopt("read", ["0", "16", "-vP", "0xab", "--", "-x"], "P:v")) == [
        ("v", None),
        ("P", "0xab"),
        ("", "0"),
        ("", "16"),
        ("", "-x"),
    ]
    assert list(getopt("read", ["-P"], "P:")) == [("?", "read: option requires an argument -- 'P'")]
    assert list(getopt("r", ["0", "-5"], "P:")) == [("?", "r: invalid option -- '5'")]


def test_reports() -> None:
    assert [cvtstr(v) for v in (0, 512, 1000, 1536, 65536, 1 << 20, 4.511 * (1 << 20))] == [
        "0 bytes", "512 bytes", "1000 bytes", "1.500 KiB", "64 KiB", "1 MiB", "4.511 MiB",
    ]  # fmt: skip
    assert timestr(0.004) == "00.00 sec"
    assert timestr(0.5) == "00.50 sec"
    assert timestr(61.25) == "0:01:01.25"
    assert timestr(0.004, fixed=True) == "0:00:00.00"
    lines = report("wrote", 0.5, 4096, 65536, machine=False).splitlines()
    assert lines == [
        "wrote 65536/65536 bytes at offset 4096",
        "64 KiB, 1 ops; 00.50 sec (128 KiB/sec and 2.0000 ops/sec)",
    ]
    assert report("read", 0.5, 0, 512, machine=True) == "512,1,0:00:00.50,1024.000,2.000\n"


def test_dump() -> None:
    assert dump(b"AB c\x00" + bytes(range(0x30, 0x3C)) + b"z", 0x10) == (
        "00000010:  41 42 20 63 00 30 31 32 33 34 35 36 37 38 39 3a  AB.c.0123456789.\n"
        "00000020:  3b 7a  .z\n"
    )
