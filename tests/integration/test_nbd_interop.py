"""``pyfleece nbd`` with real clients, over Unix and TCP: nbdinfo, qemu-io, qemu-img,
nbdcopy, fio and ``qemu-nbd -L``. The peers are the oracles: what they read through our
server must equal what the image file holds, read directly."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import require_tool
from tests.nbdtest import free_port, nbd_tool, pattern, short_tempdir

pytestmark = pytest.mark.timeout(120)

SIZE = 64 << 20
MiB = 1 << 20


@dataclass
class Served:
    image: Path
    transport: str
    address: str  # the socket path, or host:port

    def uri(self, name: str = "disk") -> str:
        if self.transport == "unix":
            return f"nbd+unix:///{name}?socket={self.address}"
        return f"nbd://{self.address}/{name}"

    def qemu_nbd_args(self) -> list[str]:
        if self.transport == "unix":
            return ["-k", self.address]
        host, port = self.address.rsplit(":", 1)
        return ["-b", host, "-p", port]


def make_image(path: Path) -> None:
    """64 MiB: data in [0, 4 MiB) and [32 MiB, 33 MiB), holes elsewhere."""
    with open(path, "wb") as f:
        f.truncate(SIZE)
        f.write(pattern(0, 4 * MiB))
        f.seek(32 * MiB)
        f.write(pattern(32 * MiB, MiB))


@pytest.fixture(scope="module", params=["unix", "tcp"])
def served(request: pytest.FixtureRequest) -> Iterator[Served]:
    with short_tempdir() as tmp:
        image = tmp / "disk.raw"
        make_image(image)
        if request.param == "unix":
            address = str(tmp / "s")
            listen = ["-k", address]
        else:
            port = free_port()
            address = f"127.0.0.1:{port}"
            listen = ["-b", "127.0.0.1", "-p", str(port)]
        args = ["-f", "raw", "-x", "disk", "-D", "test image", "-t", "-e", "16"]
        args += ["--discard=unmap", *listen, str(image)]
        with nbd_tool(args, tmp / "pid"):
            yield Served(image, request.param, address)


def run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if check and result.returncode != 0:
        raise AssertionError(f"{cmd[0]} failed ({result.returncode}): {result.stderr}")
    return result


def file_bytes(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


# -- nbdinfo ----------------------------------------------------------------------------------


def test_nbdinfo_json(served: Served) -> None:
    info = json.loads(run(require_tool("nbdinfo"), "--json", served.uri()).stdout)
    assert info["protocol"] == "newstyle-fixed" and info["structured"] is True
    (export,) = info["exports"]
    assert export["export-name"] == "disk" and export["export-size"] == SIZE
    assert export["description"] == "test image"
    assert set(export["contexts"]) == {"base:allocation", "qemu:allocation-depth"}
    for flag in ("can_flush", "can_fua", "can_trim", "can_zero", "can_multi_conn", "can_df"):
        assert export[flag] is True, flag
    assert export["is_read_only"] is False
    assert export["block_size_maximum"] == 32 * MiB


def test_nbdinfo_list(served: Served) -> None:
    out = run(require_tool("nbdinfo"), "--list", "--json", served.uri("")).stdout
    exports = json.loads(out)["exports"]
    assert [(e["export-name"], e["description"]) for e in exports] == [("disk", "test image")]


@pytest.mark.parametrize(
    ("can", "expected"),
    [("write", 0), ("trim", 0), ("zero", 0), ("fua", 0), ("multi-conn", 0), ("rotational", 2)],
)
def test_nbdinfo_can(served: Served, can: str, expected: int) -> None:
    result = run(require_tool("nbdinfo"), f"--can={can}", served.uri(), check=False)
    assert result.returncode == expected, result.stderr


def _map(*cmd: str) -> list[tuple[int, int, bool]]:
    """(start, length, is-data) runs, merged, from ``qemu-img map --output=json``."""
    runs: list[tuple[int, int, bool]] = []
    for e in json.loads(run(*cmd).stdout):
        data = bool(e["data"])
        if runs and runs[-1][2] == data and runs[-1][0] + runs[-1][1] == e["start"]:
            runs[-1] = (runs[-1][0], runs[-1][1] + e["length"], data)
        else:
            runs.append((e["start"], e["length"], data))
    return runs


def test_nbdinfo_map_matches_the_file(served: Served) -> None:
    qemu_img = require_tool("qemu-img")
    direct = _map(qemu_img, "map", "--output=json", "-f", "raw", str(served.image))
    out = run(require_tool("nbdinfo"), "--map", "--json", served.uri()).stdout
    runs: list[tuple[int, int, bool]] = []
    for e in json.loads(out):
        data = not e["type"] & 1
        if runs and runs[-1][2] == data:
            runs[-1] = (runs[-1][0], runs[-1][1] + e["length"], data)
        else:
            runs.append((e["offset"], e["length"], data))
    assert runs == direct
    assert (0, 4 * MiB, True) in runs


def test_nbdinfo_map_allocation_depth(served: Served) -> None:
    out = run(require_tool("nbdinfo"), "--map=qemu:allocation-depth", served.uri()).stdout
    assert out.split() == ["0", str(SIZE), "1", "local"]


# -- qemu-io and qemu-img -----------------------------------------------------------------


def qemu_io(served: Served, *commands: str) -> str:
    args = [require_tool("qemu-io"), "-f", "raw"]
    for c in commands:
        args += ["-c", c]
    result = run(*args, served.uri())
    assert "failed" not in result.stdout.lower(), result.stdout
    return result.stdout


def test_qemu_io_read_write_unaligned(served: Served) -> None:
    base = 8 * MiB
    qemu_io(
        served,
        f"write -P 0x5a {base + 1000} 3000",
        f"write -f -P 0xa5 {base + 70000} 70000",
        f"read -P 0x5a {base + 1000} 3000",
        f"read -P 0xa5 {base + 70000} 70000",
        f"read -P 0 {base} 1000",
    )
    assert file_bytes(served.image, base + 1000, 3000) == b"\x5a" * 3000
    assert file_bytes(served.image, base + 70000, 70000) == b"\xa5" * 70000


def test_qemu_io_zeroes_discard_flush(served: Served) -> None:
    base = 12 * MiB
    qemu_io(
        served,
        f"write -P 0x11 {base} {4 * MiB}",
        f"write -z {base} 65536",
        f"write -z -u {base + MiB} {MiB}",
        f"discard {base + 2 * MiB} {MiB}",
        "flush",
        f"read -P 0 {base} 65536",
        f"read -P 0 {base + MiB} {MiB}",
        f"read -P 0x11 {base + 3 * MiB} {MiB}",
    )
    assert file_bytes(served.image, base, 65536) == bytes(65536)
    assert file_bytes(served.image, base + MiB, MiB) == bytes(MiB)
    assert is_hole(served.image, base + MiB, 2 * MiB)  # unmapped zeroes, then the discard
    assert not is_hole(served.image, base + 3 * MiB, MiB)


def is_hole(path: Path, offset: int, length: int) -> bool:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.lseek(fd, offset, os.SEEK_DATA) >= offset + length
    except OSError:  # ENXIO: no data up to the end of the file
        return True
    finally:
        os.close(fd)


def test_qemu_img_info_map_compare_convert(served: Served, tmp_path: Path) -> None:
    qemu_img = require_tool("qemu-img")
    info = json.loads(run(qemu_img, "info", "--output=json", served.uri()).stdout)
    assert info["virtual-size"] == SIZE
    assert _map(qemu_img, "map", "--output=json", "-f", "raw", served.uri()) == _map(
        qemu_img, "map", "--output=json", "-f", "raw", str(served.image)
    )
    run(qemu_img, "compare", "-f", "raw", "-F", "raw", served.uri(), str(served.image))
    out = tmp_path / "copy.qcow2"
    run(qemu_img, "convert", "-f", "raw", "-O", "qcow2", served.uri(), str(out))
    run(qemu_img, "compare", "-f", "qcow2", "-F", "raw", str(out), str(served.image))


def test_qemu_nbd_list(served: Served) -> None:
    out = run(require_tool("qemu-nbd"), "-L", *served.qemu_nbd_args()).stdout
    assert "exports available: 1" in out
    assert "export: 'disk'" in out and "description: test image" in out
    assert "base:allocation" in out and "qemu:allocation-depth" in out


# -- nbdcopy and fio ----------------------------------------------------------------------


@pytest.fixture(params=["unix", "tcp"])
def scratch(request: pytest.FixtureRequest) -> Iterator[Served]:
    """A fresh writable export for tests that rewrite the whole image."""
    with short_tempdir() as tmp:
        image = tmp / "disk.raw"
        image.write_bytes(b"")
        os.truncate(image, SIZE)
        if request.param == "unix":
            address = str(tmp / "s")
            listen = ["-k", address]
        else:
            port = free_port()
            address = f"127.0.0.1:{port}"
            listen = ["-b", "127.0.0.1", "-p", str(port)]
        args = ["-f", "raw", "-x", "disk", "-t", "-e", "8", *listen, str(image)]
        with nbd_tool(args, tmp / "pid"):
            yield Served(image, request.param, address)


def test_nbdcopy_multi_conn_both_ways(scratch: Served, tmp_path: Path) -> None:
    nbdcopy = require_tool("nbdcopy")
    source = tmp_path / "src.raw"
    with open(source, "wb") as f:
        f.truncate(SIZE)
        f.write(os.urandom(8 * MiB))
        f.seek(40 * MiB)
        f.write(os.urandom(3 * MiB + 1234))
    run(nbdcopy, "--connections=4", "--requests=16", str(source), scratch.uri())
    assert scratch.image.read_bytes() == source.read_bytes()
    back = tmp_path / "back.raw"
    run(nbdcopy, "--connections=4", scratch.uri(), str(back))
    assert back.read_bytes() == source.read_bytes()


def test_fio_verify(scratch: Served) -> None:
    fio = require_tool("fio")
    result = run(
        fio, "--name=verify", "--ioengine=nbd", f"--uri={scratch.uri()}", "--rw=randwrite",
        "--bs=4k", "--bsrange=512-64k", "--size=16M", "--iodepth=16", "--verify=crc32c",
        "--do_verify=1", "--verify_fatal=1", "--output-format=json",
    )  # fmt: skip
    out = result.stdout
    job = json.loads(out[out.index("{") :])["jobs"][0]
    assert job["error"] == 0
    assert job["read"]["io_bytes"] >= 16 * MiB  # every block written was read back, verified
