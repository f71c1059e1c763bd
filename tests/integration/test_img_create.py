"""Images made by ``pyfleece img create``: byte-identical to qemu-img's, and usable by QEMU.

The layout test compares whole files with qemu-img's for options that exercise every rule
of QEMU's allocator as creation meets it: one refcount block, refcount blocks placed past
a large L1 table, and a refcount table that must grow (small clusters, wide refcounts).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pyfleece.block.qcow2.create import CreateOptions, create_image, plan_image
from tests.integration.test_img_helpers import ours, qemu, qemu_ok

GiB = 1 << 30

LAYOUTS = {
    "default": CreateOptions(size=GiB),
    "zero-size": CreateOptions(size=0),
    "odd-size": CreateOptions(size=1000),
    "c512-growing-blocks": CreateOptions(size=GiB, cluster_size=512),
    "c512-rb64-growing-table": CreateOptions(size=16 * GiB, cluster_size=512, refcount_bits=64),
    "c1k-rb1": CreateOptions(size=64 << 20, cluster_size=1024, refcount_bits=1),
    "c4k-rb8": CreateOptions(size=100 * GiB, cluster_size=4096, refcount_bits=8),
    "c2m": CreateOptions(size=1 << 40, cluster_size=2 << 20),
    "v2": CreateOptions(size=GiB, version=2),
    "v2-c512": CreateOptions(size=256 << 20, version=2, cluster_size=512),
    "zstd-lazy": CreateOptions(size=GiB, compression_type="zstd", lazy_refcounts=True),
    "backing": CreateOptions(size=GiB, backing_file="b.raw", backing_format="raw"),
}


def _qemu_options(o: CreateOptions) -> str:
    opts = [
        f"cluster_size={o.cluster_size}",
        f"refcount_bits={o.refcount_bits}",
        f"compat={'1.1' if o.version == 3 else '0.10'}",
        f"compression_type={o.compression_type}",
        f"lazy_refcounts={'on' if o.lazy_refcounts else 'off'}",
    ]
    if o.backing_file:
        opts += [f"backing_file={o.backing_file}", f"backing_fmt={o.backing_format}"]
    return ",".join(opts)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_is_qemu_img_s(tmp_path: Path, name: str) -> None:
    opts = LAYOUTS[name]
    qemu_ok("qemu-img", "create", "-q", "-f", "raw", "b.raw", "1M", cwd=tmp_path)
    qemu_ok("qemu-img", "create", "-q", "-f", "qcow2", "-o", _qemu_options(opts), "q.qcow2",
            str(opts.size), cwd=tmp_path)  # fmt: skip
    create_image(str(tmp_path / "p.qcow2"), opts)
    theirs = (tmp_path / "q.qcow2").read_bytes()
    mine = (tmp_path / "p.qcow2").read_bytes()
    assert len(mine) == len(theirs) == plan_image(opts).file_size
    assert mine == theirs


CLUSTER_SIZES = [1 << bits for bits in range(9, 22)]


@pytest.mark.parametrize("cluster_size", CLUSTER_SIZES)
def test_created_image_works_in_qemu(tmp_path: Path, cluster_size: int) -> None:
    """qemu-img check is clean, qemu-img info is right, qemu-io writes and reads it."""
    made = ours("create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster_size}", "t.qcow2",
                "64M", cwd=tmp_path)  # fmt: skip
    assert (made.rc, made.out, made.err) == (0, "", "")
    assert qemu("qemu-img", "check", "t.qcow2", cwd=tmp_path).rc == 0
    info = json.loads(qemu_ok("qemu-img", "info", "--output=json", "t.qcow2", cwd=tmp_path))
    assert info["format"] == "qcow2"
    assert info["virtual-size"] == 64 << 20
    assert info["cluster-size"] == cluster_size
    assert info["format-specific"]["data"]["compat"] == "1.1"
    assert info["dirty-flag"] is False
    pattern = [("0x5a", 0, 3 * cluster_size + 17), ("0xa5", 40 << 20, 1 << 20)]
    for byte, offset, length in pattern:
        qemu_ok("qemu-io", "-c", f"write -P {byte} {offset} {length}", "t.qcow2", cwd=tmp_path)
    for byte, offset, length in pattern:
        out = qemu_ok("qemu-io", "-c", f"read -P {byte} {offset} {length}", "t.qcow2", cwd=tmp_path)
        assert "Pattern verification failed" not in out
    out = qemu_ok("qemu-io", "-c", f"read -P 0 {8 << 20} {1 << 20}", "t.qcow2", cwd=tmp_path)
    assert "Pattern verification failed" not in out
    assert qemu("qemu-img", "check", "t.qcow2", cwd=tmp_path).rc == 0


def test_size_from_backing_and_raw(tmp_path: Path) -> None:
    qemu_ok("qemu-img", "create", "-q", "-f", "raw", "b.raw", "5M", cwd=tmp_path)
    made = ours("create", "-f", "qcow2", "-b", "b.raw", "-F", "raw", "o.qcow2", cwd=tmp_path)
    assert made.rc == 0
    assert "size=5242880 backing_file=b.raw backing_fmt=raw" in made.out
    info = json.loads(qemu_ok("qemu-img", "info", "--output=json", "o.qcow2", cwd=tmp_path))
    assert (info["virtual-size"], info["backing-filename"]) == (5 << 20, "b.raw")
    assert info["backing-filename-format"] == "raw"
    raw = ours("create", "-q", "r.img", "1.5M", cwd=tmp_path)
    assert raw.rc == 0
    assert (tmp_path / "r.img").stat().st_size == 3 << 19
