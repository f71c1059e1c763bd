"""The HMP line editor: line ends, editing keys, bounded lines."""

from __future__ import annotations

from pyfleece.monitor.readline import MAX_LINE, LineEditor


def test_line_ends() -> None:
    editor = LineEditor()
    assert editor.feed(b"a\nb\r\nc\rd") == ["a", "b", "c"]
    assert editor.feed(b"\n\n") == ["d", ""]


def test_editing_keys() -> None:
    editor = LineEditor()
    assert editor.feed(b"helx\x7fp\n") == ["help"]
    assert editor.feed(b"info\x1b[A\x1bOH\x1b[3~ version\t\n") == ["info version"]
    assert editor.feed("é\x08a\n".encode()) == ["a"]
    assert editor.feed(b"\x08\x08x\x01\x02\n") == ["x"]


def test_long_lines_are_cut() -> None:
    editor = LineEditor()
    assert editor.feed(b"y" * (MAX_LINE * 3) + b"\n") == ["y" * MAX_LINE]
