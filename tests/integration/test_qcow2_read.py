"""Every kind of image qemu-img makes reads back through our qcow2 driver byte for byte as
``qemu-img convert -O raw`` reads it, and our block status matches ``qemu-img map``."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pyfleece.block.image import open_image
from tests.integration.qcow2_oracle import (
    create,
    our_map,
    qemu_io,
    qemu_map,
    run,
    to_raw,
)

CLUSTER_SIZES = [512, 4096, 65536, 2 << 20]


def _fill(path: Path, cs: int, size: int, *, compat: str) -> None:
    """qemu-io patterns that leave every kind of cluster behind (the story, as data)."""
    ops = [
        f"write -P 0x11 {cs // 2} {cs}",  # sub-cluster, across a cluster boundary
        f"write -P 0x22 {3 * cs} {2 * cs}",  # whole clusters
        f"write -z {4 * cs} {cs}",  # zeroes an allocated cluster (v3: keeps it)
        f"write -P 0x33 {5 * cs} {cs}",
        f"write -z -u {5 * cs} {cs}",  # zeroes and unmaps
        f"discard {3 * cs} {cs}",  # discards an allocated cluster
        f"write -c -P 0x44 {7 * cs} {cs}",  # compressed
        f"write -P 0x55 {9 * cs + 100} 1000",  # unaligned, inside one cluster
        f"write -z {10 * cs + 512} 512",  # partial zeroing of an unallocated cluster
        f"write -P 0x66 {size - 700} 700",  # the partial last cluster
    ]
    qemu_io(path, *ops)


def _size(cs: int) -> int:
    return 12 * cs + 3 * 512


def _assert_reads_like_qemu(path: Path) -> None:
    node = open_image(str(path))
    try:
        assert node.driver == "qcow2"
        assert node.read(0, node.size) == to_raw(path)
        assert our_map(node) == qemu_map(path)
    finally:
        node.close()


@pytest.mark.parametrize("compat", ["0.10", "1.1"])
@pytest.mark.parametrize("cs", CLUSTER_SIZES, ids=[f"cs{c}" for c in CLUSTER_SIZES])
def test_standalone_images(tmp_path: Path, cs: int, compat: str) -> None:
    size = _size(cs)
    image = create(tmp_path / "t.qcow2", size, f"cluster_size={cs},compat={compat}")
    _fill(image, cs, size, compat=compat)
    _assert_reads_like_qemu(image)


@pytest.mark.parametrize("compat", ["0.10", "1.1"])
@pytest.mark.parametrize("cs", [512, 65536], ids=["cs512", "cs64k"])
def test_chain_raw_qcow2_qcow2_relative_names(tmp_path: Path, cs: int, compat: str) -> None:
    """raw <- qcow2 <- qcow2 across directories, each backing named relative to its image;
    the backing files are shorter than the images above them."""
    (tmp_path / "base").mkdir()
    (tmp_path / "mid").mkdir()
    (tmp_path / "top").mkdir()
    size = 16 * cs
    base = create(tmp_path / "base" / "b.raw", size // 4, fmt="raw")
    qemu_io(base, f"write -P 0x01 0 {size // 4}", f"write -z {cs} {cs}", fmt="raw")
    mid = create(
        tmp_path / "mid" / "m.qcow2",
        size // 2,
        f"cluster_size={cs},compat={compat}",
        backing="../base/b.raw",
        backing_fmt="raw",
    )
    qemu_io(mid, f"write -P 0x02 {cs // 2} {cs}", f"write -P 0x03 {5 * cs} {cs}")
    qemu_io(mid, f"write -z {2 * cs} {cs}", f"discard {5 * cs} {cs}")
    top = create(
        tmp_path / "top" / "t.qcow2",
        size,
        f"cluster_size={cs},compat={compat}",
        backing="../mid/m.qcow2",
        backing_fmt="qcow2",
    )
    qemu_io(top, f"write -P 0x04 {cs + 7} 100", f"write -z {3 * cs} {2 * cs}")
    qemu_io(top, f"discard {6 * cs} {cs}", f"write -P 0x05 {size - cs} {cs}")
    _assert_reads_like_qemu(top)


@pytest.mark.parametrize("compression", ["zlib", "zstd"])
@pytest.mark.parametrize("cs", [512, 65536, 2 << 20], ids=["cs512", "cs64k", "cs2M"])
def test_compressed_images(tmp_path: Path, cs: int, compression: str) -> None:
    src = tmp_path / "src.raw"
    size = 6 * cs + 4096
    data = bytearray(size)
    data[0:cs] = b"compressible " * (cs // 13) + bytes(cs % 13)
    data[2 * cs : 3 * cs] = os.urandom(cs)  # incompressible: stored plainly
    data[3 * cs + 5 : 3 * cs + 9] = b"tiny"
    data[size - 100 :] = b"\x07" * 100
    src.write_bytes(data)
    image = tmp_path / "c.qcow2"
    opts = f"cluster_size={cs},compression_type={compression}"
    run("qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", "-o", opts, str(src), str(image))
    node = open_image(str(image))
    try:
        assert node.read(0, size) == bytes(data)
        assert any(ext.compressed for ext in node.extents())
        assert our_map(node) == qemu_map(image)
    finally:
        node.close()


def test_unaligned_reads_match(tmp_path: Path) -> None:
    cs = 4096
    size = _size(cs)
    image = create(tmp_path / "t.qcow2", size, f"cluster_size={cs}")
    _fill(image, cs, size, compat="1.1")
    want = to_raw(image)
    node = open_image(str(image))
    try:
        for offset, length in [(1, 1), (cs - 1, 2), (100, 5 * cs + 3), (size - 1, 1), (0, size)]:
            assert node.read(offset, length) == want[offset : offset + length]
    finally:
        node.close()


def test_backing_override_none_and_node(tmp_path: Path) -> None:
    """``backing: null`` hides the header's backing file; a dict opens another one."""
    base = create(tmp_path / "b.raw", 1 << 20, fmt="raw")
    qemu_io(base, "write -P 0x09 0 1M", fmt="raw")
    other = create(tmp_path / "o.raw", 1 << 20, fmt="raw")
    qemu_io(other, "write -P 0x0a 0 1M", fmt="raw")
    top = create(tmp_path / "t.qcow2", 1 << 20, backing="b.raw", backing_fmt="raw")
    qemu_io(top, "write -P 0x0b 0 64k")  # one whole cluster
    node = open_image(str(top), extra={"backing": None})
    try:
        assert node.child("backing") is None
        assert node.read(0, 128 << 10) == b"\x0b" * (64 << 10) + bytes(64 << 10)
    finally:
        node.close()
    spec = {"driver": "raw", "file": {"driver": "file", "filename": str(other)}}
    node = open_image(str(top), extra={"backing": spec})
    try:
        assert node.read(0, 128 << 10) == b"\x0b" * (64 << 10) + b"\x0a" * (64 << 10)
    finally:
        node.close()


def test_absolute_and_json_backing_names(tmp_path: Path) -> None:
    base = create(tmp_path / "b.raw", 1 << 20, fmt="raw")
    qemu_io(base, "write -P 0x0c 0 1M", fmt="raw")
    absolute = create(tmp_path / "abs.qcow2", 1 << 20, backing=str(base), backing_fmt="raw")
    spec = f'json:{{"driver": "raw", "file": {{"driver": "file", "filename": "{base}"}}}}'
    named = create(tmp_path / "json.qcow2", 1 << 20, backing=spec, backing_fmt="raw")
    for image in (absolute, named):
        _assert_reads_like_qemu(image)
