"""Argument validation: QEMU's messages (proved against qemu-storage-daemon by the
differential test), clean output, and the rules behind them."""

from __future__ import annotations

from typing import Any

import pytest

from pyfleece.errors import CommandError
from pyfleece.monitor.qapi.commands import DESCRIBED
from pyfleece.monitor.schema import (
    INT8,
    UINT16,
    Alternate,
    Array,
    Enum,
    FlatUnion,
    struct,
    validate,
)


def check(command: str, arguments: dict[str, Any]) -> dict[str, Any]:
    return validate(DESCRIBED[command].args, arguments)


def message(command: str, arguments: dict[str, Any]) -> str:
    with pytest.raises(CommandError) as info:
        check(command, arguments)
    assert info.value.error_class == "GenericError"
    return str(info.value)


def test_clean_output_keeps_only_what_was_given() -> None:
    args = {
        "driver": "qcow2",
        "node-name": "top",
        "file": {"driver": "file", "filename": "/a.qcow2"},
        "backing": None,
    }
    assert check("blockdev-add", args) == args
    assert check("blockdev-backup", {"device": "d", "target": "t", "sync": "none"}) == {
        "device": "d",
        "target": "t",
        "sync": "none",
    }
    # QEMU wraps negative numbers given for a uint64
    assert check("blockdev-add", {"driver": "null-co", "latency-ns": -1})["latency-ns"] == (
        (1 << 64) - 1
    )


@pytest.mark.parametrize(
    ("command", "arguments", "expected"),
    [
        ("blockdev-add", {}, "Parameter 'driver' is missing"),
        ("blockdev-add", {"driver": "qcow2", "file": {"driver": "file"}},
         "Parameter 'file.filename' is missing"),
        ("blockdev-add", {"driver": "file", "filename": "/x", "x": 1},
         "Parameter 'x' is unexpected"),
        ("blockdev-add", {"driver": "qcow2", "file": "n", "backing": 1},
         "Invalid parameter type for 'backing', expected: BlockdevRefOrNull"),
        ("blockdev-add", {"driver": "qcow2", "file": {"driver": "qcow2", "file": 1}},
         "Invalid parameter type for 'file', expected: BlockdevRef"),
        ("blockdev-add", {"driver": "nbd", "server": {"type": "inet", "host": "h", "port": "1",
                                                      "to": 70000}},
         "Parameter 'to' expects uint16_t"),
        ("blockdev-add", {"driver": "null-co", "latency-ns": 1.5},
         "Parameter 'latency-ns' expects uint64"),
        ("blockdev-add", {"driver": "null-co", "size": 1 << 63},
         "Invalid parameter type for 'size', expected: integer"),
        ("blockdev-add", {"driver": "null-co", "read-zeroes": 1},
         "Invalid parameter type for 'read-zeroes', expected: boolean"),
        ("blockdev-add", {"driver": "null-co", "size": True},
         "Invalid parameter type for 'size', expected: integer"),
        ("transaction", {"actions": [{"type": "blockdev-backup", "data": {"device": "a"}}]},
         "Parameter 'actions[0].data.sync' is missing"),
        ("transaction", {"actions": [{"type": "drive-backup", "data": {"device": "a",
                                      "target": "t", "sync": "bogus"}}]},
         "Parameter 'sync' does not accept value 'bogus'"),
        ("qmp_capabilities", {"enable": ["x"]}, "Parameter 'null' does not accept value 'x'"),
        ("qmp_capabilities", {"enable": [1]},
         "Invalid parameter type for 'enable[0]', expected: string"),
        ("block-export-add", {"type": "nbd", "id": "e", "node-name": "n", "bitmaps": [1]},
         "Invalid parameter type for 'null', expected: BlockDirtyBitmapOrStr"),
        ("nbd-server-start", {"addr": {"type": "unix"}}, "Parameter 'addr.data' is missing"),
        ("query-version", {"x": 1}, "Parameter 'x' is unexpected"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)  # fmt: skip
def test_qemu_messages(command: str, arguments: dict[str, Any], expected: str) -> None:
    assert message(command, arguments) == expected


def test_members_are_checked_in_schema_order_before_unexpected_ones() -> None:
    # 'device' comes before 'sync' in BackupCommon; unexpected members are reported last
    assert message("blockdev-backup", {"y": 1, "sync": "x"}) == "Parameter 'device' is missing"
    assert message("blockdev-backup", {"y": 1, "device": "d", "sync": "none", "target": "t"}) == (
        "Parameter 'y' is unexpected"
    )


def test_small_integer_ranges_and_alternate_choice() -> None:
    schema = struct(
        "T",
        {
            "*i8": INT8,
            "*u16": UINT16,
            "*alt": Alternate("Alt", (Enum("E", ("a", "b")), struct("S", {"k": UINT16}))),
            "*list": Array(INT8),
        },
    )
    assert validate(schema, {"i8": -128, "u16": 65535, "alt": "a", "list": [1]}) == {
        "i8": -128,
        "u16": 65535,
        "alt": "a",
        "list": [1],
    }
    for args, text in [
        ({"i8": 128}, "Parameter 'i8' expects int8_t"),
        ({"u16": -1}, "Parameter 'u16' expects uint16_t"),
        ({"alt": "c"}, "Parameter 'alt' does not accept value 'c'"),
        ({"alt": {"k": "x"}}, "Parameter 'alt.k' expects uint64"),
        ({"alt": 5}, "Invalid parameter type for 'alt', expected: Alt"),
        ({"list": [1, 300]}, "Parameter 'null' expects int8_t"),
    ]:
        with pytest.raises(CommandError, match="^" + text.replace("(", r"\(") + "$"):
            validate(schema, args)


def test_union_variant_follows_the_discriminator() -> None:
    union = FlatUnion(
        "U",
        base=struct("B", {"kind": Enum("K", ("x", "y", "z"))}),
        discriminator="kind",
        variants={"x": struct("X", {"a": INT8}), "y": struct("Y", {"*b": INT8})},
    )
    assert validate(union, {"kind": "y"}) == {"kind": "y"}
    assert validate(union, {"kind": "z"}) == {"kind": "z"}  # a tag without members
    with pytest.raises(CommandError, match="'a' is missing"):
        validate(union, {"kind": "x"})
    with pytest.raises(CommandError, match="'a' is unexpected"):
        validate(union, {"kind": "y", "a": 1})
    with pytest.raises(CommandError, match="expected: string"):
        validate(union, {"kind": {"not": "hashable"}})


def test_every_described_command_has_a_usable_schema() -> None:
    for name, spec in DESCRIBED.items():
        assert spec.name == name
        if spec.args is None:
            assert validate(None, {}) == {}
        else:
            with pytest.raises(CommandError):
                validate(spec.args, {"surely-not-a-member": 1})
