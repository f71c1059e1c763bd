"""Header rules: unknown extensions and fields survive our writes, autoclear bits are cleared
as the spec says, corrupt and dirty images are not opened for writing, persistent bitmaps
are kept (and marked in use), and ``info()`` says what ``qemu-img info`` says."""

from __future__ import annotations

import signal
import struct
import subprocess
from pathlib import Path

import pytest

from pyfleece.block.graph import Graph
from pyfleece.block.image import open_image
from pyfleece.block.qcow2.driver import Qcow2Node
from pyfleece.block.qcow2.format import Extension, decode_header, encode_header
from pyfleece.errors import BlockError, ConfigError, ImageError, UnsupportedImage
from tests.conftest import require_tool
from tests.integration.qcow2_oracle import assert_clean, check, create, info, qemu_io, run


def _header(path: Path):  # type: ignore[no-untyped-def]
    data = path.read_bytes()
    return decode_header(data[: 2 << 20], len(data))


def _rewrite_header(path: Path, **changes: object) -> None:
    header = _header(path).with_changes(**changes)
    encoded = encode_header(header)
    with open(path, "r+b") as f:
        f.write(encoded + bytes(header.cluster_size - len(encoded)))


def _write_something(path: Path) -> None:
    node = open_image(str(path), read_only=False)
    try:
        node.write(70000, b"\x42" * 100000)
    finally:
        node.close()


@pytest.mark.parametrize(
    "options",
    [
        "compat=0.10",
        "compat=1.1",
        "compression_type=zstd",
        "lazy_refcounts=on,refcount_bits=8",
        "cluster_size=512,refcount_bits=1",
    ],
)
def test_info_matches_qemu_img(tmp_path: Path, options: str) -> None:
    create(tmp_path / "b.raw", 1 << 20, fmt="raw")
    image = create(tmp_path / "t.qcow2", 4 << 20, options, backing="b.raw", backing_fmt="raw")
    theirs = info(image)
    node = open_image(str(image))
    try:
        assert isinstance(node, Qcow2Node)
        ours = node.info()
    finally:
        node.close()
    for key in ("cluster-size", "format-specific", "dirty-flag", "backing-filename"):
        assert ours[key] == theirs[key], key
    assert ours["backing-filename-format"] == theirs["backing-filename-format"]
    assert Path(ours["full-backing-filename"]) == Path(theirs["full-backing-filename"])


def test_unknown_extension_and_header_fields_survive_writes(tmp_path: Path) -> None:
    image = create(tmp_path / "t.qcow2", 4 << 20)
    unknown = Extension(0x12345678, b"keep me, please")
    _rewrite_header(
        image,
        header_length=120,
        extra_fields=bytes(7) + b"futurefl",
        extensions=(*_header(image).extensions, unknown),
    )
    before = image.read_bytes()[:512]
    _write_something(image)
    after = _header(image)
    assert unknown in after.extensions
    assert after.header_length == 120 and after.extra_fields.endswith(b"futurefl")
    assert image.read_bytes()[:512] == before
    assert_clean(image)


def test_unknown_autoclear_bits_cleared_before_the_first_write(tmp_path: Path) -> None:
    image = create(tmp_path / "t.qcow2", 4 << 20)
    _rewrite_header(image, autoclear=1 << 7)
    node = open_image(str(image), read_only=False)
    node.close()
    assert _header(image).autoclear == 1 << 7  # opened for writing, but nothing written
    _write_something(image)
    assert _header(image).autoclear == 0
    assert_clean(image)


def test_corrupt_image_opens_read_only_only(tmp_path: Path) -> None:
    image = create(tmp_path / "t.qcow2", 4 << 20)
    qemu_io(image, "write -P 0x33 0 64k")
    _rewrite_header(image, incompatible=2)
    node = open_image(str(image))
    try:
        assert node.read(0, 4) == b"\x33" * 4
        assert node.info()["format-specific"]["data"]["corrupt"] is True
    finally:
        node.close()
    with pytest.raises(ImageError, match="corrupt; cannot be opened read/write"):
        open_image(str(image), read_only=False)


def test_dirty_image_repaired_on_a_writable_open(tmp_path: Path) -> None:
    """qemu-io killed with lazy refcounts leaves the dirty bit and refcounts of 0 under
    its new clusters; a read-only open reads it as it is, a writable open repairs it."""
    image = create(tmp_path / "t.qcow2", 4 << 20, "lazy_refcounts=on")
    proc = subprocess.run(
        [require_tool("qemu-io"), "-c", "write -P 0x55 0 128k", "-c", "sigraise 9", str(image)],
        capture_output=True,
        timeout=60,
    )
    assert proc.returncode == -signal.SIGKILL
    assert check(image)[0] == 2  # QEMU's check sees the stale refcounts as corruption
    node = open_image(str(image))
    try:
        assert node.info()["dirty-flag"] is True
        assert node.read(0, 4) == b"\x55" * 4
    finally:
        node.close()
    node = open_image(str(image), read_only=False)
    try:
        assert node.info()["dirty-flag"] is False
        node.write(1 << 20, b"\x66" * 4096)
    finally:
        node.close()
    assert_clean(image)
    qemu_io(image, "read -P 0x55 0 128k", "read -P 0x66 1M 4k")


