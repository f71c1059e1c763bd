"""HMP argument declarations and parsing: QEMU's quoting, types, flags and messages."""

from __future__ import annotations

from typing import Any

import pytest

from pyfleece.monitor.hmp import (
    HmpArgError,
    HmpCommand,
    HmpTable,
    execute_line,
    parse_args_type,
    parse_arguments,
    split_words,
)


def parse(args_type: str, text: str) -> dict[str, Any]:
    return parse_arguments(HmpCommand("cmd", args_type, "", ""), text, 0)


@pytest.mark.parametrize(
    ("args_type", "text", "expected"),
    [
        ("device:B,command:s", 'ide0-hd0 "write -P 0xab 0 64k"',
         {"device": "ide0-hd0", "command": "write -P 0xab 0 64k"}),
        ("a:s", r'"tab\"quote\\back\nline\'"', {"a": "tab\"quote\\back\nline'"}),
        ("a:s,b:s?", "x", {"a": "x"}),
        ("a:s?,b:s", "x", {"b": "x"}),
        ("a:s?,b:s", "0 x", {"a": "0", "b": "x"}),
        ("f:-f,a:s", "-f x", {"f": True, "a": "x"}),
        ("f:-f,a:s", "x", {"a": "x"}),
        ("n:-n,d:-d,a:s", "-d x", {"d": True, "a": "x"}),
        ("v:-vs,a:s", "-v val x", {"v": "val", "a": "x"}),
        ("rest:S", "  all of  this ", {"rest": "all of  this "}),
        ("rest:S?", "", {}),
        ("n:i", "0x10", {"n": 16}),
        ("n:l", "-5", {"n": -5}),
        ("n:l", "010", {"n": 8}),
        ("size:o", "64", {"size": 64 << 20}),
        ("size:o", "512k", {"size": 512 << 10}),
        ("on:b", "on", {"on": True}),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)  # fmt: skip
def test_parsing(args_type: str, text: str, expected: dict[str, Any]) -> None:
    assert parse(args_type, text) == expected


@pytest.mark.parametrize(
    ("args_type", "text", "expected"),
    [
        ("a:s", "", "cmd: string expected"),
        ("a:B", "", "cmd: block device name expected"),
        ("a:F", '"open', "cmd: filename expected"),
        ("a:s", r'"bad \q escape"', "cmd: string expected"),
        ("a:s", "x y", "cmd: extraneous characters at the end of line"),
        ("f:-f,a:s", "-g x", "cmd: unsupported option -g"),
        ("v:-vs,a:s", "-v", "cmd: value expected for -v"),
        ("rest:S", "", "cmd: string expected"),
        ("n:i", "0x100000000", "'cmd' has failed: integer is for 32-bit values"),
        ("n:i", "x12", "invalid char 'x' in expression"),
        ("n:i", "12ab", "cmd: extraneous characters at the end of line"),
        ("n:i", "", "unexpected end of expression"),
        ("size:o", "lots", "invalid size"),
        ("on:b", "maybe", "Expected 'on' or 'off'"),
    ],
)
def test_errors(args_type: str, text: str, expected: str) -> None:
    with pytest.raises(HmpArgError) as info:
        parse(args_type, text)
    assert str(info.value) == expected


def test_bad_declarations_fail_at_registration() -> None:
    with pytest.raises(ValueError, match="bad HMP argument declaration"):
        parse_args_type("a:x")
    table = HmpTable()
    table.register("quit|q", "", "", "", lambda ctx, args: None)
    with pytest.raises(ValueError, match="already used"):
        table.register("q", "", "", "", lambda ctx, args: None)


def test_execute_line_messages_and_handler_errors() -> None:
    table = HmpTable()

    def boom(ctx: Any, args: dict[str, Any]) -> str:
        raise RuntimeError(f"no {args['what']}")

    table.register("boom", "what:s", "what", "fails", boom)
    assert execute_line(table, None, "  nope x") == "unknown command: '  nope'\n"
    assert execute_line(table, None, "boom") == (
        'boom: string expected\nTry "help boom" for more information\n'
    )
    assert execute_line(table, None, "boom luck") == "Error: no luck\n"
    assert execute_line(table, None, "boom luck", lambda e: f"mapped {e}") == (
        "Error: mapped no luck\n"
    )


def test_split_words() -> None:
    assert split_words('a "b c" d') == ["a", "b c", "d"]
    assert split_words('a "open') == ["a"]
