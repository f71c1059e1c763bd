"""Argument validation against compact descriptions of QAPI types.

QMP checks every command's arguments against its schema before the command runs, and reports
the first problem with QEMU's wording (qmp-spec.rst, "Compatibility Considerations"). The types
here describe those schemas as Python objects; ``validate`` walks a JSON value against one and
returns the clean value the handler receives (absent optional members stay absent).

QEMU's messages, measured on qemu-storage-daemon 7.2, and the name each one uses — the *full*
name is the dotted path with list indexes (``actions[0].data.sync``), the *short* name is the
member's own name, or ``null`` for a list element:

==========================================  =========================================  =====
situation                                   message                                    name
==========================================  =========================================  =====
required member absent                      Parameter 'N' is missing                   full
member nobody expects                       Parameter 'N' is unexpected                full
wrong JSON type                             Invalid parameter type for 'N', expected: T full
enum value not in the enum                  Parameter 'N' does not accept value 'V'    short
int8..int32 out of range                    Parameter 'N' expects int32_t              short
uint64/size not an integer in range         Parameter 'N' expects uint64               full
uint8..uint32 out of range                  Parameter 'N' expects uint32_t             short
alternate given a JSON type it lacks        Invalid parameter type for 'N', expected:  short
                                            <alternate's name>
==========================================  =========================================  =====

Members are checked in schema order (a base's members first, then a union variant's), and
unexpected members only after all known ones; so the first message matches QEMU's whenever
there is a single problem. QEMU accepts a negative number for a ``uint64`` and wraps it modulo
2^64; so do we, to give the same answers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pyfleece.errors import CommandError


def _type_error(full: str, expected: str) -> CommandError:
    return CommandError(f"Invalid parameter type for '{full}', expected: {expected}")


class QType:
    """A QAPI type: knows how to check a JSON value and return the clean value."""

    name: str

    def check(self, value: Any, full: str, short: str) -> Any:
        raise NotImplementedError

    def json_kinds(self) -> frozenset[str]:
        """Which JSON kinds this type accepts, for choosing an alternate's branch."""
        raise NotImplementedError


@dataclass(frozen=True)
class Builtin(QType):
    """str, bool, number, any, null."""

    name: str
    kind: str  # "str", "bool", "number", "any", "null"

    def check(self, value: Any, full: str, short: str) -> Any:
        if self.kind == "any":
            return value
        if self.kind == "str" and isinstance(value, str):
            return value
        if self.kind == "bool" and isinstance(value, bool):
            return value
        if self.kind == "null" and value is None:
            return None
        if self.kind == "number" and _is_number(value):
            return float(value)
        expected = {"str": "string", "bool": "boolean"}.get(self.kind, self.kind)
        raise _type_error(full, expected)

    def json_kinds(self) -> frozenset[str]:
        kinds = {"str": {"str"}, "bool": {"bool"}, "null": {"null"}, "number": {"number"}}
        return frozenset(kinds.get(self.kind, {"str", "bool", "null", "number", "object", "array"}))


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class Integer(QType):
    """intN/uintN/size. ``bits`` 64 with ``signed`` is QAPI's ``int``."""

    name: str
    bits: int
    signed: bool

    def check(self, value: Any, full: str, short: str) -> Any:
        if self.signed:
            if not _is_int(value) or not -(1 << 63) <= value < (1 << 63):
                raise _type_error(full, "integer")
            low, high = -(1 << (self.bits - 1)), (1 << (self.bits - 1)) - 1
        else:
            if not _is_int(value) or not -(1 << 63) <= value < (1 << 64):
                raise CommandError(f"Parameter '{full}' expects uint64")
            value %= 1 << 64  # QEMU wraps negative numbers, for backward compatibility
            low, high = 0, (1 << self.bits) - 1
        if not low <= value <= high:
            ctype = f"{'' if self.signed else 'u'}int{self.bits}_t"
            raise CommandError(f"Parameter '{short}' expects {ctype}")
        return value

    def json_kinds(self) -> frozenset[str]:
        return frozenset({"number"})


@dataclass(frozen=True)
class Enum(QType):
    name: str
    values: tuple[str, ...]

    def check(self, value: Any, full: str, short: str) -> Any:
        if not isinstance(value, str):
            raise _type_error(full, "string")
        if value not in self.values:
            raise CommandError(f"Parameter '{short}' does not accept value '{value}'")
        return value

    def json_kinds(self) -> frozenset[str]:
        return frozenset({"str"})


@dataclass(frozen=True)
class Array(QType):
    element: QType
    name: str = "array"

    def check(self, value: Any, full: str, short: str) -> Any:
        if not isinstance(value, list):
            raise _type_error(full, "array")
        return [self.element.check(v, f"{full}[{i}]", "null") for i, v in enumerate(value)]

    def json_kinds(self) -> frozenset[str]:
        return frozenset({"array"})


@dataclass(frozen=True)
class Member:
    name: str
    type: QType
    optional: bool


