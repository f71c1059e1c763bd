"""Writes, write-zeroes and discards through our driver leave exactly the cluster states
QEMU 7.2 leaves for the same operations (compared with ``qemu-img map``), the same guest
contents, and an image ``qemu-img check`` finds clean; qemu-io then reads and writes it."""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import pytest

from pyfleece.block.image import open_image
from tests.integration.qcow2_oracle import (
    assert_clean,
    create,
    info,
    qemu_io,
    qemu_map,
    run,
    to_raw,
    without_offsets,
)

CS = 4096
SIZE = 8 * CS + 1536  # the last cluster is partial

# The base image, cluster by cluster: 0 unallocated, 1 data, 2 zero, 3 zero with a host
# cluster (v3), 4 compressed, 5 data, 6 unallocated, 7 data, 8 partial data.
BASE_OPS = [
    f"write -P 0x11 {CS} {CS}",
    f"write -z {2 * CS} {CS}",
    f"write -P 0x13 {3 * CS} {CS}",
    f"write -z {3 * CS} {CS}",
    f"write -c -P 0x14 {4 * CS} {CS}",
    f"write -P 0x15 {5 * CS} {CS}",
    f"write -P 0x17 {7 * CS} {CS}",
    f"write -P 0x18 {8 * CS} 1536",
]

