"""HMP, the human monitor: the command table, QEMU's argument syntax, and running a line.

A command line is ``NAME [ARGS...]``. The name ends at a space or ``/``; ``info`` has a
sub-table (``info version``). Arguments are read one by one, each by its declared type, as
QEMU's monitor reads them (monitor/hmp.c); the declaration uses QEMU's ``args_type`` notation,
a comma-separated list of ``key:type``:

======  ==========================================================================
``s``   a word, or a ``"double-quoted string"`` with ``\\n \\r \\\\ \\' \\"`` escapes
``B``   the same, naming a block device (its own "expected" message)
``F``   the same, naming a file
``S``   the rest of the line
``i``   an integer (32-bit); ``l`` a 64-bit one: decimal, ``0x`` hex, or ``0`` octal
``o``   a size; a bare number is in MiB, as in QEMU (``512k``, ``1G``)
``b``   ``on`` or ``off``
``-x``  the flag ``-x`` (a boolean); ``-xs`` a flag that takes a string value
======  ==========================================================================

A trailing ``?`` makes ``s B F S i l o`` optional. An optional word declared *before* required
ones is taken only when enough words remain for the required ones, which gives
``drive_add [addr] opts``: ``drive_add opts`` and ``drive_add 0 opts`` both work.

Output and errors use QEMU's texts: "unknown command: 'x'", "NAME: string expected",
"NAME: extraneous characters at the end of line", then "Try \\"help NAME\\" for more
information"; a handler's failure prints "Error: <message>".

A handler is ``handler(ctx, args) -> str | None``: the text to print ("\\n" line ends).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from pyfleece.errors import PyfleeceError

log = logging.getLogger(__name__)

#: An HMP command's implementation: ``handler(ctx, args) -> text to print, or None``.
HmpHandler = Callable[[Any, dict[str, Any]], "str | None"]


class HmpArgError(Exception):
    """An argument does not parse; the message is what the monitor prints."""


@dataclass(frozen=True)
class ArgSpec:
    key: str
    kind: str  # one of s B F S i l o b -
    optional: bool = False
    flag: str = ""  # for kind "-": the option letter
    flag_value: bool = False  # for kind "-": the option takes a string value


_ARG = re.compile(r"^([A-Za-z0-9_.-]+):(?:(-)([A-Za-z])(s?)|([sBFSilob])(\??))$")


def parse_args_type(args_type: str) -> tuple[ArgSpec, ...]:
    """Parses a declaration such as ``"force:-f,device:B,opts:s?"``.

    Raises:
        ValueError: the declaration is malformed (a programming error).
    """
    specs: list[ArgSpec] = []
    for item in filter(None, args_type.split(",")):
        match = _ARG.match(item)
        if match is None:
            raise ValueError(f"bad HMP argument declaration '{item}' in '{args_type}'")
        key, dash, letter, takes, kind, opt = match.groups()
        if dash:
            specs.append(ArgSpec(key, "-", True, letter, bool(takes)))
        else:
            specs.append(ArgSpec(key, kind, bool(opt)))
    return tuple(specs)


@dataclass
class HmpCommand:
    """One HMP command.

    Attributes:
        name: the name, with aliases after ``|`` (``"quit|q"``).
        args_type: the argument declaration (see the module docstring).
        params: how ``help`` shows the arguments (``"[-f] device"``).
        help: one line for ``help``.
        handler: the implementation; None only for a pure sub-table holder.
        table: sub-commands (``info``), chosen by the next word when there is one.
    """

    name: str
    args_type: str
    params: str
    help: str
    handler: HmpHandler | None = None
    table: HmpTable | None = None
    args: tuple[ArgSpec, ...] = field(init=False)

    def __post_init__(self) -> None:
        self.args = parse_args_type(self.args_type)

    def matches(self, word: str) -> bool:
        return word in self.name.split("|")

    def help_line(self, prefix: str = "") -> str:
        return f"{prefix}{self.name} {self.params} -- {self.help}\n"


class HmpTable:
    """Commands in the order ``help`` lists them."""

    def __init__(self) -> None:
        self._commands: list[HmpCommand] = []

    def __iter__(self) -> Iterator[HmpCommand]:
        return iter(list(self._commands))

    def add(self, command: HmpCommand) -> HmpCommand:
        """Adds a command, replacing any with the same name.

        Raises:
            ValueError: one of its names is already another command's.
        """
        for name in command.name.split("|"):
            other = self.find(name)
            if other is not None and other.name != command.name:
                raise ValueError(f"HMP command name '{name}' is already used by '{other.name}'")
        self._commands = [c for c in self._commands if c.name != command.name] + [command]
        return command

    def register(
        self, name: str, args_type: str, params: str, help: str, handler: HmpHandler
    ) -> HmpCommand:
        """Adds a command from its parts; see ``HmpCommand``."""
        return self.add(HmpCommand(name, args_type, params, help, handler))

    def find(self, word: str) -> HmpCommand | None:
        for command in self._commands:
            if command.matches(word):
                return command
        return None

    @property
    def info(self) -> HmpTable:
        """The ``info`` sub-table (created with the ``info`` command by core.py)."""
        command = self.find("info")
        if command is None or command.table is None:
            raise LookupError("this HMP table has no 'info' sub-table")
        return command.table


# -- the command line -------------------------------------------------------------------------

_ESCAPES = {"n": "\n", "r": "\r", "\\": "\\", "'": "'", '"': '"'}


def skip_spaces(text: str, pos: int) -> int:
    while pos < len(text) and text[pos].isspace():
        pos += 1
    return pos


def get_word(text: str, pos: int) -> tuple[str | None, int]:
    """Reads one word or quoted string at ``pos`` (after spaces); None when there is none
    or the quoting is broken."""
    pos = skip_spaces(text, pos)
    if pos >= len(text):
        return None, pos
    if text[pos] != '"':
        end = pos
        while end < len(text) and not text[end].isspace():
            end += 1
        return text[pos:end], end
    out: list[str] = []
    pos += 1
    while pos < len(text) and text[pos] != '"':
        if text[pos] == "\\":
            code = text[pos + 1] if pos + 1 < len(text) else ""
            if code not in _ESCAPES:
                log.debug("HMP: unsupported escape code '\\%s'", code)
                return None, pos
            out.append(_ESCAPES[code])
            pos += 2
        else:
            out.append(text[pos])
            pos += 1
    if pos >= len(text):
        log.debug("HMP: unterminated string")
        return None, pos
    return "".join(out), pos + 1


def split_words(text: str) -> list[str]:
    """The words of a line, quoting respected (stops at broken quoting)."""
    words: list[str] = []
    pos = 0
    while True:
        word, pos = get_word(text, pos)
        if word is None:
            return words
        words.append(word)


def execute_line(
    table: HmpTable,
    ctx: Any,
    line: str,
    describe_error: Callable[[BaseException], str] | None = None,
) -> str:
    """Parses and runs one command line; returns what the monitor prints."""
    found = _find_command(table, line, 0)
    if isinstance(found, str):
        return found
    command, pos = found
    name_end = pos
    while name_end > 0 and line[name_end - 1].isspace():
        name_end -= 1
    try:
        args = parse_arguments(command, line, pos)
    except HmpArgError as err:
        return f'{err}\nTry "help {line[:name_end].lstrip()}" for more information\n'
    if command.handler is None:
        return f'Command "{line[:name_end].lstrip()}" is not available.\n'
    try:
        return command.handler(ctx, args) or ""
    except Exception as err:  # the monitor keeps serving whatever a handler does
        if describe_error is not None:
            return f"Error: {describe_error(err)}\n"
        if not isinstance(err, PyfleeceError):
            log.error("HMP command %r failed unexpectedly", line, exc_info=err)
        return f"Error: {err}\n"


def _find_command(table: HmpTable, line: str, start: int) -> tuple[HmpCommand, int] | str:
    """The command a line names and where its arguments start, or the text to print."""
    pos = skip_spaces(line, start)
    if pos >= len(line):
        return ""  # an empty line does nothing
    end = pos
    while end < len(line) and line[end] != "/" and not line[end].isspace():
        end += 1
    command = table.find(line[pos:end])
    if command is None:
        return f"unknown command: '{line[:end]}'\n"
    rest = skip_spaces(line, end)
    if command.table is not None and rest < len(line):
        return _find_command(command.table, line, rest)
    return command, rest


def parse_arguments(command: HmpCommand, text: str, pos: int) -> dict[str, Any]:
    """Reads a command's arguments from ``text[pos:]`` by its declaration.

    Raises:
        HmpArgError: with QEMU's message for the first argument that does not parse.
    """
    args: dict[str, Any] = {}
    specs = command.args
    for index, spec in enumerate(specs):
        pos = skip_spaces(text, pos)
        at_end = pos >= len(text)
        if spec.kind == "-":
            pos = _parse_flag(command, spec, text, pos, args)
            continue
        if spec.optional and (at_end or _leave_for_later(specs[index + 1 :], text, pos)):
            continue
        pos = _READERS[spec.kind](command, spec, text, pos, args)
    if skip_spaces(text, pos) < len(text):
        raise HmpArgError(f"{command.name}: extraneous characters at the end of line")
    return args


def _leave_for_later(later: tuple[ArgSpec, ...], text: str, pos: int) -> bool:
    """Whether an optional word must be left to the required words declared after it."""
    required = sum(1 for s in later if not s.optional and s.kind in "sBFilob")
    if required == 0:
        return False
    return len(split_words(text[pos:])) <= required


def _parse_flag(
    command: HmpCommand, spec: ArgSpec, text: str, pos: int, args: dict[str, Any]
) -> int:
    if pos >= len(text) or text[pos] != "-":
        return pos
    letter = text[pos + 1] if pos + 1 < len(text) else ""
    if letter != spec.flag:
        if not any(s.kind == "-" and s.flag == letter for s in command.args):
            raise HmpArgError(f"{command.name}: unsupported option -{letter}")
        return pos  # another flag's turn
    pos += 2
    if not spec.flag_value:
        args[spec.key] = True
        return pos
    word, pos = get_word(text, pos)
    if word is None:
        raise HmpArgError(f"{command.name}: value expected for -{spec.flag}")
    args[spec.key] = word
    return pos


_WHAT = {"s": "string", "B": "block device name", "F": "filename"}


def _read_word(
    command: HmpCommand, spec: ArgSpec, text: str, pos: int, args: dict[str, Any]
) -> int:
    word, pos = get_word(text, pos)
    if word is None:
        raise HmpArgError(f"{command.name}: {_WHAT[spec.kind]} expected")
    args[spec.key] = word
    return pos


def _read_rest(
    command: HmpCommand, spec: ArgSpec, text: str, pos: int, args: dict[str, Any]
) -> int:
    if pos >= len(text):
        raise HmpArgError(f"{command.name}: string expected")
    args[spec.key] = text[pos:]
    return len(text)


_INT = re.compile(r"([+-]?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)")


def _read_int(command: HmpCommand, spec: ArgSpec, text: str, pos: int, args: dict[str, Any]) -> int:
    """A number as C's strtoull reads one (QEMU's expressions are not supported); what
    follows it is the next argument's business."""
    if pos >= len(text):
        raise HmpArgError("unexpected end of expression")
    match = _INT.match(text, pos)
    if match is None:
        raise HmpArgError(f"invalid char '{text[pos]}' in expression")
    sign, digits = match.groups()
    base = 16 if digits[:2] in ("0x", "0X") else 8 if digits.startswith("0") else 10
    value = int(digits, base) * (-1 if sign == "-" else 1)
    if spec.kind == "i" and (value >> 32) & 0xFFFFFFFF:  # as QEMU: negatives fail too
        raise HmpArgError(f"'{command.name}' has failed: integer is for 32-bit values")
    args[spec.key] = value
    return match.end()


