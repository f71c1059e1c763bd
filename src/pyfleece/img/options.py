"""Format options given with ``-o``, read the way qemu-img reads its create options.

``-o`` takes ``name=value`` items separated by commas (a doubled comma is a literal one);
repeated ``-o`` arguments add up. Each format lists the options it knows with a type:
sizes accept suffixes, numbers do not, booleans are ``on``/``off``; a name given alone
means ``on``. Type errors and unknown names are reported before anything is created, with
qemu-img's wording, and the "Formatting ..." line shows the options in qemu-img's order.
"""

from __future__ import annotations

from typing import NamedTuple

from pyfleece.img.common import Fail, strtosz
from pyfleece.keyval import split_items


class OptDesc(NamedTuple):
    name: str
    kind: str  # "size", "number", "bool" or "str"
    help: str
    default: str | None = None


QCOW2_OPTIONS = (
    OptDesc("backing_file", "str", "File name of a base image"),
    OptDesc("backing_fmt", "str", "Image format of the base image"),
    OptDesc("cluster_size", "size", "qcow2 cluster size", "65536"),
    OptDesc("compat", "str", "Compatibility level (v2 [0.10] or v3 [1.1])"),
    OptDesc(
        "compression_type", "str", "Compression method used for image cluster compression", "zlib"
    ),
    OptDesc("extended_l2", "bool", "Extended L2 tables", "off"),
    OptDesc("lazy_refcounts", "bool", "Postpone refcount updates", "off"),
    OptDesc("preallocation", "str", "Preallocation mode (allowed values: off)"),
    OptDesc("refcount_bits", "number", "Width of a reference count entry in bits", "16"),
    OptDesc("size", "size", "Virtual disk size"),
)

RAW_OPTIONS = (
    OptDesc("preallocation", "str", "Preallocation mode (allowed values: off, falloc, full)"),
    OptDesc("size", "size", "Virtual disk size"),
)

FORMAT_OPTIONS = {"qcow2": QCOW2_OPTIONS, "raw": RAW_OPTIONS}

#: The order in which qemu-img 7.2 prints a format's options on the "Formatting" line.
PRINT_ORDER = {
    "qcow2": (
        "cluster_size", "extended_l2", "preallocation", "compression_type", "size", "compat",
        "backing_file", "backing_fmt", "lazy_refcounts", "refcount_bits",
    ),
    "raw": ("size", "preallocation"),
}  # fmt: skip

SIZE_HINT = (
    "Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n"
    "and exabytes, respectively."
)


def valid_option_list(text: str) -> bool:
    """qemu-img refuses an empty list, a leading comma and a single trailing comma."""
    if not text or text.startswith(","):
        return False
    trailing = len(text) - len(text.rstrip(","))
    return trailing % 2 == 0


def check_option_list(text: str) -> None:
    """Raises Fail("Invalid option list: ...") for a malformed ``-o`` argument."""
    if not valid_option_list(text):
        raise Fail(f"Invalid option list: {text}")


def wants_help(text: str) -> bool:
    return any(item in ("help", "?") for item in split_items(text)) if text else False


def help_text(fmt: str) -> str:
    lines = [f"Supported {fmt} options:"]
    for desc in FORMAT_OPTIONS[fmt]:
        kind = {"bool": "bool (on/off)"}.get(desc.kind, desc.kind)
        if desc.kind == "number":
            kind = "num"
        label = f"{desc.name}=<{kind}>"
        lines.append(f"  {label:<22} - {desc.help}")
    lines.append("")
    return "\n".join(lines) + "\n"


class FormatOpts:
    """Options given for one format: raw text (for printing) and typed values."""

    def __init__(self, fmt: str, text: dict[str, str], values: dict[str, int | bool | str]) -> None:
        self.fmt = fmt
        self.text = text
        self.values = values

    def get(self, name: str, default: int | bool | str | None = None) -> int | bool | str | None:
        return self.values.get(name, default)

    def set(self, name: str, value: int | str) -> None:
        self.text[name] = str(value)
        self.values[name] = value

    def formatting_line(self) -> str:
        """The options part of "Formatting 'x', fmt=... <options>"."""
        descs = {d.name: d for d in FORMAT_OPTIONS[self.fmt]}
        parts = []
        for name in PRINT_ORDER[self.fmt]:
            desc = descs[name]
            if name in self.values and desc.kind in ("size", "number"):
                parts.append(f"{name}={self.values[name]}")
            elif name in self.text:
                shown = self.text[name]
                parts.append(f"{name}={shown.replace(',', ',,') if desc.kind == 'str' else shown}")
            elif desc.default is not None:
                parts.append(f"{name}={desc.default}")
        return " ".join(parts)


def parse_format_options(fmt: str, text: str, where: str) -> FormatOpts:
    """Parses ``-o`` text against the options ``fmt`` knows.

    Raises:
        Fail: an unknown option or a value of the wrong type, prefixed with ``where``.
    """
    descs = {d.name: d for d in FORMAT_OPTIONS[fmt]}
    where = f"{where}: " if where else ""
    opts = FormatOpts(fmt, {}, {})
    if not text:
        return opts
    for item in split_items(text):
        name, sep, value = item.partition("=")
        if not sep:
            value = "on"
        desc = descs.get(name)
        if desc is None:
            raise Fail(f"{where}Invalid parameter '{name}'")
        opts.text[name] = value
        opts.values[name] = _typed(desc, value, where)
    return opts


def _typed(desc: OptDesc, value: str, where: str) -> int | bool | str:
    if desc.kind == "size":
        number = strtosz(value)
        if number is None or number < 0:
            raise Fail(
                f"{where}Parameter '{desc.name}' expects a non-negative number below 2^64",
                hint=SIZE_HINT,
            )
        return number
    if desc.kind == "number":
        try:
            return int(value, 0)
        except ValueError:
            raise Fail(f"{where}Parameter '{desc.name}' expects a number") from None
    if desc.kind == "bool":
        if value not in ("on", "off", "true", "false", "yes", "no"):
            raise Fail(f"{where}Parameter '{desc.name}' expects 'on' or 'off'")
        return value in ("on", "true", "yes")
    return value


def without(text: str, name: str) -> str:
    """The ``-o`` text with option ``name`` left out (commas re-escaped)."""
    items = [i for i in split_items(text) if i.partition("=")[0] != name] if text else []
    return ",".join(item.replace(",", ",,") for item in items)
