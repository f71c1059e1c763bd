"""QEMU's command-line value syntax: dotted ``key=value`` lists and size suffixes.

``parse_keyval("driver=qcow2,file.driver=file,file.filename=a,,b.img")`` gives
``{"driver": "qcow2", "file": {"driver": "file", "filename": "a,b.img"}}``: a comma doubled is a
literal comma, dots nest, and keys made only of digits turn their level into a list (QAPI
arrays). A first item without ``=`` is the value of the command's implied key, as in
``--object tls-creds-x509,id=tls0``. ``parse_size`` reads ``512``, ``64k``, ``1.5G``.
"""

from __future__ import annotations

import re
from typing import Any

from pyfleece.errors import ConfigError

_SUFFIXES = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_SUFFIXES |= {"p": 1 << 50, "e": 1 << 60}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]?)\s*$")


def parse_size(text: str, what: str = "size") -> int:
    """Parses a byte count with an optional binary suffix (k, M, G, T, P, E).

    Raises:
        ConfigError: when the text is not a size.
    """
    match = _SIZE.match(text)
    if not match:
        raise ConfigError(f"Invalid {what} '{text}': expected a number with an optional suffix")
    number, suffix = match.groups()
    scale = _SUFFIXES.get(suffix.lower())
    if scale is None:
        raise ConfigError(f"Invalid {what} '{text}': unknown suffix '{suffix}'")
    if "." in number and scale == 1:
        raise ConfigError(f"Invalid {what} '{text}': fractions need a suffix")
    value = int(float(number) * scale) if "." in number else int(number) * scale
    if value >= 1 << 63:
        raise ConfigError(f"Invalid {what} '{text}': too large")
    return value


def split_items(text: str) -> list[str]:
    """Splits on single commas; a doubled comma is a literal one."""
    items: list[str] = []
    current: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == ",":
            if text.startswith(",,", i):
                current.append(",")
                i += 2
                continue
            items.append("".join(current))
            current = []
        else:
            current.append(ch)
        i += 1
    items.append("".join(current))
    return items


def parse_flat(text: str, implied_key: str | None = None) -> dict[str, str]:
    """Parses ``a=1,b.c=2`` into a flat dict, keys kept dotted.

    Raises:
        ConfigError: on an empty key, a repeated key, or an item without ``=``.
    """
    flat: dict[str, str] = {}
    if text == "":
        return flat
    for index, item in enumerate(split_items(text)):
        key, sep, value = item.partition("=")
        if not sep:
            if index == 0 and implied_key is not None:
                key, value = implied_key, item
            else:
                raise ConfigError(f"Expected '=' after parameter '{item}'")
        if not key:
            raise ConfigError(f"Invalid parameter '' in '{text}'")
        if key in flat:
            raise ConfigError(f"Parameter '{key}' is specified more than once")
        flat[key] = value
    return flat


def nest(flat: dict[str, str]) -> dict[str, Any]:
    """Turns dotted keys into nested dicts, and all-digit levels into lists.

    Raises:
        ConfigError: when a key is used both as a value and as a parent.
    """
    root: dict[str, Any] = {}
    for key, value in flat.items():
        parts = key.split(".")
        node = root
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"Parameter '{'.'.join(parts[: depth + 1])}' conflicts")
            node = child
        if parts[-1] in node:
            raise ConfigError(f"Parameter '{key}' conflicts with another")
        node[parts[-1]] = value
    nested = _listify(root)
    if not isinstance(nested, dict):
        raise ConfigError("Parameters must be named, not numbered")
    return nested


def _listify(value: Any) -> Any:
    if not isinstance(value, dict):
        return value
    converted = {k: _listify(v) for k, v in value.items()}
    if converted and all(k.isdigit() for k in converted):
        indexes = sorted(int(k) for k in converted)
        if indexes != list(range(len(indexes))):
            raise ConfigError("List indexes must be contiguous and start at 0")
        return [converted[str(i)] for i in indexes]
    return converted


def parse_keyval(text: str, implied_key: str | None = None) -> dict[str, Any]:
    """Parses QEMU keyval syntax into nested dicts (see the module docstring)."""
    nested: dict[str, Any] = nest(parse_flat(text, implied_key))
    return nested


def parse_json_or_keyval(text: str, implied_key: str | None = None) -> dict[str, Any]:
    """Accepts JSON (when the text starts with ``{``) or keyval, as ``--blockdev`` does.

    Raises:
        ConfigError: on invalid JSON, or JSON that is not an object.
    """
    import json  # here: the short-lived tools' start-up time counts

    if text.lstrip().startswith("{"):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"Invalid JSON: {err}") from err
        if not isinstance(value, dict):
            raise ConfigError("JSON value must be an object")
        return value
    return parse_keyval(text, implied_key)
