"""A qemu-io command interpreter over a block node, for HMP's ``qemu-io DEVICE "CMD"``.

Commands (and qemu-io's aliases): ``read``/``r``, ``write``/``w``, ``discard``/``d``,
``flush``/``f``, ``length``/``l``, ``help``/``?``; with qemu-io's options, checks, order of
checks and output lines (see qemuio_text.py for numbers and reports). Other qemu-io commands
answer 'command "X" not found'.

Where qemu-io writes to stderr (argument counts, unknown commands, getopt's complaints) the
text is part of the output here too, in the order it happens: an HMP client has no other
place to see it. Two more deliberate differences: a failed ``flush`` prints "flush failed: ..."
(qemu-io only sets its exit status), and ``length`` prints the node's exact size (qemu-io
rounds a raw file up to 512 bytes).

Requests past the end of the node fail with EIO ("read failed: Input/output error") as they
do in qemu-io, whose block backend checks them before any driver sees them.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from pyfleece.block.node import Node
from pyfleece.errors import BlockError
from pyfleece.monitor.qemuio_text import (
    MAX_REQUEST,
    ParseError,
    cvtnum,
    cvtstr,
    dump,
    getopt,
    parse_pattern,
    report,
)


@dataclass(frozen=True)
class QemuIoResult:
    """What a command printed, and whether qemu-io would have exited with success."""

    output: str
    ok: bool


class _Failed(Exception):
    """Ends a command: the message (possibly empty) is its last output."""


@dataclass(frozen=True)
class _Command:
    name: str
    alias: str
    argmin: int
    argmax: int  # -1: no limit
    args: str | None
    oneline: str
    help: str
    writes: bool


_COMMANDS = [
    _Command(
        "discard", "d", 2, -1, "[-Cq] off len",
        "discards a number of bytes at a specified offset",
        " Tells the node that the range's data is no longer needed.\n"
        " -C, -- report statistics in a machine parsable format\n"
        " -q, -- quiet mode, do not show I/O statistics\n",
        True,
    ),
    _Command("flush", "f", 0, 0, None, "flush all in-core file state to disk",
             " Makes every completed write durable.\n", False),
    _Command("help", "?", 0, 1, "[command]", "help for one or all commands", "", False),
    _Command("length", "l", 0, 0, None, "gets the length of the current file",
             " Prints the size of the node.\n", False),
    _Command(
        "read", "r", 2, -1, "[-abCqv] [-P pattern [-s off] [-l len]] off len",
        "reads a number of bytes at a specified offset",
        " Reads a range; -P checks that it holds the byte given (optionally only -l bytes\n"
        " from -s within it), -v dumps it.\n"
        " -C, -- report statistics in a machine parsable format\n"
        " -l, -- length for pattern verification (only with -P)\n"
        " -p, -- ignored for backwards compatibility\n"
        " -P, -- use a pattern to verify read data\n"
        " -q, -- quiet mode, do not show I/O statistics\n"
        " -s, -- start offset for pattern verification (only with -P)\n"
        " -v, -- dump buffer to standard output\n",
        False,
    ),
    _Command(
        "write", "w", 2, -1, "[-bcCfnquz] [-P pattern | -s source_file] off len",
        "writes a number of bytes at a specified offset",
        " Writes a range filled with a byte (0xcd unless -P says otherwise), with a file's\n"
        " contents (-s), or with zeroes (-z).\n"
        " -C, -- report statistics in a machine parsable format\n"
        " -f, -- use Force Unit Access semantics\n"
        " -n, -- with -z, don't allow slow fallback\n"
        " -p, -- ignored for backwards compatibility\n"
        " -P, -- use different pattern to fill file\n"
        " -q, -- quiet mode, do not show I/O statistics\n"
        " -s, -- use a pattern file to fill the write buffer\n"
        " -u, -- with -z, allow unmapping\n"
        " -z, -- write zeroes\n",
        True,
    ),
]  # fmt: skip


def _usage(cmd: _Command, typed: str | None = None) -> str:
    args = f"{cmd.args} " if cmd.args is not None else ""
    return f"{typed or cmd.name} {args}-- {cmd.oneline}\n"


class QemuIo:
    """Runs qemu-io command lines against one node."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self._out: list[str] = []
        self._handlers: dict[str, Callable[[_Command, list[str]], None]] = {
            "read": self._read,
            "write": self._write,
            "discard": self._discard,
            "flush": self._flush,
            "length": self._length,
            "help": self._help,
        }

    def run(self, line: str) -> QemuIoResult:
        """Runs one command line (words split on spaces, as qemu-io splits them)."""
        self._out = []
        words = [w for w in line.split(" ") if w]
        if not words:
            return QemuIoResult("", True)
        ok = True
        try:
            self._dispatch(words)
        except _Failed as failure:
            ok = False
            if str(failure):
                self._print(str(failure))
        return QemuIoResult("".join(self._out), ok)

    def _print(self, text: str) -> None:
        self._out.append(text if text.endswith("\n") else f"{text}\n")

    def _dispatch(self, words: list[str]) -> None:
        typed, args = words[0], words[1:]
        cmd = _find(typed)
        if cmd is None:
            raise _Failed(f'command "{typed}" not found')
        if len(args) < cmd.argmin or (cmd.argmax >= 0 and len(args) > cmd.argmax):
            if cmd.argmax < 0:
                expected = f"at least {cmd.argmin} arguments"
            elif cmd.argmin == cmd.argmax:
                expected = f"{cmd.argmin} arguments"
            else:
                expected = f"between {cmd.argmin} and {cmd.argmax} arguments"
            raise _Failed(f"bad argument count {len(args)} to {typed}, expected {expected}")
        if cmd.writes and self.node.read_only:
            raise _Failed("Block node is read-only")
        self._handlers[cmd.name](cmd, [typed, *args])

    # -- argument helpers ------------------------------------------------------------------

    def _parse(
        self,
        cmd: _Command,
        argv: list[str],
        optstring: str,
        on_option: Callable[[str, str], None] | None = None,
    ) -> tuple[dict[str, str | None], list[str]]:
        """Reads options and exactly two operands. Options are handled as they come (by
        ``on_option``), so the first problem reported is the first one qemu-io meets."""
        flags: dict[str, str | None] = {}
        operands: list[str] = []
        for letter, value in getopt(argv[0], argv[1:], optstring):
            if letter == "?":
                self._print(value or "")
                raise _Failed(_usage(cmd))
            if letter == "":
                operands.append(value or "")
                continue
            flags[letter] = value
            if on_option is not None and value is not None:
                on_option(letter, value)
        if len(operands) != 2:
            raise _Failed(_usage(cmd))
        return flags, operands

    def _number(self, text: str) -> int:
        try:
            value, warning = cvtnum(text)
        except ParseError as err:
            raise _Failed(str(err)) from None
        if warning:
            self._print(warning)
        return value

    @staticmethod
    def _pattern(text: str) -> int:
        try:
            return parse_pattern(text)
        except ParseError as err:
            raise _Failed(str(err)) from None

    def _check_range(self, offset: int, count: int, what: str) -> None:
        if offset + count > self.node.size:
            raise _Failed(f"{what} failed: {os.strerror(errno.EIO)}")

    # -- commands --------------------------------------------------------------------------

    def _read(self, cmd: _Command, argv: list[str]) -> None:
        values: dict[str, int] = {}

        def option(letter: str, value: str) -> None:
            values[letter] = self._pattern(value) if letter == "P" else self._number(value)

        flags, operands = self._parse(cmd, argv, "bCl:pP:qs:v", option)
        pattern, pattern_offset = values.get("P", 0), values.get("s", 0)
        offset = self._number(operands[0])
        count = self._number(operands[1])
        if count > MAX_REQUEST:
            raise _Failed(f"length cannot exceed {MAX_REQUEST}, given {operands[1]}")
        if "P" not in flags and ("l" in flags or "s" in flags):
            raise _Failed(_usage(cmd))
        pattern_count = values["l"] if "l" in flags else count - pattern_offset
        if pattern_count < 0 or pattern_count + pattern_offset > count:
            raise _Failed("pattern verification range exceeds end of read data")
        self._vmstate_check(flags, offset, count)
        start = time.perf_counter()
        self._check_range(offset, count, "read")
        data = self._io("read", lambda: self.node.read(offset, count))
        elapsed = time.perf_counter() - start
        failed = False
        if "P" in flags:
            window = data[pattern_offset : pattern_offset + pattern_count]
            if window != bytes([pattern]) * pattern_count:
                self._print(
                    f"Pattern verification failed at offset {offset + pattern_offset}, "
                    f"{pattern_count} bytes"
                )
                failed = True
        if "q" not in flags:
            if "v" in flags:
                self._print(dump(data, offset))
            self._print(report("read", elapsed, offset, count, machine="C" in flags))
        if failed:
            raise _Failed("")

    def _write(self, cmd: _Command, argv: list[str]) -> None:
        patterns: list[int] = []

        def option(letter: str, value: str) -> None:
            if letter == "P":
                patterns.append(self._pattern(value))

        flags, operands = self._parse(cmd, argv, "bcCfnpP:qs:uz", option)
        pattern = patterns[-1] if patterns else 0xCD
        if "b" in flags and "z" in flags:
            raise _Failed("-b and -z cannot be specified at the same time")
        if "f" in flags and "b" in flags:
            raise _Failed("-f and -b cannot be specified at the same time")
        if sum(1 for f in "zPs" if f in flags) > 1:
            raise _Failed("Only one of -z, -P, and -s can be specified at the same time")
        if "u" in flags and "z" not in flags:
            raise _Failed("-u requires -z to be specified")
        if "n" in flags and "z" not in flags:
            raise _Failed("-n requires -z to be specified")
        offset = self._number(operands[0])
        count = self._number(operands[1])
        if count > MAX_REQUEST and "n" not in flags:
            raise _Failed(f"length cannot exceed {MAX_REQUEST} without -n, given {operands[1]}")
        self._vmstate_check(flags, offset, count)
        data = b""
        if "z" not in flags:
            source = flags.get("s")
            data = self._from_file(source, count) if source else bytes([pattern]) * count
        start = time.perf_counter()
        self._check_range(offset, count, "write")
        if "c" in flags:
            raise _Failed(f"write failed: {os.strerror(errno.ENOTSUP)}")
        if "z" in flags:
            self._io(
                "write",
                lambda: self.node.write_zeroes(
                    offset, count, may_unmap="u" in flags, fua="f" in flags, fast="n" in flags
                ),
            )
        else:
            self._io("write", lambda: self.node.write(offset, data, fua="f" in flags))
        if "q" not in flags:
            self._print(report("wrote", time.perf_counter() - start, offset, count,
                               machine="C" in flags))  # fmt: skip

    def _discard(self, cmd: _Command, argv: list[str]) -> None:
        flags, operands = self._parse(cmd, argv, "Cq")
        offset = self._number(operands[0])
        count = self._number(operands[1])
        if count > MAX_REQUEST:
            raise _Failed(f"length cannot exceed {MAX_REQUEST}, given {operands[1]}")
        start = time.perf_counter()
        self._check_range(offset, count, "discard")
        self._io("discard", lambda: self.node.discard(offset, count))
        if "q" not in flags:
            self._print(report("discard", time.perf_counter() - start, offset, count,
                               machine="C" in flags))  # fmt: skip

    def _flush(self, cmd: _Command, argv: list[str]) -> None:
        self._io("flush", self.node.flush)

    def _length(self, cmd: _Command, argv: list[str]) -> None:
        self._print(cvtstr(self.node.size))

    def _help(self, cmd: _Command, argv: list[str]) -> None:
        if len(argv) == 1:
            listing = "".join(_usage(c) for c in _COMMANDS)
            self._print(f"{listing}\nUse 'help commandname' for extended help.")
            return
        wanted = _find(argv[1])
        if wanted is None:
            raise _Failed(f"command {argv[1]} not found")
        extra = f"\n{wanted.help}" if wanted.help else ""
        self._print(_usage(wanted, argv[1]) + extra)

    # -- shared steps ----------------------------------------------------------------------

    @staticmethod
    def _vmstate_check(flags: dict[str, str | None], offset: int, count: int) -> None:
        if "b" not in flags:
            return
        if offset % 512:
            raise _Failed(f"{offset} is not a sector-aligned value for 'offset'")
        if count % 512:
            raise _Failed(f"{count} is not a sector-aligned value for 'count'")
        raise _Failed(f"failed: {os.strerror(errno.ENOTSUP)}")  # we keep no VM state

    def _from_file(self, path: str, count: int) -> bytes:
        try:
            with open(path, "rb") as f:
                head = f.read(count)
        except OSError as err:
            raise _Failed(f"{path}: {os.strerror(err.errno or errno.EIO)}") from err
        if not head and count:
            raise _Failed(f"{path}: file is empty")
        return (head * (count // max(len(head), 1) + 1))[:count]

    def _io(self, what: str, operation: Callable[[], bytes | None]) -> bytes:
        try:
            return operation() or b""
        except BlockError as err:
            raise _Failed(f"{what} failed: {os.strerror(err.errno)}") from err


def _find(name: str) -> _Command | None:
    for cmd in _COMMANDS:
        if name in (cmd.name, cmd.alias):
            return cmd
    return None
