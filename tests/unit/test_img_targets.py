"""The write helpers of convert's targets: gathered buffers sliced and written whole."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyfleece.img import targets
from pyfleece.img.targets import pwritev_all, slice_views

PARTS = st.lists(st.binary(min_size=1, max_size=40), min_size=1, max_size=6)


@settings(max_examples=200, deadline=None)
@given(parts=PARTS, data=st.data())
def test_slice_views_is_a_slice_of_the_whole(parts: list[bytes], data: st.DataObject) -> None:
    whole = b"".join(parts)
    start = data.draw(st.integers(0, len(whole)))
    end = data.draw(st.integers(start, len(whole)))
    views = [memoryview(p) for p in parts]
    sliced = slice_views(views, start, end)
    assert b"".join(bytes(v) for v in sliced) == whole[start:end]
    assert all(len(v) for v in sliced)


@pytest.mark.parametrize("most", [1, 3, 7, 1 << 20])
def test_pwritev_all_survives_short_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, most: int
) -> None:
    """A short pwritev (a signal, a full quota) goes on where it stopped."""
    real = os.pwritev

    def short(fd: int, buffers: list[memoryview], offset: int) -> int:
        first = bytes(buffers[0])[:most] if buffers else b""
        return real(fd, [first], offset)

    monkeypatch.setattr(targets.os, "pwritev", short)
    parts = [b"abc", b"defgh", b"", b"ijklmnopqrstu"]
    path = tmp_path / "out"
    path.write_bytes(b"")
    fd = os.open(path, os.O_WRONLY)
    try:
        pwritev_all(fd, [memoryview(p) for p in parts if p], 5)
    finally:
        os.close(fd)
    assert path.read_bytes() == bytes(5) + b"".join(parts)
