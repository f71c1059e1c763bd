"""Property: any sequence of write, write-zeroes, discard and flush through the qcow2 driver
leaves an image that reads as an in-memory model of those operations, that ``qemu-img
check`` finds clean and that ``qemu-img compare`` finds identical to the model."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyfleece.block.image import open_image
from tests.integration.qcow2_oracle import assert_clean, compare_raw, create, qemu_io

Op = tuple[str, int, int, int]


@dataclass
class Scenario:
    cluster_size: int
    compat: str
    refcount_bits: int
    backing: str | None  # None, "raw" or "qcow2"
    size: int
    backing_size: int
    ops: list[Op]


@st.composite
def offsets(draw: st.DrawFn, size: int, cs: int) -> int:
    """Offsets that favour cluster boundaries and their neighbours."""
    cluster = draw(st.integers(0, (size - 1) // cs))
    within = draw(st.sampled_from([0, 0, 1, 511, 512, cs // 2, cs - 1]) | st.integers(0, cs - 1))
    return min(cluster * cs + within, size - 1)


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    cs = draw(st.sampled_from([512, 4096, 65536]))
    compat = draw(st.sampled_from(["0.10", "1.1"]))
    refcount_bits = 16 if compat == "0.10" else draw(st.sampled_from([16, 16, 1, 64]))
    backing = draw(st.sampled_from([None, "raw", "qcow2"]))
    size = draw(st.integers(2, 20)) * cs + draw(st.sampled_from([0, 512, 1536]))
    backing_size = draw(st.integers(1, size // 512)) * 512
    ops: list[Op] = []
    for _ in range(draw(st.integers(1, 20))):
        kind = draw(st.sampled_from(["write", "write", "zero", "discard", "flush"]))
        if kind == "flush":
            ops.append(("flush", 0, 0, 0))
            continue
        offset = draw(offsets(size, cs))
        length = draw(st.integers(1, min(size - offset, 4 * cs)))
        if draw(st.booleans()) and offset % cs == 0:  # whole clusters, often to the end
            length = min(size - offset, draw(st.integers(1, 4)) * cs)
        arg = draw(st.integers(1, 255)) if kind == "write" else int(draw(st.booleans()))
        ops.append((kind, offset, length, arg))
    return Scenario(cs, compat, refcount_bits, backing, size, backing_size, ops)


def _make(root: Path, sc: Scenario) -> tuple[Path, bytearray]:
    model = bytearray(sc.size)
    kwargs = {}
    if sc.backing:
        pattern = bytes(range(1, 256)) * (sc.backing_size // 255 + 1)
        if sc.backing == "raw":
            (root / "b.raw").write_bytes(pattern[: sc.backing_size])
            model[: sc.backing_size] = pattern[: sc.backing_size]
        else:
            b = create(root / "b.qcow2", sc.backing_size, f"cluster_size={sc.cluster_size}")
            half = sc.backing_size // 2 // 512 * 512
            qemu_io(b, f"write -P 0x5a 0 {half}")
            model[:half] = b"\x5a" * half
        kwargs = {"backing": f"b.{sc.backing}", "backing_fmt": sc.backing}
    options = f"cluster_size={sc.cluster_size},compat={sc.compat}"
    if sc.compat == "1.1":
        options += f",refcount_bits={sc.refcount_bits}"
    return create(root / "t.qcow2", sc.size, options, **kwargs), model


def _discarded(sc: Scenario, offset: int, length: int) -> tuple[int, int]:
    """The range a discard turns into zeros: whole clusters (or the partial last one);
    nothing on a v2 image with a backing file, which QEMU refuses to expose."""
    cs, end = sc.cluster_size, offset + length
    start = -(-offset // cs) * cs
    stop = sc.size if end == sc.size else end // cs * cs
    if sc.compat == "0.10" and sc.backing:
        return 0, 0
    return start, max(start, stop)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(scenarios())
def test_operations_match_model(sc: Scenario) -> None:
    """The image equals the model of the operations, and QEMU agrees."""
    with tempfile.TemporaryDirectory() as tmp:
        image, model = _make(Path(tmp), sc)
        node = open_image(str(image), read_only=False)
        try:
            for kind, offset, length, arg in sc.ops:
                if kind == "write":
                    node.write(offset, bytes([arg]) * length)
                    model[offset : offset + length] = bytes([arg]) * length
                elif kind == "zero":
                    node.write_zeroes(offset, length, may_unmap=bool(arg))
                    model[offset : offset + length] = bytes(length)
                elif kind == "discard":
                    node.discard(offset, length)
                    start, stop = _discarded(sc, offset, length)
                    model[start:stop] = bytes(stop - start)
                else:
                    node.flush()
            assert node.read(0, sc.size) == model
        finally:
            node.close()
        assert_clean(image)
        compare_raw(image, bytes(model))
