"""QMP's JSON values: parsing a framed message's tokens, decoding strings, encoding replies.

The parser takes the tokens ``jsonstream`` framed and builds the value, reporting problems in
QEMU's words (qobject/json-parser.c's behaviour, measured on qemu-storage-daemon 7.2): the
first problem wins; strings accept QEMU's ``\\'`` escape and "modified UTF-8" (C0 80 is
U+0000); surrogate pairs must be complete. It is iterative, and so is the fallback encoder,
so values nested as deep as the framer allows (1024) never reach Python's recursion limit.

Pure: no I/O.
"""

from __future__ import annotations

import json
import re
from enum import IntEnum
from typing import Any


class Tok(IntEnum):
    """Token kinds."""

    LCURLY = 1
    RCURLY = 2
    LSQUARE = 3
    RSQUARE = 4
    COMMA = 5
    COLON = 6
    STRING = 7
    INTEGER = 8
    FLOAT = 9
    KEYWORD = 10


class JsonError(Exception):
    """A message's tokens do not form a JSON value (QEMU's parser wording)."""


def parse_tokens(tokens: list[tuple[Tok, bytes]]) -> Any:
    """Parses one framed message. Iterative: nesting depth costs heap, not stack.

    Raises:
        JsonError: with QEMU's text for the first problem found.
    """
    reader = _Tokens(tokens)
    stack: list[list[Any]] = []  # each open container: [container, key being filled]
    while True:
        kind, text = reader.next()
        if kind is Tok.LCURLY or kind is Tok.LSQUARE:
            close = Tok.RCURLY if kind is Tok.LCURLY else Tok.RSQUARE
            value: Any = {} if kind is Tok.LCURLY else []
            if reader.peek() is close:
                reader.next()
            else:
                stack.append([value, None])
                if kind is Tok.LCURLY:
                    _object_key(reader, stack[-1])
                continue
        else:
            value = _scalar(kind, text)
        # Attach the value to its parent; close every container that ends here.
        while stack:
            frame = stack[-1]
            parent = frame[0]
            if isinstance(parent, dict):
                parent[frame[1]] = value
            else:
                parent.append(value)
            kind = reader.next()[0]
            closer, what = (
                (Tok.RCURLY, "dict") if isinstance(parent, dict) else (Tok.RSQUARE, "list")
            )
            if kind is closer:
                value = stack.pop()[0]
                continue
            if kind is not Tok.COMMA:
                raise JsonError(f"expected separator in {what}")
            if isinstance(parent, dict):
                _object_key(reader, frame)
            break
        else:
            return value


class _Tokens:
    """A cursor over a message's tokens."""

    def __init__(self, tokens: list[tuple[Tok, bytes]]) -> None:
        self.tokens = tokens
        self.pos = 0

    def next(self) -> tuple[Tok, bytes]:
        if self.pos >= len(self.tokens):
            raise JsonError("premature EOI")
        token = self.tokens[self.pos]
        self.pos += 1
        return token

    def peek(self) -> Tok | None:
        return self.tokens[self.pos][0] if self.pos < len(self.tokens) else None


def _object_key(reader: _Tokens, frame: list[Any]) -> None:
    """Reads ``"key" :`` for the object in ``frame`` and records the key."""
    start = reader.pos
    kind, text = reader.next()
    if kind is Tok.LCURLY or kind is Tok.LSQUARE:
        # QEMU parses the would-be key as a whole value before judging it: report an
        # error inside it first, then that a container is not a string.
        reader.pos = start
        _skip_value(reader)
        raise JsonError("key is not a string in object")
    key = _scalar(kind, text)
    if not isinstance(key, str):
        raise JsonError("key is not a string in object")
    if reader.next()[0] is not Tok.COLON:
        raise JsonError("missing : in object pair")
    if key in frame[0]:
        raise JsonError("duplicate key")
    frame[1] = key


def _skip_value(reader: _Tokens) -> None:
    depth = 0
    start = reader.pos
    while True:
        kind = reader.next()[0]
        if kind in (Tok.LCURLY, Tok.LSQUARE):
            depth += 1
        elif kind in (Tok.RCURLY, Tok.RSQUARE):
            depth -= 1
        if depth <= 0:
            parse_tokens(reader.tokens[start : reader.pos])
            return


