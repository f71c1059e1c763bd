"""Hostile and damaged images give clear errors, never a hang or unbounded memory:
truncated files, garbage, absurd table sizes, offsets past the end of the file, looping or
endless backing chains, overlong names, bad compressed data, lying refcounts."""

from __future__ import annotations

import errno
import os
import struct
from pathlib import Path

import pytest

from pyfleece.block.graph import Graph
from pyfleece.block.image import open_image
from pyfleece.block.qcow2.format import decode_header, encode_header
from pyfleece.block.registry import MAX_CHAIN_DEPTH
from pyfleece.errors import BlockError, CorruptImage, ImageError, UnsupportedImage
from tests.integration.qcow2_oracle import create, qemu_io, run

CS = 65536


def _patch(path: Path, offset: int, fmt: str, value: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, value))


def _image(tmp_path: Path, options: str = "") -> Path:
    image = create(tmp_path / "t.qcow2", 8 << 20, options)
    qemu_io(image, "write -P 0x11 0 128k", "write -c -P 0x12 1M 64k")
    return image


def _header(path: Path):  # type: ignore[no-untyped-def]
    data = path.read_bytes()
    return decode_header(data[: 2 << 20], len(data))


@pytest.mark.parametrize(
    ("keep", "message"),
    [(0, "too short"), (50, "too short"), (CS, "past the end of the file")],
    ids=["empty", "partial-header", "tables-cut-off"],
)
def test_truncated_file(tmp_path: Path, keep: int, message: str) -> None:
    image = _image(tmp_path)
    os.truncate(image, keep)
    with pytest.raises(CorruptImage, match=message):
        open_image(str(image), "qcow2")


def test_garbage(tmp_path: Path) -> None:
    path = tmp_path / "g.qcow2"
    path.write_bytes(os.urandom(1 << 16))
    with pytest.raises(CorruptImage, match="not in qcow2 format"):
        open_image(str(path), "qcow2")
    path.write_bytes(b"QFI\xfb" + os.urandom(1 << 16))
    with pytest.raises(ImageError):
        open_image(str(path), "qcow2")


def test_huge_l1_size(tmp_path: Path) -> None:
    image = _image(tmp_path)
    _patch(image, 36, ">I", 0x7FFFFFFF)
    with pytest.raises(CorruptImage, match="L1 table is too large"):
        open_image(str(image))


def test_l1_table_past_eof(tmp_path: Path) -> None:
    image = _image(tmp_path)
    _patch(image, 40, ">Q", 1 << 40)
    with pytest.raises(CorruptImage, match="L1 table at 0x10000000000 lies past the end"):
        open_image(str(image))


def test_refcount_table_past_eof(tmp_path: Path) -> None:
    image = _image(tmp_path)
    _patch(image, 48, ">Q", 1 << 40)
    with pytest.raises(CorruptImage, match="refcount table at 0x10000000000 lies past the end"):
        open_image(str(image))


def test_l2_table_past_eof(tmp_path: Path) -> None:
    image = _image(tmp_path)
    _patch(image, _header(image).l1_table_offset, ">Q", (1 << 40) | (1 << 63))
    node = open_image(str(image))
    try:
        with pytest.raises(BlockError, match=r"L2 table at 0x10000000000 .* past the end") as err:
            node.read(0, 4096)
        assert err.value.errno == errno.EIO
    finally:
        node.close()


def test_refcount_block_past_eof(tmp_path: Path) -> None:
    image = _image(tmp_path)
    _patch(image, _header(image).refcount_table_offset, ">Q", 1 << 40)
    node = open_image(str(image), read_only=False)
    try:
        assert node.read(0, 4) == b"\x11" * 4  # reading needs no refcounts
        with pytest.raises(BlockError, match="refcount block 0 at 0x10000000000"):
            node.write(4 << 20, b"x" * 512)
    finally:
        node.close()