def members(spec: Mapping[str, QType]) -> tuple[Member, ...]:
    """Members from a compact mapping: a leading ``*`` marks an optional member."""
    return tuple(Member(k.lstrip("*"), t, k.startswith("*")) for k, t in spec.items())


def _join(full: str, name: str) -> str:
    return f"{full}.{name}" if full else name


class ObjectType(QType):
    """A JSON object: a struct, or a flat union."""

    def member_list(self, value: Mapping[str, Any]) -> tuple[Member, ...]:
        """The members that apply to ``value`` (a union's depend on its discriminator)."""
        raise NotImplementedError

    def check(self, value: Any, full: str, short: str) -> Any:
        if not isinstance(value, dict):
            raise _type_error(full, "object")
        clean: dict[str, Any] = {}
        for member in self.member_list(value):
            if member.name in value:
                clean[member.name] = member.type.check(
                    value[member.name], _join(full, member.name), member.name
                )
            elif not member.optional:
                raise CommandError(f"Parameter '{_join(full, member.name)}' is missing")
        for key in value:
            if key not in clean:
                raise CommandError(f"Parameter '{_join(full, key)}' is unexpected")
        return clean

    def json_kinds(self) -> frozenset[str]:
        return frozenset({"object"})


@dataclass(frozen=True, eq=False)
class Struct(ObjectType):
    name: str
    own: tuple[Member, ...]
    base: Struct | None = None
    all_members: tuple[Member, ...] = field(init=False)

    def __post_init__(self) -> None:
        inherited = self.base.all_members if self.base is not None else ()
        object.__setattr__(self, "all_members", inherited + self.own)

    def member_list(self, value: Mapping[str, Any]) -> tuple[Member, ...]:
        return self.all_members


@dataclass(frozen=True, eq=False)
class FlatUnion(ObjectType):
    """A union whose variant is chosen by a base member (the discriminator), its members
    flattened into the same object (``BlockdevOptions`` on ``driver``)."""

    name: str
    base: Struct
    discriminator: str
    variants: Mapping[str, Struct]

    def member_list(self, value: Mapping[str, Any]) -> tuple[Member, ...]:
        # The discriminator is one of the base's members, checked in its turn before any
        # variant member; a bad value therefore fails before the variant matters.
        tag = value.get(self.discriminator)
        variant = self.variants.get(tag) if isinstance(tag, str) else None
        return self.base.all_members + (variant.all_members if variant else ())


@dataclass(frozen=True, eq=False)
class Alternate(QType):
    """One of several types, chosen by the JSON kind of the value (``BlockdevRef``)."""

    name: str
    branches: tuple[QType, ...]

    def check(self, value: Any, full: str, short: str) -> Any:
        kind = json_kind(value)
        for branch in self.branches:
            if kind in branch.json_kinds():
                return branch.check(value, full, short)
        raise _type_error(short or "null", self.name)

    def json_kinds(self) -> frozenset[str]:
        return frozenset().union(*(b.json_kinds() for b in self.branches))


@dataclass(frozen=True, eq=False)
class Deferred(QType):
    """A type defined further down, for recursive schemas (``BlockdevRef`` holds
    ``BlockdevOptions``, whose variants hold ``BlockdevRef``)."""

    name: str
    resolve: Callable[[], QType]

    def check(self, value: Any, full: str, short: str) -> Any:
        return self.resolve().check(value, full, short)

    def json_kinds(self) -> frozenset[str]:
        return self.resolve().json_kinds()


def json_kind(value: Any) -> str:
    """The JSON kind of a decoded value: object, array, str, number, bool, null."""
    if isinstance(value, dict):
        return "object"
    if isinstance(value, list):
        return "array"
    if isinstance(value, str):
        return "str"
    if isinstance(value, bool):
        return "bool"
    if value is None:
        return "null"
    return "number"


def struct(name: str, spec: Mapping[str, QType], base: Struct | None = None) -> Struct:
    """A struct from a compact mapping (``*name`` for optional members)."""
    return Struct(name, members(spec), base)


def validate(schema: ObjectType | None, arguments: Mapping[str, Any]) -> dict[str, Any]:
    """Checks a command's arguments; returns the clean dict the handler receives.

    A command without arguments (``schema`` None) accepts only an empty object.

    Raises:
        CommandError: GenericError with QEMU's wording for the first problem.
    """
    if schema is None:
        for key in arguments:
            raise CommandError(f"Parameter '{key}' is unexpected")
        return {}
    clean: dict[str, Any] = schema.check(dict(arguments), "", "")
    return clean


STR = Builtin("str", "str")
BOOL = Builtin("bool", "bool")
NUMBER = Builtin("number", "number")
ANY = Builtin("any", "any")
NULL = Builtin("null", "null")
INT = Integer("int", 64, True)
INT8 = Integer("int8", 8, True)
INT16 = Integer("int16", 16, True)
INT32 = Integer("int32", 32, True)
INT64 = Integer("int64", 64, True)
UINT8 = Integer("uint8", 8, False)
UINT16 = Integer("uint16", 16, False)
UINT32 = Integer("uint32", 32, False)
UINT64 = Integer("uint64", 64, False)
SIZE = Integer("size", 64, False)
