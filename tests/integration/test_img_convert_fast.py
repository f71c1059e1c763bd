"""convert's fast paths agree with the general code they bypass.

- ``qcow2_source`` maps a qcow2 image from its tables; its runs must say what the driver
  says (data read from the file where the driver reads it, zeros, unallocated, compressed)
  and it must refuse damaged tables with the driver's own error.
- New files on ext4 are preallocated range by range; the data map and contents must be
  the ones plain writes give.
- Errors met by the reader thread or the writer end the copy with an error, not a hang.
- The registry imports drivers lazily, and ``pyfleece img convert`` imports nothing it
  does not need (start-up time is benchmarked against qemu-img).
"""

from __future__ import annotations

import errno
import itertools
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from pyfleece.block import registry
from pyfleece.block.image import open_image
from pyfleece.block.node import Node
from pyfleece.errors import BlockError
from pyfleece.img import targets
from pyfleece.img.qcow2_source import COMPRESSED, UNALLOCATED, ZERO, qcow2_runs
from tests.integration.qcow2_oracle import create, qemu_io
from tests.integration.test_img_helpers import our_env, ours, qemu_ok, sample_images

MiB = 1 << 20


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("img-convert-fast")
    sample_images(d)
    for name, options in [("c512-v2", "cluster_size=512,compat=0.10"), ("c2m", "cluster_size=2M")]:
        qemu_ok("qemu-img", "convert", "-O", "qcow2", "-o", options, "base.qcow2",
                f"{name}.qcow2", cwd=d)  # fmt: skip
    return d


def _runs(node: Node) -> list[tuple[int, int, int]]:
    file = node.child("file")
    assert file is not None
    return list(qcow2_runs(node, node.header, file))  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "name", ["base.qcow2", "top.qcow2", "over_raw.qcow2", "c512-v2.qcow2", "c2m.qcow2"]
)
def test_runs_say_what_the_driver_says(images: Path, name: str) -> None:
    node = open_image(str(images / name))
    try:
        runs = _runs(node)
        assert runs[0][0] == 0 and sum(n for _, n, _ in runs) == node.size
        for (start, length, _), (nxt, _, _) in itertools.pairwise(runs):
            assert start + length == nxt
        file = node.child("file")
        assert file is not None
        for start, length, where in runs:
            extents = list(node.extents(start, length))
            if where >= 0:  # data, read straight from the file
                assert file.read(where, length) == node.read(start, length)
                assert all(e.allocated and e.depth == 0 and not e.compressed for e in extents)
            elif where == ZERO:
                assert node.read(start, length) == bytes(length)
                assert all(e.zero and e.allocated and e.depth == 0 for e in extents)
            elif where == UNALLOCATED:
                assert all(not (e.allocated and e.depth == 0) for e in extents)
            else:
                assert where == COMPRESSED
                assert all(e.compressed for e in extents)
    finally:
        node.close()


def _l2_entry_offset(path: Path, index: int) -> int:
    data = path.read_bytes()
    l1_offset = struct.unpack_from(">Q", data, 40)[0]
    l2 = struct.unpack_from(">Q", data, l1_offset)[0] & ((1 << 56) - 512)
    return l2 + 8 * index


def _poke(path: Path, offset: int, change: object) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        (value,) = struct.unpack(">Q", f.read(8))
        f.seek(offset)
        f.write(struct.pack(">Q", change(value)))  # type: ignore[operator]


def _damage(path: Path, how: str) -> None:
    l1_offset = struct.unpack_from(">Q", path.read_bytes(), 40)[0]
    if how == "l1-reserved":
        _poke(path, l1_offset, lambda v: v | 0x100)
    elif how == "l2-past-eof":
        _poke(path, l1_offset, lambda v: (1 << 40) | (1 << 63))
    elif how == "l2-unaligned":
        _poke(path, l1_offset, lambda v: v + 512)
    elif how == "data-unaligned":
        _poke(path, _l2_entry_offset(path, 0), lambda v: v + 4096)
    elif how == "zero-in-v2":
        _poke(path, _l2_entry_offset(path, 0), lambda v: v | 1)


@pytest.mark.parametrize(
    "how", ["l1-reserved", "l2-past-eof", "l2-unaligned", "data-unaligned", "zero-in-v2"]
)
def test_damaged_tables_refused_as_the_driver_does(tmp_path: Path, how: str) -> None:
    options = "compat=0.10" if how == "zero-in-v2" else ""
    image = create(tmp_path / "d.qcow2", 4 * MiB, options)
    qemu_io(image, "write -P 0x11 0 128k")
    _damage(image, how)
    node = open_image(str(image))
    try:
        with pytest.raises(BlockError) as driver:
            node.read(0, node.size)
        with pytest.raises(BlockError) as fast:
            _runs(node)
        assert (fast.value.errno, str(fast.value)) == (driver.value.errno, str(driver.value))
        assert fast.value.errno == errno.EIO
    finally:
        node.close()
    result = ours("convert", "-O", "raw", "d.qcow2", "d.raw", cwd=tmp_path)
    problem = str(driver.value).split(": ", 1)[1]  # without the generated node name
    assert result.rc == 1 and problem in result.err


