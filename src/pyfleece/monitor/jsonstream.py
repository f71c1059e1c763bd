"""QMP's input framing: a streaming JSON reader that behaves like QEMU's.

QMP (qmp-spec.rst, "Protocol Specification") sends JSON objects back to back: one may span
several reads or lines, several may share one line, and nothing separates them. QEMU frames
them at the token level, and its observable behaviour on bad input is part of the protocol
(clients resynchronise by provoking a lexical error). This reader reproduces it, measured
against qemu-storage-daemon 7.2:

- **Lexing** (bytes, not text): JSON tokens plus QEMU's extensions (``'single-quoted'``
  strings, ``\\'`` escapes). A byte that cannot continue a token is a *lexical error*: the
  partial token, including that byte, is reported as ``JSON parse error, stray '...'``, and the
  lexer then skips input until a structural character (``[]{},:``), a control character other
  than tab, or 0xFE/0xFF — QEMU's documented resynchronisation points.
- **Framing**: tokens accumulate while a ``{`` or ``[`` is open. When the brace and bracket
  counts return to zero (or either goes negative) the collected tokens are parsed as one
  message. A lone scalar is a message of its own.
- **Parsing** (jsonvalue.py) reports QEMU's texts ("expecting value", "expected separator in
  dict", "missing : in object pair", "duplicate key", "invalid keyword 'x'", "invalid UTF-8
  sequence in string", ...). The first error wins.

Invariants (Design invariant 3, bounded memory per connection):
- a message never holds more than ``max_bytes`` of token text nor more than ``max_tokens``
  tokens, and never nests deeper than ``max_nesting``. Crossing a bound reports QEMU's text
  ("JSON token size limit exceeded", "JSON token count limit exceeded", "JSON nesting depth
  limit exceeded"), once: the rest of that message is lexed but not kept (its brackets still
  counted) and the stream resumes with the next message. QEMU instead goes on answering each
  remaining token; one answer per message is what a client can use, and a multi-megabyte
  line then costs neither memory nor a flood of replies;
- a message that never ends (more than ``max_discard`` bytes skipped) makes the streamer give
  up: a ``fatal`` message, after which the connection is to be closed;
- parsing (jsonvalue.py) is iterative, so nesting never touches Python's recursion limit.

Pure: no I/O. ``JsonStreamer.feed(bytes)`` returns the messages completed so far.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from pyfleece.monitor.jsonvalue import JsonError, Tok, parse_tokens

_STRUCTURAL = {
    ord("{"): Tok.LCURLY,
    ord("}"): Tok.RCURLY,
    ord("["): Tok.LSQUARE,
    ord("]"): Tok.RSQUARE,
    ord(","): Tok.COMMA,
    ord(":"): Tok.COLON,
}
_SHARED = {kind: (kind, b"") for kind in _STRUCTURAL.values()}

_WHITESPACE = re.compile(rb"[ \t\r\n]+")
_KEYWORD = re.compile(rb"[a-z]+")
# Inside a string: the next byte that is not plain content.
_STRING_STOP = {q: re.compile(rb"[\\\x00-\x1f\xfe\xff" + q + rb"]") for q in (b'"', b"'")}
# While recovering from a lexical error: the next resynchronisation point.
_RESYNC = re.compile(rb"[\x00-\x08\x0a-\x1f\xfe\xff\[\]{}:,]")


class _Lex(IntEnum):
    START = 0
    STRING = 1
    ESCAPE = 2  # in a string, right after a backslash
    KEYWORD = 3
    RECOVERY = 4
    # number states, named after the part of the number being read
    SIGN = 10
    ZERO = 11
    DIGITS = 12
    MANTISSA = 13
    MANTISSA_DIGITS = 14
    EXP_E = 15
    EXP_SIGN = 16
    EXP_DIGITS = 17


_DIGIT = frozenset(b"0123456789")
_NUMBER_STATES = frozenset(s for s in _Lex if s >= _Lex.SIGN)


def _number_step(state: _Lex, byte: int) -> _Lex | Tok | None:
    """One transition of the number automaton: the next state, a finished token (the byte
    is not part of it), or None for a lexical error (the byte is part of the stray text)."""
    digit = byte in _DIGIT
    if state is _Lex.SIGN:
        return _Lex.ZERO if byte == 0x30 else (_Lex.DIGITS if digit else None)
    if state is _Lex.ZERO:
        return None if digit else (_Lex.MANTISSA if byte == 0x2E else Tok.INTEGER)
    if state is _Lex.DIGITS:
        if digit:
            return _Lex.DIGITS
        if byte in b"eE":
            return _Lex.EXP_E
        return _Lex.MANTISSA if byte == 0x2E else Tok.INTEGER
    if state is _Lex.MANTISSA:
        return _Lex.MANTISSA_DIGITS if digit else None
    if state is _Lex.MANTISSA_DIGITS:
        if digit:
            return _Lex.MANTISSA_DIGITS
        return _Lex.EXP_E if byte in b"eE" else Tok.FLOAT
    if state is _Lex.EXP_E:
        if byte in b"+-":
            return _Lex.EXP_SIGN
        return _Lex.EXP_DIGITS if digit else None
    if state is _Lex.EXP_SIGN:
        return _Lex.EXP_DIGITS if digit else None
    return _Lex.EXP_DIGITS if digit else Tok.FLOAT  # EXP_DIGITS


@dataclass(frozen=True)
class Message:
    """One framed input: a parsed value, or QEMU's error text for it. A ``fatal`` error
    means the input cannot be resynchronised: the connection should be closed."""

    value: Any = None
    error: str | None = None
    fatal: bool = False


class JsonStreamer:
    """Turns a byte stream into QMP messages (see the module docstring)."""

    def __init__(
        self,
        *,
        max_bytes: int = 1 << 20,
        max_tokens: int = 1 << 16,
        max_nesting: int = 1024,
        max_discard: int = 64 << 20,
    ) -> None:
        self.max_bytes = max_bytes
        self.max_tokens = max_tokens
        self.max_nesting = max_nesting
        self.max_discard = max_discard
        self._discarding = False  # skipping the rest of a message that crossed a bound
        self._discarded = 0
        self._dropping = False  # skipping the rest of a token that crossed the size bound
        self.broken = False  # gave up resynchronising: nothing more will be parsed
        self._state = _Lex.START
        self._token = bytearray()
        self._quote = b'"'
        self._tokens: list[tuple[Tok, bytes]] = []
        self._size = 0
        self._braces = 0
        self._brackets = 0
        self._out: list[Message] = []

    def feed(self, data: bytes) -> list[Message]:
        """Consumes ``data``; returns the messages it completed, in order."""
        if self.broken:
            return []
        pos, end = 0, len(data)
        while pos < end:
            start = pos
            pos = self._step(data, pos)
            if self._discarding:
                self._discarded += pos - start
                if self._discarded > self.max_discard:
                    self.broken = True
                    self._out.append(
                        Message(error="JSON message too large to resynchronise", fatal=True)
                    )
                    break
        out, self._out = self._out, []
        return out

    # -- lexer -----------------------------------------------------------------------------

    def _step(self, data: bytes, pos: int) -> int:
        state = self._state
        if state is _Lex.START:
            return self._start(data, pos)
        if state is _Lex.STRING:
            return self._string(data, pos)
        if state is _Lex.ESCAPE:
            return self._escape(data, pos)
        if state is _Lex.RECOVERY:
            match = _RESYNC.search(data, pos)
            if match is None:
                return len(data)
            self._state = _Lex.START
            return match.start()
        if state is _Lex.KEYWORD:
            match = _KEYWORD.match(data, pos)
            if match is not None:
                return self._grow(data, pos, match.end())
            self._emit_token(Tok.KEYWORD)
            return pos
        return self._number(data, pos)

    def _start(self, data: bytes, pos: int) -> int:
        byte = data[pos]
        kind = _STRUCTURAL.get(byte)
        if kind is not None:
            self._push(kind, b"")
            return pos + 1
        if byte in b" \t\r\n":
            match = _WHITESPACE.match(data, pos)
            return match.end() if match else pos + 1
        self._token.clear()
        if byte in b"\"'":
            self._quote = bytes((byte,))
            self._token.append(byte)
            self._state = _Lex.STRING
            return pos + 1
        if byte == 0x2D or byte in _DIGIT:
            self._token.append(byte)
            if byte == 0x2D:
                self._state = _Lex.SIGN
            else:
                self._state = _Lex.ZERO if byte == 0x30 else _Lex.DIGITS
            return pos + 1
        if 0x61 <= byte <= 0x7A:
            self._state = _Lex.KEYWORD
            return pos
        self._token.append(byte)
        self._lex_error()
        return pos + 1

    def _string(self, data: bytes, pos: int) -> int:
        match = _STRING_STOP[self._quote].search(data, pos)
        if match is None:
            return self._grow(data, pos, len(data))
        stop = match.start()
        self._grow(data, pos, stop)
        byte = data[stop]
        if not self._dropping:
            self._token.append(byte)
        if byte == 0x5C:
            self._state = _Lex.ESCAPE
        elif bytes((byte,)) == self._quote:
            self._emit_token(Tok.STRING)
        else:  # a control character or 0xFE/0xFF inside a string
            self._lex_error()
        return stop + 1

    def _escape(self, data: bytes, pos: int) -> int:
        byte = data[pos]
        if not self._dropping:
            self._token.append(byte)
        if 0x20 <= byte <= 0xFD:
            self._state = _Lex.STRING
        else:
            self._lex_error()
        return pos + 1

    def _number(self, data: bytes, pos: int) -> int:
        end = len(data)
        state = self._state
        start = pos
        while pos < end:
            nxt = _number_step(state, data[pos])
            if nxt is None:
                self._grow(data, start, pos + 1)
                self._lex_error()
                return pos + 1
            if isinstance(nxt, Tok):
                self._grow(data, start, pos)
                self._emit_token(nxt)
                return pos
            state = nxt
            pos += 1
        self._state = state
        return self._grow(data, start, end)

    def _grow(self, data: bytes, start: int, stop: int) -> int:
        """Appends data[start:stop] to the current token, unless that crosses the size bound:
        then the token is dropped (lexed to its end, not kept) and its message discarded."""
        if self._dropping:
            return stop
        if self._discarding:  # inside a message already answered: keep nothing
            self._token.clear()
            self._dropping = True
            return stop
        if self._size + len(self._token) + (stop - start) + 1 > self.max_bytes:
            self._token.clear()
            self._dropping = True
            self._limit("JSON token size limit exceeded")
            return stop
        self._token += data[start:stop]
        return stop

    def _lex_error(self) -> None:
        stray = bytes(self._token).split(b"\x00", 1)[0].decode("utf-8", "replace")
        self._token.clear()
        self._state = _Lex.RECOVERY
        if self._dropping or self._discarding:
            self._dropping = False
            if not self._open():
                self._reset()  # the skipped message ends here; recovery resynchronises
            return  # part of a message already answered
        self._fail(f"JSON parse error, stray '{stray}'")

    def _emit_token(self, kind: Tok) -> None:
        text = bytes(self._token)
        self._token.clear()
        self._state = _Lex.START
        if self._dropping:
            self._dropping = False
            if not self._open():
                self._reset()  # a dropped top-level token was the whole message
            return
        self._push(kind, text)

    # -- framing ---------------------------------------------------------------------------

    def _push(self, kind: Tok, text: bytes) -> None:
        if kind is Tok.LCURLY:
            self._braces += 1
        elif kind is Tok.RCURLY:
            self._braces -= 1
        elif kind is Tok.LSQUARE:
            self._brackets += 1
        elif kind is Tok.RSQUARE:
            self._brackets -= 1
        if self._discarding:
            if not self._open():
                self._reset()
            return
        if self._size + len(text) + 1 > self.max_bytes:
            self._limit("JSON token size limit exceeded")
            return
        if len(self._tokens) + 1 > self.max_tokens:
            self._limit("JSON token count limit exceeded")
            return
        if self._braces + self._brackets > self.max_nesting:
            self._limit("JSON nesting depth limit exceeded")
            return
        self._tokens.append(_SHARED[kind] if not text else (kind, text))
        self._size += len(text) + 1
        if self._open():
            return
        tokens = self._tokens
        self._reset()
        try:
            self._out.append(Message(value=parse_tokens(tokens)))
        except JsonError as err:
            self._out.append(Message(error=f"JSON parse error, {err}"))

    def _open(self) -> bool:
        """Whether the message being framed continues (QEMU's rule)."""
        return (
            (self._braces > 0 or self._brackets > 0) and self._braces >= 0 and self._brackets >= 0
        )

    def _fail(self, message: str) -> None:
        self._reset()
        self._out.append(Message(error=message))

    def _limit(self, message: str) -> None:
        """A bound was crossed: one error, then the rest of that message is skipped (its
        brackets still counted, its tokens not kept) so that it costs one error, not one per
        token as in QEMU, and the stream resumes at the next message."""
        self._out.append(Message(error=message))
        self._tokens = []
        self._size = 0
        self._discarding = self._open() or self._state is not _Lex.START
        self._discarded = 0
        if not self._discarding:
            self._reset()

    def _reset(self) -> None:
        self._tokens = []
        self._size = 0
        self._braces = 0
        self._brackets = 0
        self._discarding = False