def _scalar(kind: Tok, text: bytes) -> Any:
    if kind is Tok.STRING:
        return decode_string(text)
    if kind is Tok.INTEGER:
        value = int(text)
        if -(1 << 63) <= value < (1 << 64):
            return value
        return float(value)
    if kind is Tok.FLOAT:
        return float(text)
    if kind is Tok.KEYWORD:
        if text == b"true":
            return True
        if text == b"false":
            return False
        if text == b"null":
            return None
        raise JsonError(f"invalid keyword '{text.decode('ascii', 'replace')}'")
    raise JsonError("expecting value")


_SIMPLE_ESCAPES = {
    ord('"'): '"',
    ord("'"): "'",
    ord("\\"): "\\",
    ord("/"): "/",
    ord("b"): "\b",
    ord("f"): "\f",
    ord("n"): "\n",
    ord("r"): "\r",
    ord("t"): "\t",
}
_HEX4 = re.compile(rb"[0-9a-fA-F]{4}")


def decode_string(token: bytes) -> str:
    """Decodes a string token (quotes included) the way QEMU does: escapes, surrogate pairs,
    and "modified UTF-8" (the overlong C0 80 stands for U+0000).

    Raises:
        JsonError: an invalid escape or byte sequence.
    """
    body = token[1:-1]
    if b"\\" not in body:
        return _utf8(body)
    parts: list[str] = []
    pos = 0
    while True:
        slash = body.find(b"\\", pos)
        if slash < 0:
            parts.append(_utf8(body[pos:]))
            return "".join(parts)
        parts.append(_utf8(body[pos:slash]))
        code = body[slash + 1]
        if code == 0x75:  # \uXXXX
            char, pos = _unicode_escape(body, slash)
            parts.append(char)
            continue
        simple = _SIMPLE_ESCAPES.get(code)
        if simple is None:
            raise JsonError("invalid escape sequence in string")
        parts.append(simple)
        pos = slash + 2


def _unicode_escape(body: bytes, slash: int) -> tuple[str, int]:
    def bad(at: int) -> JsonError:
        shown = (body[at : at + 6] + b'"')[:6].decode("utf-8", "replace")
        return JsonError(f"{shown} is not a valid Unicode character")

    if not _HEX4.match(body, slash + 2):
        raise bad(slash)
    unit = int(body[slash + 2 : slash + 6], 16)
    pos = slash + 6
    if 0xDC00 <= unit <= 0xDFFF:
        raise bad(slash)
    if 0xD800 <= unit <= 0xDBFF:
        low = body[pos : pos + 2] == b"\\u" and _HEX4.match(body, pos + 2)
        low_unit = int(body[pos + 2 : pos + 6], 16) if low else 0
        if not 0xDC00 <= low_unit <= 0xDFFF:
            raise bad(slash)
        unit = 0x10000 + ((unit - 0xD800) << 10) + (low_unit - 0xDC00)
        pos += 6
    return chr(unit), pos


def _utf8(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        pass
    try:
        return raw.replace(b"\xc0\x80", b"\x00").decode("utf-8")
    except UnicodeDecodeError as err:
        raise JsonError("invalid UTF-8 sequence in string") from err


def encode(value: Any, *, pretty: bool = False) -> str:
    """JSON text for a value, ASCII only. Values nested deeper than Python's recursion limit
    (a client may send an ``id`` 1024 levels deep, and QMP echoes it) take an iterative path.
    """
    try:
        return json.dumps(value, indent=4 if pretty else None)
    except RecursionError:
        return _encode_iteratively(value)


def _encode_iteratively(value: Any) -> str:
    out: list[str] = []
    # Work items: a value to encode, or a literal piece of text to emit.
    stack: list[tuple[bool, Any]] = [(True, value)]
    while stack:
        is_value, item = stack.pop()
        if not is_value:
            out.append(item)
        elif isinstance(item, dict):
            pieces: list[tuple[bool, Any]] = [(False, "{")]
            for index, (key, member) in enumerate(item.items()):
                prefix = ", " if index else ""
                pieces += [(False, f"{prefix}{json.dumps(str(key))}: "), (True, member)]
            pieces.append((False, "}"))
            stack.extend(reversed(pieces))
        elif isinstance(item, list | tuple):
            pieces = [(False, "[")]
            for index, member in enumerate(item):
                pieces += [(False, ", " if index else ""), (True, member)]
            pieces.append((False, "]"))
            stack.extend(reversed(pieces))
        else:
            out.append(json.dumps(item))
    return "".join(out)
