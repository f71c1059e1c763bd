"""Typing command-line keyval values by a command's schema, as QEMU's keyval visitor does.

``--blockdev driver=qcow2,read-only=on,file.driver=file,...`` arrives as strings; the same
options over QMP are typed JSON. Walking the schema turns ``"on"`` into ``True`` where a bool
is expected, ``"64k"`` into 65536 where a size is, ``"null"`` into None where an alternate
allows null (``backing=null``), and leaves everything else for ``validate`` to judge, so the
command line gets exactly QMP's checks and messages.
"""

from __future__ import annotations

from typing import Any

from pyfleece.errors import ConfigError
from pyfleece.keyval import parse_size
from pyfleece.monitor.schema import (
    Alternate,
    Array,
    Builtin,
    Deferred,
    FlatUnion,
    Integer,
    ObjectType,
    QType,
    Struct,
    json_kind,
)

_TRUE = ("on", "yes", "true", "y")
_FALSE = ("off", "no", "false", "n")


def typed_arguments(schema: ObjectType | None, arguments: dict[str, Any]) -> dict[str, Any]:
    """Returns ``arguments`` with keyval strings converted to the schema's types."""
    if schema is None:
        return dict(arguments)
    typed = _typed(schema, arguments, "")
    return typed if isinstance(typed, dict) else dict(arguments)


def _typed(qtype: QType, value: Any, path: str) -> Any:
    if isinstance(qtype, Deferred):
        return _typed(qtype.resolve(), value, path)
    if isinstance(qtype, ObjectType):
        return _object(qtype, value, path) if isinstance(value, dict) else value
    if isinstance(qtype, Array):
        if isinstance(value, list):
            return [_typed(qtype.element, v, f"{path}[{i}]") for i, v in enumerate(value)]
        return value
    if isinstance(qtype, Alternate):
        return _alternate(qtype, value, path)
    if not isinstance(value, str):
        return value
    if isinstance(qtype, Integer):
        return _integer(qtype, value, path)
    if isinstance(qtype, Builtin):
        return _builtin(qtype, value, path)
    return value


def _object(qtype: ObjectType, value: dict[str, Any], path: str) -> dict[str, Any]:
    if isinstance(qtype, FlatUnion):
        members = qtype.member_list(value)
    elif isinstance(qtype, Struct):
        members = qtype.all_members
    else:
        members = qtype.member_list(value)
    by_name = {m.name: m for m in members}
    out: dict[str, Any] = {}
    for key, item in value.items():
        member = by_name.get(key)
        sub = f"{path}.{key}" if path else key
        out[key] = _typed(member.type, item, sub) if member is not None else item
    return out


def _alternate(qtype: Alternate, value: Any, path: str) -> Any:
    kind = json_kind(value)
    if kind == "str" and value == "null" and "null" in qtype.json_kinds():
        return None  # QEMU's keyval visitor reads "null" as null where null is allowed
    for branch in qtype.branches:
        if kind in branch.json_kinds():
            return _typed(branch, value, path)
    return value


def _integer(qtype: Integer, value: str, path: str) -> int:
    try:
        if qtype.name == "size":
            return parse_size(value, f"value for '{path}'")
        return int(value, 0)
    except (ValueError, ConfigError) as err:
        raise ConfigError(f"Parameter '{path}' expects {_expects(qtype)}") from err


def _expects(qtype: Integer) -> str:
    if qtype.name == "size":
        return "a size value"
    return "an integer" if qtype.signed else "a non-negative integer"


def _builtin(qtype: Builtin, value: str, path: str) -> Any:
    if qtype.kind == "bool":
        lowered = value.lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        raise ConfigError(f"Parameter '{path}' expects 'on' or 'off'")
    if qtype.kind == "number":
        try:
            return float(value)
        except ValueError as err:
            raise ConfigError(f"Parameter '{path}' expects a number") from err
    if qtype.kind == "null" and value in ("null", ""):
        return None
    return value