def _data_map(path: Path) -> list[tuple[int, int]]:
    fd = os.open(path, os.O_RDONLY)
    try:
        size, pos, found = os.fstat(fd).st_size, 0, []
        while pos < size:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as err:
                if err.errno == errno.ENXIO:
                    break
                raise
            pos = os.lseek(fd, data, os.SEEK_HOLE)
            found.append((data, pos))
        return found
    finally:
        os.close(fd)


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
@pytest.mark.parametrize("source", ["raw.img", "top.qcow2", "over_raw.qcow2"])
def test_preallocation_keeps_the_allocation_of_plain_writes(
    images: Path, monkeypatch: pytest.MonkeyPatch, source: str, fmt: str
) -> None:
    from pyfleece.img.convert import run

    def convert(out: str) -> Path:
        cwd = Path.cwd()
        os.chdir(images)
        try:
            assert run(["-O", fmt, source, out]) == 0
        finally:
            os.chdir(cwd)
        return images / out

    calls: list[tuple[int, int]] = []
    real = targets.fallocate

    def counted(fd: int, mode: int, offset: int, length: int) -> None:
        calls.append((offset, length))
        real(fd, mode, offset, length)

    monkeypatch.setattr(targets, "fallocate", counted)
    with_prealloc = convert(f"pre-{source}.{fmt}")
    ext4 = bool(calls)  # preallocation happens on ext4 only
    monkeypatch.setattr(targets.Preallocate, "__call__", lambda self, offset, length: None)
    plain = convert(f"plain-{source}.{fmt}")
    assert with_prealloc.read_bytes() == plain.read_bytes()
    assert _data_map(with_prealloc) == _data_map(plain)
    if not ext4:
        pytest.skip("the scratch directory is not on ext4: nothing was preallocated")


def _fault_json(image: str, rule: dict[str, object]) -> str:
    file = {"driver": "fault", "image": {"driver": "file", "filename": image}, "rules": [rule]}
    return "json:" + json.dumps({"driver": "raw", "file": file})


def test_read_error_ends_the_copy(images: Path) -> None:
    (images / "big.raw").write_bytes(os.urandom(8 * MiB))
    source = _fault_json("big.raw", {"op": "read", "nth": 3, "errno": errno.EIO})
    result = ours("convert", "-O", "qcow2", source, "r-err.qcow2", cwd=images)
    assert result.rc == 1
    assert "injected error on read" in result.err


def test_write_error_ends_the_copy(images: Path) -> None:
    (images / "big2.raw").write_bytes(os.urandom(8 * MiB))
    qemu_ok("qemu-img", "create", "-q", "-f", "raw", "w-err.raw", "8M", cwd=images)
    target = _fault_json("w-err.raw", {"op": "write", "nth": 2, "errno": errno.ENOSPC})
    result = ours("convert", "-n", "-O", "raw", "big2.raw", target, cwd=images)
    assert result.rc == 1
    assert "injected error on write" in result.err


def test_registry_table_names_every_driver() -> None:
    """Each lazily loaded name maps to the module that registers it, and none is missing."""
    import pyfleece.block.drivers  # noqa: F401  (registers every driver)

    registered = dict(registry._DRIVERS)
    assert set(registry._MODULES) == set(registered)
    for name, module in registry._MODULES.items():
        assert registered[name].__module__ == module
    assert registry.drivers() == sorted(registered)


#: modules ``pyfleece img convert`` between files must not import (each costs start-up time)
NOT_NEEDED = [
    "ssl", "socket", "logging", "dataclasses", "inspect", "json", "ctypes.util",
    "concurrent.futures", "subprocess", "pyfleece.nbd.client", "pyfleece.block.nbd",
    "pyfleece.block.fault", "pyfleece.block.qcow2.check",
]  # fmt: skip


@pytest.mark.parametrize(
    ("source", "fmt"), [("raw.img", "qcow2"), ("base.qcow2", "raw"), ("top.qcow2", "qcow2")]
)
def test_convert_imports_only_what_it_needs(images: Path, source: str, fmt: str) -> None:
    code = (
        "import sys\n"
        "from pyfleece.cli import main\n"
        f"rc = main(['img', 'convert', '-O', '{fmt}', '{source}', 'imports.{fmt}'])\n"
        f"print(rc, sorted(set({NOT_NEEDED!r}) & set(sys.modules)))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=images,
        capture_output=True,
        text=True,
        timeout=60,
        env=our_env(),
    )
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "0 []\n", "")