def test_unrepairable_dirty_image_refused_for_writing(tmp_path: Path) -> None:
    image = create(tmp_path / "t.qcow2", 4 << 20, "lazy_refcounts=on")
    qemu_io(image, "write -P 0x55 0 64k")
    data = image.read_bytes()
    l2 = struct.unpack_from(">Q", data, _header(image).l1_table_offset)[0] & ((1 << 56) - 512)
    with open(image, "r+b") as f:  # an L2 entry pointing into the header cluster
        f.seek(l2 + 8)
        f.write(struct.pack(">Q", (1 << 63) | 512))
    _rewrite_header(image, incompatible=1)
    with pytest.raises(ImageError, match=r"Could not repair dirty image.*read-only"):
        open_image(str(image), read_only=False)


def test_bitmaps_kept_and_marked_in_use(tmp_path: Path) -> None:
    image = create(tmp_path / "t.qcow2", 4 << 20)
    run("qemu-img", "bitmap", "--add", str(image), "enabled")
    run("qemu-img", "bitmap", "--add", "--disable", str(image), "frozen")
    before = _header(image)
    _write_something(image)
    after = _header(image)
    assert after.extensions == before.extensions and after.autoclear == before.autoclear
    bitmaps = info(image)["format-specific"]["data"]["bitmaps"]
    assert bitmaps == [
        {"flags": ["in-use", "auto"], "name": "enabled", "granularity": 65536},
        {"flags": [], "name": "frozen", "granularity": 65536},
    ]
    assert_clean(image)
    node = open_image(str(image))
    try:
        assert node.info()["format-specific"]["data"]["bitmaps"] == bitmaps
    finally:
        node.close()


def test_options(tmp_path: Path) -> None:
    image = create(tmp_path / "t.qcow2", 4 << 20)
    harmless = {
        "lazy-refcounts": "on",
        "pass-discard-request": True,
        "pass-discard-other": "off",
        "cache-size": "4M",
        "l2-cache-size": 1 << 20,
        "refcount-cache-size": "256k",
        "cache-clean-interval": 600,
        "overlap-check": {"template": "all", "main-header": True},
    }
    node = open_image(str(image), read_only=False, extra=harmless)
    node.close()
    with pytest.raises(ConfigError, match="does not support the option 'bogus'"):
        open_image(str(image), extra={"bogus": 1})
    with pytest.raises(ConfigError, match="overlap-check"):
        open_image(str(image), extra={"overlap-check": "sometimes"})
    with pytest.raises(UnsupportedImage, match="'encrypt' is not supported"):
        open_image(str(image), extra={"encrypt": {"format": "luks"}})
    v2 = create(tmp_path / "v2.qcow2", 1 << 20, "compat=0.10")
    with pytest.raises(ConfigError, match="Lazy refcounts require"):
        open_image(str(v2), extra={"lazy-refcounts": True})


def test_read_only_node_refuses_writes(tmp_path: Path) -> None:
    image = create(tmp_path / "t.qcow2", 1 << 20)
    node = open_image(str(image))
    try:
        with pytest.raises(BlockError, match="read-only"):
            node.write(0, b"x")
    finally:
        node.close()


def test_backing_given_as_a_graph_node_and_swapped(tmp_path: Path) -> None:
    """The backing edge names a node of the graph; swapping it later changes what
    unallocated clusters read (fleecing inserts a filter there)."""
    one = create(tmp_path / "one.raw", 1 << 20, fmt="raw")
    two = create(tmp_path / "two.raw", 1 << 20, fmt="raw")
    qemu_io(one, "write -P 0x01 0 1M", fmt="raw")
    qemu_io(two, "write -P 0x02 0 1M", fmt="raw")
    image = create(tmp_path / "t.qcow2", 1 << 20)
    graph = Graph()
    first = graph.open(
        {"driver": "raw", "node-name": "one", "file": {"driver": "file", "filename": str(one)}}
    )
    second = graph.open(
        {"driver": "raw", "node-name": "two", "file": {"driver": "file", "filename": str(two)}}
    )
    top = graph.open(
        {
            "driver": "qcow2",
            "node-name": "top",
            "backing": "one",
            "file": {"driver": "file", "filename": str(image)},
        }
    )
    try:
        assert top.child("backing") is first
        top.write(0, b"\xaa" * 512)  # copy-on-write reads the rest from 'one'
        assert top.read(0, 1024) == b"\xaa" * 512 + b"\x01" * 512
        assert top.read(65536, 4) == b"\x01" * 4
        top.attach_child("backing", second, owned=False)
        assert top.read(65536, 4) == b"\x02" * 4
    finally:
        top.close()
        first.close()
        second.close()
    assert struct.unpack(">I", image.read_bytes()[16:20]) == (0,)  # no name was recorded
