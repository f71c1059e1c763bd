"""qemu-io's textual conventions: how it reads numbers and options, and how it prints results.

Each function reproduces what qemu-io 7.2 does, measured with ``qemu-io -c`` (see
tests/integration/test_monitor_qemuio.py, which compares our lines with the real ones):

- sizes (``cvtnum``): decimal, or hex with ``0x``; an optional suffix ``b k m g t p e`` (any
  case, powers of 1024); a fraction needs a suffix other than ``b`` (``1.5k``, ``1.k``); more
  than 2^63-1 is "too large"; a suffix on a hex number works but earns a deprecation warning;
- pattern bytes (``parse_pattern``): C ``strtol`` base 0 (``0x..`` hex, ``0..`` octal), 0-255;
- options (``getopt``): GNU getopt, which permutes (``read 0 16 -v`` works) and takes ``-5`` for
  an option;
- reports: ``cvtstr`` ("64 KiB", "1.500 KiB", "512 bytes"), ``timestr`` ("00.00 sec"),
  ``dump`` (``-v``: offset, 16 hex bytes, then letters and digits, others as dots).
"""

from __future__ import annotations

import re
from collections.abc import Iterator

#: The largest request qemu-io issues (QEMU's BDRV_REQUEST_MAX_BYTES).
MAX_REQUEST = 2147483136

_SUFFIX = {"b": 0, "k": 10, "m": 20, "g": 30, "t": 40, "p": 50, "e": 60}
_DECIMAL = re.compile(r"(\d+)(?:\.(\d*))?([bkmgtpeBKMGTPE]?)")
_HEX = re.compile(r"0[xX]([0-9a-fA-F]+)([bkmgtpeBKMGTPE]?)")


class ParseError(Exception):
    """A value qemu-io would refuse; the message is the line it prints."""


def cvtnum(text: str) -> tuple[int, str | None]:
    """A byte count or offset, and a warning line to print first (or None).

    Raises:
        ParseError: "Parsing error: ..." as qemu-io words it.
    """
    warning = None
    hexmatch = _HEX.fullmatch(text)
    if hexmatch is not None:
        digits, suffix = hexmatch.groups()
        value = int(digits, 16) << _SUFFIX[suffix.lower()] if suffix else int(digits, 16)
        if suffix:
            warning = f"warning: Using a multiplier suffix on hex numbers is deprecated: {text}"
    else:
        match = _DECIMAL.fullmatch(text)
        if match is None:
            raise ParseError(_non_numeric(text))
        whole, fraction, suffix = match.groups()
        shift = _SUFFIX[suffix.lower()] if suffix else 0
        frac = float(f"0.{fraction}") if fraction else 0.0
        if shift == 0 and frac:
            raise ParseError(_non_numeric(text))  # no fractional bytes
        value = (int(whole) << shift) + int(frac * (1 << shift))
    if value > (1 << 63) - 1:
        raise ParseError(f"Parsing error: argument too large -- {text}")
    return value, warning


def _non_numeric(text: str) -> str:
    return f"Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- {text}"


_PATTERN = re.compile(r"\s*([+-]?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)")


def parse_pattern(text: str) -> int:
    """A ``-P`` byte.

    Raises:
        ParseError: "X is not a valid pattern byte".
    """
    match = _PATTERN.fullmatch(text)
    if match is not None:
        sign, digits = match.groups()
        base = 16 if digits[:2] in ("0x", "0X") else 8 if digits.startswith("0") else 10
        value = int(digits, base) * (-1 if sign == "-" else 1)
        if 0 <= value <= 255:
            return value
    raise ParseError(f"{text} is not a valid pattern byte")


def getopt(command: str, args: list[str], optstring: str) -> Iterator[tuple[str, str | None]]:
    """GNU getopt with permutation: yields (letter, value) for options in order, then
    ("", operand) for each operand; on an error yields ("?", message) and stops."""
    takes_value = {c for i, c in enumerate(optstring) if optstring[i + 1 : i + 2] == ":"}
    letters = set(optstring.replace(":", ""))
    operands: list[str] = []
    index = 0
    while index < len(args):
        arg = args[index]
        index += 1
        if arg == "--":
            operands.extend(args[index:])
            break
        if not arg.startswith("-") or arg == "-":
            operands.append(arg)
            continue
        pos = 1
        while pos < len(arg):
            letter = arg[pos]
            pos += 1
            if letter not in letters:
                yield "?", f"{command}: invalid option -- '{letter}'"
                return
            if letter not in takes_value:
                yield letter, None
                continue
            if pos < len(arg):
                yield letter, arg[pos:]
            elif index < len(args):
                yield letter, args[index]
                index += 1
            else:
                yield "?", f"{command}: option requires an argument -- '{letter}'"
                return
            break
    for operand in operands:
        yield "", operand


def cvtstr(value: float) -> str:
    """A byte count or rate for humans: "512 bytes", "64 KiB", "1.500 KiB"."""
    for shift, unit in ((60, "EiB"), (50, "PiB"), (40, "TiB"), (30, "GiB"), (20, "MiB")):
        if value >= 1 << shift:
            return _trim(f"{value / (1 << shift):.3f}", unit)
    if value >= 1 << 10:
        return _trim(f"{value / 1024:.3f}", "KiB")
    return _trim(f"{value:f}", "bytes")


def _trim(number: str, unit: str) -> str:
    cut = number.find(".000")
    return f"{number[:cut] if cut >= 0 else number} {unit}"


def timestr(seconds: float, *, fixed: bool = False) -> str:
    """Elapsed time: "00.12 sec" under a second, else "H:MM:SS.ss" (always, when fixed)."""
    whole = int(seconds)
    if not fixed and whole == 0:
        return f"{seconds:05.2f} sec"
    hours, rest = divmod(whole, 3600)
    minutes = rest // 60
    return f"{hours}:{minutes:02d}:{seconds - hours * 3600 - minutes * 60:05.2f}"


def report(op: str, seconds: float, offset: int, count: int, *, machine: bool) -> str:
    """The lines after a successful read/write/discard (one operation of ``count`` bytes)."""
    seconds = max(seconds, 1e-9)
    if machine:
        return f"{count},1,{timestr(seconds, fixed=True)},{count / seconds:.3f},{1 / seconds:.3f}\n"
    return (
        f"{op} {count}/{count} bytes at offset {offset}\n"
        f"{cvtstr(count)}, 1 ops; {timestr(seconds)} "
        f"({cvtstr(count / seconds)}/sec and {1 / seconds:.4f} ops/sec)\n"
    )


def dump(data: bytes, offset: int) -> str:
    """``read -v``: 16 bytes a line, hex then letters and digits (others shown as dots)."""
    lines = []
    for start in range(0, len(data), 16):
        chunk = data[start : start + 16]
        hexes = "".join(f"{b:02x} " for b in chunk)
        text = "".join(chr(b) if chr(b).isascii() and chr(b).isalnum() else "." for b in chunk)
        lines.append(f"{offset + start:08x}:  {hexes} {text}\n")
    return "".join(lines)
