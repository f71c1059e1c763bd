"""Property: any sequence of writes, write-zeroes and discards leaves the same cluster
states (``qemu-img map`` without host offsets) and the same contents whether qemu-io or our
driver applies it."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyfleece.block.image import open_image
from tests.integration.qcow2_oracle import (
    assert_clean,
    create,
    qemu_io,
    qemu_map,
    to_raw,
    without_offsets,
)

CS = 4096
Op = tuple[str, int, int, int]


@st.composite
def cases(draw: st.DrawFn) -> tuple[str, str | None, int, list[Op]]:
    compat = draw(st.sampled_from(["0.10", "1.1"]))
    backing = draw(st.sampled_from([None, "raw"]))
    size = draw(st.integers(2, 12)) * CS + draw(st.sampled_from([0, 512, 2048]))
    ops: list[Op] = []
    for _ in range(draw(st.integers(1, 12))):
        kind = draw(st.sampled_from(["write", "zero", "zero-unmap", "discard", "compressed"]))
        if kind == "compressed":  # qemu-io only: sets up compressed clusters for both
            cluster = draw(st.integers(0, size // CS - 1))
            ops.append((kind, cluster * CS, CS, draw(st.integers(1, 255))))
            continue
        sector = draw(st.integers(0, size // 512 - 1))
        offset = sector * 512 + draw(st.sampled_from([0, 0, 0, 100]))
        length = min(size - offset, draw(st.sampled_from([512, 1000, CS, 2 * CS, 3 * CS + 512])))
        ops.append((kind, offset, length, draw(st.integers(1, 255))))
    return compat, backing, size, ops


def _qemu_io(op: Op) -> str:
    kind, offset, length, pattern = op
    return {
        "write": f"write -P {pattern} {offset} {length}",
        "zero": f"write -z {offset} {length}",
        "zero-unmap": f"write -z -u {offset} {length}",
        "discard": f"discard {offset} {length}",
        "compressed": f"write -c -P {pattern} {offset} {length}",
    }[kind]


def _ours(path: Path, ops: list[Op]) -> None:
    node = open_image(str(path), read_only=False)
    try:
        for kind, offset, length, pattern in ops:
            if kind == "write":
                node.write(offset, bytes([pattern]) * length)
            elif kind.startswith("zero"):
                node.write_zeroes(offset, length, may_unmap=kind == "zero-unmap")
            elif kind == "discard":
                node.discard(offset, length)
    finally:
        node.close()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_same_cluster_states_as_qemu(case: tuple[str, str | None, int, list[Op]]) -> None:
    compat, backing, size, ops = case
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        kwargs = {}
        if backing:
            raw = create(root / "b.raw", size // 2 // 512 * 512, fmt="raw")
            qemu_io(raw, f"write -P 0x77 512 {min(CS, size // 2 // 512 * 512 - 512)}", fmt="raw")
            kwargs = {"backing": "b.raw", "backing_fmt": "raw"}
        base = create(root / "base.qcow2", size, f"cluster_size={CS},compat={compat}", **kwargs)
        # Compressed clusters can only be made by qemu-io: they go into the common base.
        # (qemu-io writes compressed data only to unallocated clusters: each cluster once)
        setup = list({op[1]: op for op in ops if op[0] == "compressed"}.values())
        if setup:
            qemu_io(base, *(_qemu_io(op) for op in setup))
        rest = [op for op in ops if op[0] != "compressed"]
        theirs, ours = root / "theirs.qcow2", root / "ours.qcow2"
        shutil.copyfile(base, theirs)
        shutil.copyfile(base, ours)
        if rest:
            qemu_io(theirs, *(_qemu_io(op) for op in rest))
        _ours(ours, rest)
        assert_clean(ours)
        assert to_raw(ours) == to_raw(theirs)
        assert without_offsets(qemu_map(ours)) == without_offsets(qemu_map(theirs))
