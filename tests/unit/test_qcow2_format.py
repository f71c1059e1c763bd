"""qcow2 structure codec: headers round-trip byte for byte with what qemu-img writes."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from pyfleece.block.qcow2.format import (
    RefcountCodec,
    decode_compressed,
    decode_header,
    encode_compressed,
    encode_header,
    split_guest_offset,
    split_host_cluster,
)
from pyfleece.errors import CorruptImage, UnsupportedImage


@pytest.mark.parametrize(
    "options",
    [
        "compat=1.1",
        "compat=0.10",
        "cluster_size=512",
        "cluster_size=2M",
        "compression_type=zstd",
        "refcount_bits=1",
        "lazy_refcounts=on",
    ],
)
@pytest.mark.parametrize("backing", [False, True], ids=["plain", "backing"])
def test_header_roundtrip_matches_qemu_img(
    qemu_img: str, tmp_path: Path, options: str, backing: bool
) -> None:
    image = tmp_path / "t.qcow2"
    args = [qemu_img, "create", "-q", "-f", "qcow2", "-o", options]
    if backing:
        subprocess.run(
            [qemu_img, "create", "-q", "-f", "raw", str(tmp_path / "b.raw"), "1M"], check=True
        )
        args += ["-b", "b.raw", "-F", "raw"]
    subprocess.run([*args, str(image), "64M"], check=True, cwd=tmp_path)
    data = image.read_bytes()
    header = decode_header(data[: 2 << 20], len(data))
    encoded = encode_header(header)
    assert encoded == data[: len(encoded)]
    assert header.size == 64 << 20
    assert (header.backing_file == "b.raw") == backing


def test_header_rejects_garbage() -> None:
    with pytest.raises(CorruptImage):
        decode_header(b"QFI", 3)
    with pytest.raises(CorruptImage):
        decode_header(b"\0" * 4096, 4096)


def test_header_rejects_unknown_incompatible_bits(qemu_img: str, tmp_path: Path) -> None:
    image = tmp_path / "t.qcow2"
    subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", str(image), "1M"], check=True)
    data = bytearray(image.read_bytes())
    data[79] |= 1 << 5  # incompatible feature bit 5 (unknown)
    with pytest.raises(UnsupportedImage, match="Unsupported incompatible features: bit 5"):
        decode_header(bytes(data), len(data))


def test_offset_arithmetic() -> None:
    assert split_guest_offset(0, 16) == (0, 0, 0)
    assert split_guest_offset((8192 << 16) + 65537, 16) == (1, 1, 1)
    assert split_host_cluster(65536 * 32769, 16, 4) == (1, 1)


@pytest.mark.parametrize("order", range(7))
def test_refcount_codec_all_widths(order: int) -> None:
    codec = RefcountCodec(order)
    block = bytearray(64)
    entries = 64 * 8 >> order
    for i in range(entries):
        codec.set(block, i, i % (codec.max + 1))
    assert [codec.get(block, i) for i in range(entries)] == [
        i % (codec.max + 1) for i in range(entries)
    ]
    with pytest.raises(CorruptImage):
        codec.set(block, 0, codec.max + 1)


def test_compressed_descriptor_roundtrip() -> None:
    entry = encode_compressed(0x12345, 3000, 16)
    desc = decode_compressed(entry, 16)
    assert desc.host_offset == 0x12345
    assert desc.length >= 3000