def test_refcounts_claiming_metadata_is_free(tmp_path: Path) -> None:
    """Refcounts of 0 on the L1 table: an allocation must refuse, not overwrite it."""
    image = _image(tmp_path)
    h = _header(image)
    data = image.read_bytes()
    block = struct.unpack_from(">Q", data, h.refcount_table_offset)[0]
    _patch(image, block + 2 * (h.l1_table_offset // CS), ">H", 0)
    node = open_image(str(image), read_only=False)
    try:
        with pytest.raises(BlockError, match="refcounts mark metadata at 0x30000 as free"):
            node.write(4 << 20, b"x" * 512)
    finally:
        node.close()
    assert (
        image.read_bytes()[h.l1_table_offset : h.l1_table_offset + 8]
        == data[h.l1_table_offset : h.l1_table_offset + 8]
    )


def test_unaligned_data_cluster(tmp_path: Path) -> None:
    image = _image(tmp_path)
    data = image.read_bytes()
    l2 = struct.unpack_from(">Q", data, _header(image).l1_table_offset)[0] & ((1 << 56) - 512)
    entry = struct.unpack_from(">Q", data, l2)[0]
    _patch(image, l2, ">Q", entry + 4096)
    node = open_image(str(image))
    try:
        with pytest.raises(BlockError, match="unaligned"):
            node.read(0, 512)
    finally:
        node.close()


def test_bad_compressed_data(tmp_path: Path) -> None:
    image = _image(tmp_path)
    node = open_image(str(image))
    try:
        (ext,) = [e for e in node.extents() if e.compressed]
    finally:
        node.close()
    data = image.read_bytes()
    l2 = struct.unpack_from(">Q", data, _header(image).l1_table_offset)[0] & ((1 << 56) - 512)
    entry = struct.unpack_from(">Q", data, l2 + 8 * (ext.offset // CS))[0]
    host = entry & ((1 << 54) - 1)
    with open(image, "r+b") as f:
        f.seek(host)
        f.write(b"\xff" * 64)
    node = open_image(str(image))
    try:
        with pytest.raises(BlockError, match="not valid deflate") as err:
            node.read(ext.offset, 512)
        assert err.value.errno == errno.EIO
    finally:
        node.close()


def test_backing_name_too_long(tmp_path: Path) -> None:
    create(tmp_path / "b.raw", 1 << 20, fmt="raw")
    image = create(tmp_path / "t.qcow2", 1 << 20, backing="b.raw")
    _patch(image, 16, ">I", 2000)
    with pytest.raises(CorruptImage, match="backing file name too long"):
        open_image(str(image))


@pytest.mark.parametrize(
    ("options", "feature"),
    [("extended_l2=on", "extended L2 entries"), ("data_file=t.data", "external data file")],
)
def test_unsupported_incompatible_features(tmp_path: Path, options: str, feature: str) -> None:
    image = create(tmp_path / "t.qcow2", 1 << 20, options)
    with pytest.raises(UnsupportedImage, match=f"Unsupported incompatible features: {feature}"):
        open_image(str(image))


def test_backing_chain_loop(tmp_path: Path) -> None:
    create(tmp_path / "a.qcow2", 1 << 20)
    create(tmp_path / "b.qcow2", 1 << 20, backing="a.qcow2", backing_fmt="qcow2")
    run("qemu-img", "rebase", "-u", "-F", "qcow2", "-b", "b.qcow2", "a.qcow2", cwd=tmp_path)
    with pytest.raises(ImageError, match=r"loops back to .*a\.qcow2"):
        open_image(str(tmp_path / "a.qcow2"))


def test_backing_is_itself(tmp_path: Path) -> None:
    image = create(tmp_path / "a.qcow2", 1 << 20)
    run("qemu-img", "rebase", "-u", "-F", "qcow2", "-b", "./a.qcow2", "a.qcow2", cwd=tmp_path)
    with pytest.raises(ImageError, match="loops back"):
        open_image(str(image))


def test_backing_chain_too_deep(tmp_path: Path) -> None:
    create(tmp_path / "0.raw", 1 << 20, fmt="raw")
    previous, fmt = "0.raw", "raw"
    for i in range(1, MAX_CHAIN_DEPTH + 2):
        create(tmp_path / f"{i}.qcow2", 1 << 20, backing=previous, backing_fmt=fmt)
        previous, fmt = f"{i}.qcow2", "qcow2"
    with pytest.raises(ImageError, match=f"too deep .*more than {MAX_CHAIN_DEPTH} images"):
        open_image(str(tmp_path / previous))
    node = open_image(str(tmp_path / f"{MAX_CHAIN_DEPTH}.qcow2"))  # exactly the limit
    node.close()


def test_missing_backing_file(tmp_path: Path) -> None:
    create(tmp_path / "b.raw", 1 << 20, fmt="raw")
    image = create(tmp_path / "t.qcow2", 1 << 20, backing="b.raw")
    (tmp_path / "b.raw").unlink()
    with pytest.raises(ImageError, match=r"Could not open backing file: Could not open .*b\.raw"):
        open_image(str(image))


def test_failed_open_releases_a_graph_file_node(tmp_path: Path) -> None:
    """A qcow2 node that fails to open (here: its backing file is gone) leaves no
    reference behind on the file node it was given by name."""
    create(tmp_path / "b.raw", 1 << 20, fmt="raw")
    image = create(tmp_path / "t.qcow2", 1 << 20, backing="b.raw")
    (tmp_path / "b.raw").unlink()
    graph = Graph()
    graph.open({"driver": "file", "node-name": "f", "filename": str(image)})
    with pytest.raises(ImageError, match="Could not open backing file"):
        graph.open({"driver": "qcow2", "node-name": "q", "file": "f"})
    graph.remove("f")


@pytest.mark.parametrize("target", ["snapshot-l1", "snapshot-table", "bitmap-directory"])
def test_refcounts_claiming_snapshot_or_bitmap_metadata_is_free(
    tmp_path: Path, target: str
) -> None:
    """Lying refcounts must not let a write overwrite a snapshot's tables or the bitmaps."""
    image = create(tmp_path / "t.qcow2", 8 << 20)
    qemu_io(image, "write -P 0x11 0 128k")
    run("qemu-img", "snapshot", "-c", "s1", str(image))
    run("qemu-img", "bitmap", "--add", str(image), "b0")
    h = _header(image)
    data = image.read_bytes()
    if target == "snapshot-l1":
        victim = struct.unpack_from(">Q", data, h.snapshots_offset)[0]
    elif target == "snapshot-table":
        victim = h.snapshots_offset
    else:
        ext = next(e for e in h.extensions if e.type == 0x23852875)
        victim = struct.unpack_from(">Q", ext.data, 16)[0]
    block = struct.unpack_from(">Q", data, h.refcount_table_offset)[0]
    _patch(image, block + 2 * (victim // CS), ">H", 0)
    node = open_image(str(image), read_only=False)
    try:
        with pytest.raises(BlockError, match=f"metadata at {victim:#x} as free"):
            node.write(4 << 20, b"x" * 512)
    finally:
        node.close()
    expected = bytearray(data[victim : victim + CS])
    if target == "bitmap-directory":
        expected[15] |= 1  # the one legitimate change: the enabled bitmap is now in use
    assert image.read_bytes()[victim : victim + CS] == expected


def test_snapshot_table_past_eof(tmp_path: Path) -> None:
    image = _image(tmp_path)
    run("qemu-img", "snapshot", "-c", "s1", str(image))
    _patch(image, 60, ">I", 1000)  # nb_snapshots: far more entries than the table holds
    node = open_image(str(image))  # reading needs no snapshot table
    node.close()
    with pytest.raises(CorruptImage, match="snapshot table runs past the end"):
        open_image(str(image), read_only=False)


def test_endless_chain_through_non_file_containers(tmp_path: Path) -> None:
    """An image whose backing opens itself again through another driver (here a fault node,
    as an NBD export could) cannot be caught by real paths; the depth cap stops it."""
    image = create(tmp_path / "a.qcow2", 1 << 20)
    spec = f'{{"driver": "fault", "image": {{"driver": "file", "filename": "{image}"}}}}'
    name = f'json:{{"driver": "qcow2", "file": {spec}}}'
    data = image.read_bytes()
    header = decode_header(data[: 2 << 20], len(data)).with_changes(backing_file=name)
    encoded = encode_header(header)
    with open(image, "r+b") as f:
        f.write(encoded + bytes(CS - len(encoded)))
    with pytest.raises(ImageError, match=f"more than {MAX_CHAIN_DEPTH} images"):
        open_image(str(image))


def test_a_release_that_failed_is_not_applied_again(tmp_path: Path) -> None:
    """Two L2 entries share one host cluster whose refcount is 1 (a damaged image). Dropping
    both fails the second release (refcount below 0); the first one, applied already, must
    not be applied again at the next write-back, when the cluster may be in use again."""
    image = _image(tmp_path)
    header = _header(image)
    with open(image, "rb") as f:
        f.seek(header.l1_table_offset)
        (l1_entry,) = struct.unpack(">Q", f.read(8))
        l2_offset = l1_entry & 0x00FFFFFFFFFFFE00
        f.seek(l2_offset)
        (first,) = struct.unpack(">Q", f.read(8))
    _patch(image, l2_offset + 8, ">Q", first)  # guest cluster 1 now maps cluster 0's host
    node = open_image(str(image), read_only=False)
    try:
        node.discard(0, 2 * CS)
        with pytest.raises(BlockError, match="below 0"):
            node.flush()
        node.write(2 * CS, b"\x22" * CS)  # takes the host cluster freed above
        node.flush()
        node.write(3 * CS, b"\x33" * CS)
        assert node.read(2 * CS, CS) == b"\x22" * CS
    finally:
        node.close()