# (name, operations): each as (op, offset, length, pattern / may-unmap)
SCENARIOS: list[tuple[str, list[tuple[str, int, int, int]]]] = [
    ("zero-all", [("zero", 0, SIZE, 0)]),
    ("zero-unmap-all", [("zero", 0, SIZE, 1)]),
    ("discard-all", [("discard", 0, SIZE, 0)]),
    ("discard-unaligned", [("discard", 100, 3 * CS, 0), ("discard", 6 * CS + 1, 2 * CS, 0)]),
    ("discard-tail", [("discard", 8 * CS, 1536, 0)]),
    ("zero-partial-each", [("zero", k * CS + 512, 1024, k % 2) for k in range(9)]),
    ("zero-tail", [("zero", SIZE - 700, 700, 0)]),
    ("write-partial-each", [("write", k * CS + 512, 1024, 0x30 + k) for k in range(9)]),
    ("write-whole-each", [("write", k * CS, CS, 0x40 + k) for k in range(8)]),
    ("write-across", [("write", CS // 2, 7 * CS, 0x50)]),
    ("mixed", [("discard", 0, 4 * CS, 0), ("write", 100, 9000, 0x61), ("zero", CS, 2 * CS, 1)]),
]


def _as_qemu_io(op: tuple[str, int, int, int]) -> str:
    kind, offset, length, arg = op
    if kind == "write":
        return f"write -P {arg:#x} {offset} {length}"
    if kind == "zero":
        return f"write -z {'-u ' if arg else ''}{offset} {length}"
    return f"discard {offset} {length}"


def _apply(path: Path, ops: list[tuple[str, int, int, int]]) -> None:
    node = open_image(str(path), read_only=False)
    try:
        for op in ops:
            kind, offset, length, arg = op
            if kind == "write":
                node.write(offset, bytes([arg]) * length)
            elif kind == "zero":
                node.write_zeroes(offset, length, may_unmap=bool(arg))
            else:
                node.discard(offset, length)
    finally:
        node.close()


@pytest.fixture(params=["v2", "v3", "v2-backing", "v3-backing"])
def base(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    version, _, backing = request.param.partition("-")
    compat = "0.10" if version == "v2" else "1.1"
    kwargs = {}
    if backing:
        raw = create(tmp_path / "b.raw", SIZE - 2 * CS, fmt="raw")
        qemu_io(raw, f"write -P 0x77 0 {3 * CS}", f"write -P 0x78 {5 * CS} 100", fmt="raw")
        kwargs = {"backing": "b.raw", "backing_fmt": "raw"}
    image = create(tmp_path / "base.qcow2", SIZE, f"cluster_size={CS},compat={compat}", **kwargs)
    qemu_io(image, *(op for op in BASE_OPS if compat == "1.1" or "-z" not in op))
    return image


@pytest.mark.parametrize(("name", "ops"), SCENARIOS, ids=[s[0] for s in SCENARIOS])
def test_same_result_as_qemu(base: Path, name: str, ops: list[tuple[str, int, int, int]]) -> None:
    theirs = base.with_name("theirs.qcow2")
    ours = base.with_name("ours.qcow2")
    shutil.copyfile(base, theirs)
    shutil.copyfile(base, ours)
    qemu_io(theirs, *(_as_qemu_io(op) for op in ops))
    _apply(ours, ops)
    assert_clean(ours)
    assert to_raw(ours) == to_raw(theirs)
    assert without_offsets(qemu_map(ours)) == without_offsets(qemu_map(theirs))


@pytest.mark.parametrize("cs", [512, 65536, 2 << 20], ids=["cs512", "cs64k", "cs2M"])
def test_qemu_io_reads_and_writes_what_we_wrote(tmp_path: Path, cs: int) -> None:
    size = 8 * cs
    image = create(tmp_path / "t.qcow2", size, f"cluster_size={cs}")
    node = open_image(str(image), read_only=False)
    try:
        node.write(cs // 2, b"\x21" * cs)
        node.write(3 * cs, b"\x22" * (2 * cs))
        node.write_zeroes(3 * cs, cs)
    finally:
        node.close()
    assert_clean(image)
    facts = info(image)
    assert (facts["format"], facts["virtual-size"], facts["cluster-size"]) == ("qcow2", size, cs)
    assert facts["dirty-flag"] is False
    assert facts["format-specific"]["data"]["corrupt"] is False
    qemu_io(
        image,
        f"read -P 0x21 {cs // 2} {cs}",
        f"read -P 0 {3 * cs} {cs}",
        f"read -P 0x22 {4 * cs} {cs}",
        f"write -P 0x23 {6 * cs} {cs}",
    )
    assert_clean(image)
    node = open_image(str(image))
    try:
        assert node.read(6 * cs, cs) == b"\x23" * cs
        assert node.read(4 * cs, cs) == b"\x22" * cs
    finally:
        node.close()


def test_fua_and_flush_leave_a_clean_image_while_open(tmp_path: Path) -> None:
    """After a flush (or a FUA write) the image on disk is consistent even though the node
    stays open, and holds what was written."""
    image = create(tmp_path / "t.qcow2", 4 << 20, "cluster_size=65536")
    node = open_image(str(image), read_only=False)
    try:
        node.write(0, b"\x31" * 100000, fua=True)
        assert_clean(image, leaks_allowed=True, shared=True)
        qemu_io(image, "read -P 0x31 0 100000", shared=True)
        node.write(1 << 20, b"\x32" * 70000)
        node.discard(0, 65536)
        node.flush()
        assert_clean(image, leaks_allowed=True, shared=True)
        qemu_io(image, "read -P 0 0 65536", "read -P 0x32 1M 70000", shared=True)
    finally:
        node.close()
    assert_clean(image)


@pytest.mark.parametrize("options", ["cluster_size=65536", "cluster_size=512", "compat=0.10"])
def test_writes_leave_internal_snapshots_intact(tmp_path: Path, options: str) -> None:
    """Clusters and L2 tables shared with a snapshot (refcount 2) are copied before they
    change: the image is clean, reads our writes, and reverting to the snapshot gives back
    exactly what it held."""
    size = 4 << 20
    image = create(tmp_path / "s.qcow2", size, options)
    qemu_io(image, "write -P 1 0 1M", "write -c -P 2 1M 256k", "write -P 3 3M 128k")
    if "compat=0.10" not in options:
        qemu_io(image, "write -z 2M 64k", "write -z 3M 64k")
    snapshot = to_raw(image)
    run("qemu-img", "snapshot", "-c", "s1", str(image))
    ops = [
        ("write", 100, 300000, 0x21),
        ("zero", 1 << 20, 100000, 0),
        ("zero", 3 << 20, 65536, 1),
        ("discard", 512 << 10, 1 << 20, 0),
        ("write", (2 << 20) - 7, 70000, 0x22),
    ]
    _apply(image, ops)
    theirs = tmp_path / "theirs.raw"
    theirs.write_bytes(snapshot)
    qemu_io(theirs, *(_as_qemu_io(op) for op in ops), fmt="raw")
    assert_clean(image)
    assert to_raw(image) == theirs.read_bytes()
    run("qemu-img", "snapshot", "-a", "s1", str(image))
    assert_clean(image)
    assert to_raw(image) == snapshot


def test_refcount_table_grows(tmp_path: Path) -> None:
    """512-byte clusters with 64-bit refcounts: one refcount table cluster covers 2 MiB of
    file, so writing 6 MiB moves the table (and adds self-describing refcount blocks)."""
    image = create(tmp_path / "g.qcow2", 8 << 20, "cluster_size=512,refcount_bits=64")
    before = struct.unpack(">QI", image.read_bytes()[48:60])
    data = bytes(range(256)) * (6 << 12)
    node = open_image(str(image), read_only=False)
    try:
        for i in range(0, len(data), 1 << 20):
            node.write(i, data[i : i + (1 << 20)])
            node.flush()
            assert_clean(image, leaks_allowed=True, shared=True)
    finally:
        node.close()
    after = struct.unpack(">QI", image.read_bytes()[48:60])
    assert after[1] > before[1] and after[0] != before[0]
    assert_clean(image)
    assert to_raw(image)[: len(data)] == data
