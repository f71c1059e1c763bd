"""``pyfleece img convert``: round trips that ``qemu-img compare`` calls identical, targets
that ``qemu-img check`` calls clean, and output as sparse as qemu-img's own.

Sources come from QEMU's tools (``sample_images``): raw with holes, qcow2 with every kind
of cluster, an overlay chain, and an overlay longer than its raw backing file.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.test_img_helpers import our_env, ours, qemu, qemu_ok, sample_images

SOURCES = ["raw.img", "base.qcow2", "top.qcow2", "over_raw.qcow2"]
QCOW2_OPTIONS = {
    "default": "",
    "v2-512": "cluster_size=512,compat=0.10",
    "2m-rb1": "cluster_size=2M,refcount_bits=1",
    "zstd-lazy": "compression_type=zstd,lazy_refcounts=on,cluster_size=4k",
}


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("img-convert")
    sample_images(d)
    return d


def convert(*args: str, cwd: Path) -> None:
    result = ours("convert", *args, cwd=cwd)
    assert (result.rc, result.err) == (0, ""), result


def identical(a: str, b: str, cwd: Path) -> bool:
    return qemu("qemu-img", "compare", a, b, cwd=cwd).rc == 0


def clean(image: str, cwd: Path) -> bool:
    return qemu("qemu-img", "check", image, cwd=cwd).rc == 0


def data_bytes(image: str, cwd: Path) -> int:
    entries = json.loads(qemu_ok("qemu-img", "map", "--output=json", image, cwd=cwd))
    return sum(e["length"] for e in entries if e["data"] and e["depth"] == 0)


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("options", list(QCOW2_OPTIONS))
def test_round_trip(images: Path, source: str, options: str) -> None:
    stem = f"{source.split('.')[0]}-{options}"
    extra = ["-o", QCOW2_OPTIONS[options]] if QCOW2_OPTIONS[options] else []
    convert("-O", "qcow2", *extra, source, f"{stem}.qcow2", cwd=images)
    assert clean(f"{stem}.qcow2", images)
    assert identical(source, f"{stem}.qcow2", images)
    convert("-O", "raw", f"{stem}.qcow2", f"{stem}.raw", cwd=images)
    assert identical(source, f"{stem}.raw", images)
    assert identical(f"{stem}.qcow2", f"{stem}.raw", images)


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_as_sparse_as_qemu_img(images: Path, source: str, fmt: str) -> None:
    """Zeros (holes, zero clusters, zeros written as data) are left out as qemu-img does."""
    qemu_ok("qemu-img", "convert", "-O", fmt, source, f"q-sparse.{fmt}", cwd=images)
    convert("-O", fmt, source, f"p-sparse.{fmt}", cwd=images)
    assert identical(f"q-sparse.{fmt}", f"p-sparse.{fmt}", images)
    if fmt == "qcow2":
        assert data_bytes(f"p-sparse.{fmt}", images) == data_bytes(f"q-sparse.{fmt}", images)
    else:
        ours_blocks = (images / f"p-sparse.{fmt}").stat().st_blocks
        assert ours_blocks <= (images / f"q-sparse.{fmt}").stat().st_blocks


def test_no_sparse_detection(images: Path) -> None:
    convert("-S", "0", "-O", "qcow2", "raw.img", "full.qcow2", cwd=images)
    assert identical("raw.img", "full.qcow2", images)
    assert data_bytes("full.qcow2", images) == 4 << 20


def test_backing_target_copies_the_top_only(images: Path) -> None:
    convert("-O", "qcow2", "-B", "base.qcow2", "-F", "qcow2", "top.qcow2", "b.qcow2", cwd=images)
    qemu_ok("qemu-img", "convert", "-O", "qcow2", "-B", "base.qcow2", "-F", "qcow2",
            "top.qcow2", "qb.qcow2", cwd=images)  # fmt: skip
    assert clean("b.qcow2", images)
    assert identical("top.qcow2", "b.qcow2", images)
    mine = json.loads(qemu_ok("qemu-img", "map", "--output=json", "b.qcow2", cwd=images))
    theirs = json.loads(qemu_ok("qemu-img", "map", "--output=json", "qb.qcow2", cwd=images))
    strip = [{k: v for k, v in e.items() if k != "offset"} for e in mine]
    assert strip == [{k: v for k, v in e.items() if k != "offset"} for e in theirs]


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_into_existing_target(images: Path, fmt: str) -> None:
    qemu_ok("qemu-img", "create", "-q", "-f", fmt, f"n.{fmt}", "8M", cwd=images)
    qemu_ok("qemu-io", "-f", fmt, "-c", "write -P 0x55 0 8M", f"n.{fmt}", cwd=images)
    convert("-n", "-O", fmt, "over_raw.qcow2", f"n.{fmt}", cwd=images)
    assert identical("over_raw.qcow2", f"n.{fmt}", images)
    if fmt == "qcow2":
        assert clean("n.qcow2", images)


def test_concatenates_sources(images: Path) -> None:
    convert("-O", "raw", "raw.img", "base.qcow2", "cat.raw", cwd=images)
    whole = (images / "cat.raw").read_bytes()
    first = (images / "raw.img").read_bytes()
    assert whole[: len(first)] == first
    qemu_ok("qemu-img", "convert", "-O", "raw", "base.qcow2", "base-only.raw", cwd=images)
    second = (images / "base-only.raw").read_bytes()
    assert whole[len(first) :] == second


def test_progress(images: Path) -> None:
    cmd = [sys.executable, "-m", "pyfleece", "img", "convert", "-p", "-O", "qcow2"]
    proc = subprocess.run(
        [*cmd, "top.qcow2", "prog.qcow2"], cwd=images, capture_output=True, env=our_env()
    )
    assert proc.returncode == 0
    assert proc.stdout.startswith(b"    (0.00/100%)\r")
    assert proc.stdout.endswith(b"    (100.00/100%)\r\n")
    quiet = ours("convert", "-p", "-q", "-O", "qcow2", "top.qcow2", "prog.qcow2", cwd=images)
    assert (quiet.rc, quiet.out) == (0, "")
