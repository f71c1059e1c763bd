"""The pure parts of ``pyfleece img``: qemu-img's number syntax and formatting, QDict key
order, ``-o`` option lists, the progress line, and the zero scanner of convert."""

from __future__ import annotations

import io
import itertools
from contextlib import redirect_stdout

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyfleece.img.common import Fail, cvtnum, qdict_order, qjson, size_to_str, strtosz
from pyfleece.img.copy import zero_runs
from pyfleece.img.options import (
    parse_format_options,
    valid_option_list,
    wants_help,
    without,
)
from pyfleece.img.progress import Progress


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0, "0 B"),
        (512, "512 B"),
        (1000, "0.977 KiB"),
        (1024, "1 KiB"),
        (200704, "196 KiB"),
        (1 << 20, "1 MiB"),
        (1656832, "1.58 MiB"),
        (104857600, "100 MiB"),
        (1 << 40, "1 TiB"),
    ],
)
def test_size_to_str(value: int, text: str) -> None:
    assert size_to_str(value) == text


@pytest.mark.parametrize(
    ("text", "value"),
    [("1M", 1 << 20), ("1.5k", 1536), ("0x10", 16), (" 1m", 1 << 20), ("1b", 1), ("0.5k", 512),
     ("1.0000001k", 1024), ("1.5", None), ("1e3", None), ("1MB", None), ("1 M", None),
     ("", None), ("1k1", None), ("18446744073709551616", -1)],
)  # fmt: skip
def test_strtosz(text: str, value: int | None) -> None:
    assert strtosz(text) == value


def test_cvtnum_messages() -> None:
    with pytest.raises(Fail, match="You may use k, M, G"):
        cvtnum("image size", "abc")
    with pytest.raises(Fail, match="Must be between 0 and 9223372036854775807"):
        cvtnum("image size", "8E")


def test_qdict_order_is_qemus() -> None:
    """The order qemu-img 7.2 prints ``info --output=json`` keys in."""
    keys = ["virtual-size", "filename", "cluster-size", "format", "actual-size",
            "format-specific", "backing-filename", "full-backing-filename",
            "backing-filename-format", "dirty-flag"]  # fmt: skip
    ordered = list(qdict_order(dict.fromkeys(keys, 0)))
    assert ordered == [
        "backing-filename-format", "virtual-size", "filename", "cluster-size", "format",
        "actual-size", "format-specific", "full-backing-filename", "backing-filename",
        "dirty-flag",
    ]  # fmt: skip
    assert qjson({"b": [1, {"x": True}]}) == '{\n    "b": [\n        1,\n        {\n' \
        '            "x": true\n        }\n    ]\n}'  # fmt: skip


def test_option_lists() -> None:
    assert valid_option_list("a=1,b=2") and valid_option_list("a=x,,y")
    assert not valid_option_list("") and not valid_option_list(",a=1")
    assert not valid_option_list("a=1,")
    assert wants_help("cluster_size=4k,help") and not wants_help("backing_file=help,,me")
    assert without("size=1M,cluster_size=4k,backing_file=a,,b", "size") == (
        "cluster_size=4k,backing_file=a,,b"
    )
    opts = parse_format_options("qcow2", "cluster_size=4k,lazy_refcounts,backing_file=a,,b", "x")
    assert opts.values == {"cluster_size": 4096, "lazy_refcounts": True, "backing_file": "a,b"}
    opts.set("size", 1 << 20)
    assert opts.formatting_line() == (
        "cluster_size=4096 extended_l2=off compression_type=zlib size=1048576 "
        "backing_file=a,,b lazy_refcounts=on refcount_bits=16"
    )
    with pytest.raises(Fail, match="x: Invalid parameter 'bogus'"):
        parse_format_options("qcow2", "bogus=1", "x")
    with pytest.raises(Fail, match="expects a number"):
        parse_format_options("qcow2", "refcount_bits=abc", "x")


def test_progress_lines() -> None:
    out = io.StringIO()
    bar = Progress(True, 2.0)
    with redirect_stdout(out):
        bar.advance(0, 100)
        for _ in range(100):
            bar.advance(1.0, 100)
        bar.end()
    lines = out.getvalue().split("\r")
    assert lines[0] == "    (0.00/100%)"
    assert lines[-1] == "\n"
    assert lines[-2] == "    (100.00/100%)"
    assert len(lines) < 40  # printed only every 2% or so


BLOCKS = st.sampled_from([b"\0" * 512, b"\0" * 511 + b"\1", b"\1" * 512])


@settings(max_examples=200, deadline=None)
@given(
    blocks=st.lists(
        st.sampled_from([b"\0" * 512, b"\0" * 511 + b"\1", b"\1" * 512]), min_size=1, max_size=64
    ),
    base=st.integers(0, 15).map(lambda n: n * 512),
    grain=st.sampled_from([512, 1024, 4096]),
)
def test_zero_runs(blocks: list[bytes], base: int, grain: int) -> None:
    """The runs tile the buffer; zero runs are whole aligned zero blocks; no data run
    contains a whole aligned block of zeros."""
    buf = bytearray(b"".join(blocks))
    runs = list(zero_runs(buf, len(buf), base, grain))
    assert runs[0][0] == 0 and runs[-1][1] == len(buf)
    for (_, end, _), (start, _, _) in itertools.pairwise(runs):
        assert end == start
    for start, end, is_zero in runs:
        if is_zero:
            assert not any(buf[start:end])
            assert ((base + start) % grain == 0 and (end - start) % grain == 0) or end == len(buf)
        else:
            first = start + (-(base + start) % grain)
            for block in range(first, end - grain + 1, grain):
                assert any(buf[block : block + grain])
