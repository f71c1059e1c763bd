"""QMP input framing: messages split or joined anywhere, QEMU's errors, bounded memory."""

from __future__ import annotations

import pytest

from pyfleece.monitor.jsonstream import JsonStreamer, Message
from pyfleece.monitor.jsonvalue import encode

STREAM = (
    b'{"execute": "a", "id": 1}{"execute":\n"b"}  \r\n'
    b"{'execute': 'c', 'arguments': {\"k\": [1, -2.5e3, true, false, null, \"\\u00e9\"]}}\n"
)
EXPECTED = [
    {"execute": "a", "id": 1},
    {"execute": "b"},
    {"execute": "c", "arguments": {"k": [1, -2500.0, True, False, None, "\u00e9"]}},
]


def values(messages: list[Message]) -> list[object]:
    return [m.value if m.error is None else ("ERR", m.error) for m in messages]


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 64, len(STREAM)])
def test_messages_are_framed_wherever_reads_split_them(chunk: int) -> None:
    streamer = JsonStreamer()
    out: list[Message] = []
    for i in range(0, len(STREAM), chunk):
        out += streamer.feed(STREAM[i : i + chunk])
    assert values(out) == EXPECTED


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"42 ", [42]),
        (b"18446744073709551615 ", [18446744073709551615]),
        (b"18446744073709551616 ", [1.8446744073709552e19]),
        (b'"\\ud83d\\ude00" ', ["\U0001f600"]),
        (b'"\xc0\x80" ', ["\x00"]),  # QEMU's modified UTF-8 NUL
        (b'"a\\qb"', [("ERR", "JSON parse error, invalid escape sequence in string")]),
        (b'"\\udc00"', [("ERR", "JSON parse error, \\udc00 is not a valid Unicode character")]),
        (b'{"a": 1, "a": 2}', [("ERR", "JSON parse error, duplicate key")]),
        (b"[1 2]", [("ERR", "JSON parse error, expected separator in list")]),
        (b'{"a" 1}', [("ERR", "JSON parse error, missing : in object pair")]),
        (b"{[1]: 2}", [("ERR", "JSON parse error, key is not a string in object")]),
        (b"{[1,]: 2}", [("ERR", "JSON parse error, expecting value")]),
        (b"fals ", [("ERR", "JSON parse error, invalid keyword 'fals'")]),
        (b"-x", [("ERR", "JSON parse error, stray '-x'")]),
        (b"1e+x", [("ERR", "JSON parse error, stray '1e+x'")]) ,
        (b'"a\x00b"', [("ERR", "JSON parse error, stray '\"a'")]),
    ],
    ids=repr,
)  # fmt: skip
def test_values_and_qemu_error_texts(data: bytes, expected: list[object]) -> None:
    streamer = JsonStreamer()
    assert values(streamer.feed(data)) == expected


def test_lexical_error_resynchronises_at_structural_characters() -> None:
    streamer = JsonStreamer()
    out = streamer.feed(b'{"a": NaN and more garbage, "b": 1} {"ok": true}')
    expecting_value = ("ERR", "JSON parse error, expecting value")
    assert values(out) == [  # after the stray N, from the "," on: QEMU's cascade
        ("ERR", "JSON parse error, stray 'N'"),
        expecting_value,
        "b",
        expecting_value,
        1,
        expecting_value,
        {"ok": True},
    ]


def test_nesting_limit_and_deep_values_without_recursion() -> None:
    streamer = JsonStreamer(max_nesting=5000)
    deep = b"[" * 4000 + b"]" * 4000
    (message,) = streamer.feed(deep)
    depth, value = 0, message.value
    while value != []:
        depth, value = depth + 1, value[0]
    assert depth == 3999
    assert len(encode(message.value)) == 8000
    limited = JsonStreamer(max_nesting=10)
    out = limited.feed(b"[" * 11 + b"]" * 11 + b"{}")
    assert values(out) == [("ERR", "JSON nesting depth limit exceeded"), {}]


def test_oversized_token_is_dropped_as_it_streams() -> None:
    streamer = JsonStreamer(max_bytes=1024)
    out = streamer.feed(b'{"id": "' + b"x" * 5000)
    assert values(out) == [("ERR", "JSON token size limit exceeded")]
    for _ in range(100):  # more of the same string: nothing is kept, nothing more said
        assert streamer.feed(b'y{[\\"' * 1000) == []
        assert len(streamer._token) == 0 and streamer._tokens == []
    assert values(streamer.feed(b'"}{"next": 1}')) == [{"next": 1}]


def test_oversized_message_gets_one_error_then_the_stream_resumes() -> None:
    streamer = JsonStreamer(max_tokens=10)
    out = streamer.feed(b'{"a": [' + b"1," * 100 + b'1], "b": "}"} {"after": 1}')
    assert values(out) == [("ERR", "JSON token count limit exceeded"), {"after": 1}]


def test_endless_message_is_given_up_on() -> None:
    streamer = JsonStreamer(max_bytes=100, max_discard=10_000)
    out = streamer.feed(b"[" * 200)
    assert values(out) == [("ERR", "JSON token size limit exceeded")]
    out = streamer.feed(b"[" * 20_000)
    assert [m.fatal for m in out] == [True]
    assert streamer.broken and streamer.feed(b"{}") == []


def test_encode_matches_json_dumps() -> None:
    value = {"return": {"a": [1, 2.5, None, True, "\u00e9\n"]}, "id": {"x": []}}
    assert encode(value) == '{"return": {"a": [1, 2.5, null, true, "\\u00e9\\n"]}, "id": {"x": []}}'