_SIZE = re.compile(r"(\d+(?:\.\d+)?)([bBkKmMgGtTpPeE]?)$")
_SCALE = {"b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_SCALE |= {"p": 1 << 50, "e": 1 << 60, "": 1 << 20}


def _read_size(
    command: HmpCommand, spec: ArgSpec, text: str, pos: int, args: dict[str, Any]
) -> int:
    word, end = get_word(text, pos)
    match = _SIZE.match(word or "")
    if match is None:
        raise HmpArgError("invalid size")
    number, suffix = match.groups()
    value = int(float(number) * _SCALE[suffix.lower()])
    if value >= 1 << 63:
        raise HmpArgError("invalid size")
    args[spec.key] = value
    return end


def _read_bool(
    command: HmpCommand, spec: ArgSpec, text: str, pos: int, args: dict[str, Any]
) -> int:
    end = pos
    while end < len(text) and not text[end].isspace():
        end += 1
    if text[pos:end] not in ("on", "off"):
        raise HmpArgError("Expected 'on' or 'off'")
    args[spec.key] = text[pos:end] == "on"
    return end


_READERS: dict[str, Callable[[HmpCommand, ArgSpec, str, int, dict[str, Any]], int]] = {
    "s": _read_word,
    "B": _read_word,
    "F": _read_word,
    "S": _read_rest,
    "i": _read_int,
    "l": _read_int,
    "o": _read_size,
    "b": _read_bool,
}


def help_text(table: HmpTable, words: list[str], prefix: list[str] | None = None) -> str:
    """``help`` output: every command, or the one (or sub-table) the words name."""
    prefix = prefix or []
    if not words:
        lead = "".join(f"{p} " for p in prefix)
        return "".join(c.help_line(lead) for c in table)
    command = table.find(words[0])
    if command is None:
        return f"unknown command: '{' '.join([*prefix, words[0]])}'\n"
    if command.table is not None:
        return help_text(command.table, words[1:], [*prefix, words[0]])
    lead = "".join(f"{p} " for p in prefix)
    return command.help_line(lead)
