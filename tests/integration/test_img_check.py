"""``pyfleece img check`` finds what ``qemu-img check`` finds on images the tests damage,
with the same report and exit status, and ``-r`` repairs what qemu-img repairs.

Each damage is a few bytes changed in a qemu-made image (the table below says which); the
repair tests then ask qemu-img whether the result is clean and the data unchanged.
"""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import pytest

from pyfleece.block.file import FileNode
from pyfleece.block.qcow2.check import Fix, check, repair_dirty
from pyfleece.block.qcow2.format import Incompat, decode_header
from tests.integration.test_img_helpers import both, ours, qemu, qemu_ok

MASK = 0x00FFFFFFFFFFFE00


def _u64(data: bytes, at: int) -> int:
    return int.from_bytes(data[at : at + 8], "big")


def damage(path: Path, kind: str) -> None:
    """Changes a 64 KiB-cluster image so that qemu-img check reports one kind of error."""
    data = bytearray(path.read_bytes())
    h = decode_header(bytes(data[:65536]), len(data))
    l2 = _u64(data, h.l1_table_offset) & MASK
    refblock = _u64(data, h.refcount_table_offset)
    cs = h.cluster_size
    if kind == "leak":  # one more cluster, counted but unused
        clusters = -(-len(data) // cs)
        data += bytes((clusters + 1) * cs - len(data))
        struct.pack_into(">H", data, refblock + 2 * clusters, 1)
    elif kind == "copied-l2":  # OFLAG_COPIED missing on a data cluster with refcount 1
        struct.pack_into(">Q", data, l2, _u64(data, l2) & ~(1 << 63))
    elif kind == "copied-l1":
        at = h.l1_table_offset
        struct.pack_into(">Q", data, at, _u64(data, at) & ~(1 << 63))
    elif kind == "shared":  # two guest clusters on one host cluster with refcount 1
        struct.pack_into(">Q", data, l2 + 8, _u64(data, l2))
    elif kind == "refcount-zero":  # a used cluster with refcount 0: needs a rebuild
        host = _u64(data, l2) & MASK
        struct.pack_into(">H", data, refblock + 2 * (host // cs), 0)
    elif kind == "past-eof":  # a data cluster far past the end of the file
        struct.pack_into(">Q", data, l2 + 16, (1 << 63) | (len(data) + 10 * cs))
    path.write_bytes(bytes(data))


DAMAGES = {
    "leak": 3,
    "copied-l2": 2,
    "copied-l1": 2,
    "shared": 2,
    "refcount-zero": 2,
    "past-eof": 2,
}


@pytest.fixture
def image(tmp_path: Path) -> Path:
    qemu_ok("qemu-img", "create", "-q", "-f", "qcow2", "i.qcow2", "8M", cwd=tmp_path)
    qemu_ok("qemu-io", "-c", "write -P 1 0 256k", "-c", "write -P 2 1M 64k",
            "-c", "write -c -P 3 2M 64k", "i.qcow2", cwd=tmp_path)  # fmt: skip
    return tmp_path / "i.qcow2"


@pytest.mark.parametrize("kind", list(DAMAGES))
def test_finds_what_qemu_img_finds(image: Path, kind: str) -> None:
    damage(image, kind)
    for args in (["check", image.name], ["check", "--output=json", image.name]):
        theirs, mine = both(*args, cwd=image.parent)
        assert (mine.rc, mine.out, mine.err) == (theirs.rc, theirs.out, theirs.err)
        assert mine.rc == DAMAGES[kind]


@pytest.mark.parametrize("mode", ["leaks", "all"])
@pytest.mark.parametrize("kind", ["leak", "copied-l2", "copied-l1", "shared", "refcount-zero"])
def test_repairs_as_qemu_img_does(image: Path, kind: str, mode: str) -> None:
    damage(image, kind)
    twin = image.with_name("twin.qcow2")
    shutil.copyfile(image, twin)
    theirs = qemu("qemu-img", "check", "-r", mode, twin.name, cwd=image.parent)
    mine = ours("check", "-r", mode, image.name, cwd=image.parent)
    assert mine.rc == theirs.rc
    assert mine.out.replace(image.name, twin.name) == theirs.out
    after = [qemu("qemu-img", "check", p.name, cwd=image.parent).rc for p in (image, twin)]
    assert after[0] == after[1]
    if mode == "all" and kind != "shared":
        assert after[0] == 0
    if after[0] == 0:
        assert qemu("qemu-img", "compare", image.name, twin.name, cwd=image.parent).rc == 0


def test_repair_dirty_image(tmp_path: Path) -> None:
    """A lazy-refcounts image left dirty by a killed qemu-io: the driver's repair API."""
    qemu_ok("qemu-img", "create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", "d.qcow2",
            "16M", cwd=tmp_path)  # fmt: skip
    qemu("qemu-io", "-c", "write -P 4 0 1M", "-c", "write -P 5 4M 64k", "-c", "abort",
         "d.qcow2", cwd=tmp_path)  # fmt: skip
    path = tmp_path / "d.qcow2"
    assert qemu("qemu-img", "check", "d.qcow2", cwd=tmp_path).rc == 2  # it is dirty
    file = FileNode("f", str(path), read_only=False)
    try:
        res = repair_dirty(file, log=lambda line: None)
        assert res.corruptions == 0 and res.check_errors == 0
        assert res.corruptions_fixed > 0
        again = check(file, Fix.NONE, log=lambda line: None)
        assert (again.corruptions, again.leaks, again.check_errors) == (0, 0, 0)
    finally:
        file.close()
    header = decode_header(path.read_bytes()[:65536], path.stat().st_size)
    assert not header.incompatible & Incompat.DIRTY
    assert qemu("qemu-img", "check", "d.qcow2", cwd=tmp_path).rc == 0
    for byte, offset in (("4", 0), ("5", 4 << 20)):
        out = qemu_ok("qemu-io", "-c", f"read -P {byte} {offset} 64k", "d.qcow2", cwd=tmp_path)
        assert "Pattern verification failed" not in out
