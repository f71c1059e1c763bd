"""The NBD client against qemu-nbd and qemu-storage-daemon: what it writes, qemu-io reads;
what qemu-io wrote, it reads; its block status, export list and errors agree with nbdinfo
and qemu-img."""

from __future__ import annotations

import errno
import json
import os
import socket
from pathlib import Path

import pytest

from pyfleece.errors import BlockError
from pyfleece.nbd.client import NbdClient, list_exports, list_meta_contexts
from pyfleece.nbd.proto import ALLOCATION_DEPTH, BASE_ALLOCATION, TransmitFlag
from tests.conftest import require_tool
from tests.integration.nbd_client_peers import daemon, free_port, qemu_nbd, run, unix_uri

MiB = 1 << 20
SIZE = 8 * MiB

# (operation, offset, length, byte it must read back as afterwards)
CLIENT_OPS = [
    ("write", 0, 65536, 0xAA),
    ("write-fua", MiB + 512, 4096, 0x55),
    ("write", 3 * MiB + 7, 3, 0x11),  # tiny and unaligned
    ("zero", 65536, 131072, 0x00),  # may trim
    ("zero-no-hole", 4 * MiB, MiB, 0x00),
    ("write", 5 * MiB - 2048, 4 * MiB // 2, 0x3C),  # crosses the 4 MiB zeroed range's end
]
BACKGROUND = 0x77


def apply(client: NbdClient, model: bytearray) -> None:
    for op, offset, length, byte in CLIENT_OPS:
        if op.startswith("write"):
            client.write(offset, bytes([byte]) * length, fua=op == "write-fua")
        elif op == "zero":
            client.zero(offset, length)
        else:
            client.zero(offset, length, may_trim=False)
        model[offset : offset + length] = bytes([byte]) * length


def qemu_io_verify(uri: str, model: bytes) -> None:
    """qemu-io, as a second client, reads every range of the model as its pattern."""
    qemu_io = require_tool("qemu-io")
    commands: list[str] = []
    runs: list[tuple[int, int, int]] = []
    start = 0
    for pos in range(1, len(model) + 1):
        if pos == len(model) or model[pos] != model[start]:
            runs.append((start, pos - start, model[start]))
            start = pos
    for offset, length, byte in runs:
        commands += ["-c", f"read -P {byte} {offset} {length}"]
    out = run(qemu_io, "-r", "-f", "raw", uri, *commands)
    assert "Pattern verification failed" not in out
    for offset, length, _ in runs:
        assert f"read {length}/{length} bytes at offset {offset}" in out


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.raw"
    qemu_img = require_tool("qemu-img")
    run(qemu_img, "create", "-q", "-f", "raw", str(path), str(SIZE))
    run(require_tool("qemu-io"), "-f", "raw", "-c", f"write -P {BACKGROUND} 0 {SIZE}", str(path))
    return path


def test_writes_read_back_by_qemu_io(tmp_path: Path, image: Path) -> None:
    model = bytearray([BACKGROUND]) * SIZE
    with qemu_nbd(tmp_path, image, "--discard=unmap"):
        uri = unix_uri(tmp_path / "qemu-nbd.sock")
        with NbdClient.connect(uri) as client:
            assert client.size == SIZE and not client.read_only
            assert client.can(TransmitFlag.SEND_WRITE_ZEROES | TransmitFlag.SEND_FUA)
            apply(client, model)
            client.trim(7 * MiB, MiB)  # advisory: no expectation on the contents
            client.flush()
            client.cache(0, MiB)
            model[7 * MiB :] = client.read(7 * MiB, MiB)
            assert client.read(0, SIZE) == model
        qemu_io_verify(uri, model)
    assert image.read_bytes() == model


def test_reads_what_qemu_io_wrote(tmp_path: Path) -> None:
    path = tmp_path / "sparse.raw"
    run(require_tool("qemu-img"), "create", "-q", "-f", "raw", str(path), str(SIZE))
    writes = [(0, 4096, 1), (MiB, 65536, 2), (2 * MiB + 100, 10, 3), (SIZE - 512, 512, 4)]
    qemu_io = require_tool("qemu-io")
    run(qemu_io, "-f", "raw", *[f"-cwrite -P {b} {o} {n}" for o, n, b in writes], str(path))
    with (
        qemu_nbd(tmp_path, path, "-r"),
        NbdClient.connect(unix_uri(tmp_path / "qemu-nbd.sock")) as client,
    ):
        assert client.read_only and client.info.structured
        for offset, length, byte in writes:
            assert client.read(offset, length) == bytes([byte]) * length
        # the holes come back as hole chunks, the data as data chunks
        assert client.read(0, SIZE) == path.read_bytes()


def _merged(extents: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    out: list[tuple[int, int, int]] = []
    for offset, length, flags in extents:
        if out and out[-1][2] == flags and out[-1][0] + out[-1][1] == offset:
            out[-1] = (out[-1][0], out[-1][1] + length, flags)
        else:
            out.append((offset, length, flags))
    return out


def _nbdinfo_map(uri: str, context: str) -> list[tuple[int, int, int]]:
    out = run(require_tool("nbdinfo"), f"--map={context}", "--json", uri)
    return _merged([(e["offset"], e["length"], e["type"]) for e in json.loads(out)])


@pytest.fixture
def chain(tmp_path: Path) -> Path:
    """A qcow2 image over a backing file: data from both layers, zeros, and holes."""
    qemu_img, qemu_io = require_tool("qemu-img"), require_tool("qemu-io")
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    run(qemu_img, "create", "-q", "-f", "qcow2", str(base), str(SIZE))
    run(qemu_io, "-f", "qcow2", "-c", "write -P 1 0 1M", "-c", "write -P 2 6M 64k", str(base))
    run(qemu_img, "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(top))
    run(qemu_io, "-f", "qcow2", "-c", "write -P 3 512k 1M", "-c", "write -z 3M 1M", str(top))
    return top


def test_block_status_matches_nbdinfo(tmp_path: Path, chain: Path) -> None:
    with qemu_nbd(tmp_path, chain, "-r", "-A", "-x", "top", fmt="qcow2"):
        uri = unix_uri(tmp_path / "qemu-nbd.sock", "top")
        assert list_meta_contexts(uri) == [BASE_ALLOCATION, ALLOCATION_DEPTH]
        with NbdClient.connect(uri, contexts=[BASE_ALLOCATION, ALLOCATION_DEPTH]) as client:
            for context in (BASE_ALLOCATION, ALLOCATION_DEPTH):
                ours = _merged([tuple(e) for e in client.block_status(context=context)])
                assert ours == _nbdinfo_map(uri, context), context
                assert len(ours) > 2  # the image is not uniform: the test can fail
            # a window in the middle, clipped to what was asked
            window = list(client.block_status(MiB - 4096, 8192))
            assert window[0].offset == MiB - 4096 and sum(e.length for e in window) == 8192


def test_list_exports_matches_nbdinfo(tmp_path: Path, image: Path) -> None:
    qsd = require_tool("qemu-storage-daemon")
    sock, pid = tmp_path / "qsd.sock", tmp_path / "qsd.pid"
    args = [
        qsd,
        "--blockdev", f"driver=file,node-name=f,filename={image},read-only=on",
        "--nbd-server", f"addr.type=unix,addr.path={sock}",
        "--export", "type=nbd,id=e1,node-name=f,name=first,description=The first one",
        "--export", "type=nbd,id=e2,node-name=f,name=second",
        "--pidfile", str(pid),
    ]  # fmt: skip
    with daemon(args, pid, sock):
        ours = list_exports(unix_uri(sock))
        out = json.loads(run(require_tool("nbdinfo"), "--list", "--json", unix_uri(sock)))
        theirs = [(e["export-name"], e.get("description", "")) for e in out["exports"]]
        assert sorted(ours) == sorted(theirs) == [("first", "The first one"), ("second", "")]
        with NbdClient.connect(unix_uri(sock, "second")) as client:
            assert client.size == SIZE and client.read(0, 4) == bytes([BACKGROUND]) * 4


@pytest.mark.parametrize("family", ["127.0.0.1", "::1"], ids=["ipv4", "ipv6"])
def test_tcp(tmp_path: Path, image: Path, family: str) -> None:
    if family == "::1":
        try:
            socket.socket(socket.AF_INET6).close()
        except OSError:
            pytest.skip("no IPv6 on this host")
    port = free_port()
    host = f"[{family}]" if ":" in family else family
    with (
        qemu_nbd(tmp_path, image, "-b", family, "-p", str(port), "-x", "d"),
        NbdClient.connect(f"nbd://{host}:{port}/d") as client,
    ):
        client.write(MiB, b"tcp" * 1000)
        edge = bytes([BACKGROUND])
        assert client.read(MiB - 1, 3002) == edge + b"tcp" * 1000 + edge


def test_error_replies_keep_the_connection(tmp_path: Path, image: Path) -> None:
    with qemu_nbd(tmp_path, image, "-r"):
        uri = unix_uri(tmp_path / "qemu-nbd.sock")
        with NbdClient.connect(uri, strict=False) as client:
            with pytest.raises(BlockError) as info:
                client.read(SIZE - 512, 4096)  # past the end: the server says EINVAL
            assert info.value.errno == errno.EINVAL
            assert "qemu-nbd.sock" in str(info.value)
            with pytest.raises(BlockError, match="read-only") as info:
                client.write(0, b"x" * 512)
            # qemu-nbd 7.2 answers writes to a read-only export with EINVAL (libnbd sees the
            # same); nbdkit's EPERM is checked in test_nbd_client_nbdkit.py
            assert info.value.errno == errno.EINVAL
            assert client.read(0, 512) == bytes([BACKGROUND]) * 512
        with NbdClient.connect(uri) as client:  # strict: refused before sending
            with pytest.raises(BlockError) as info:
                client.zero(0, 512)
            assert info.value.errno == errno.EPERM


def test_pipelined_reads_from_one_thread(tmp_path: Path) -> None:
    path = tmp_path / "random.raw"
    path.write_bytes(os.urandom(4 * MiB))
    with (
        qemu_nbd(tmp_path, path, "-r"),
        NbdClient.connect(unix_uri(tmp_path / "qemu-nbd.sock")) as client,
    ):
        buf = memoryview(bytearray(4 * MiB))
        cmds = [client.submit_read(o, buf[o : o + 65536]) for o in range(0, 4 * MiB, 65536)]
        for cmd in cmds:
            cmd.wait(30)
        assert bytes(buf) == path.read_bytes()


def test_dirty_bitmap_context(tmp_path: Path) -> None:
    """The pull-backup client's incremental case: a qcow2 bitmap's dirty ranges."""
    qemu_img, qemu_io = require_tool("qemu-img"), require_tool("qemu-io")
    path = tmp_path / "disk.qcow2"
    run(qemu_img, "create", "-q", "-f", "qcow2", str(path), str(SIZE))
    run(qemu_io, "-f", "qcow2", "-c", "write -P 1 0 1M", str(path))  # before the bitmap
    run(qemu_img, "bitmap", "--add", str(path), "b0")
    run(qemu_io, "-f", "qcow2", "-c", "write -P 2 2M 64k", "-c", "write -P 3 5M 1M", str(path))
    context = "qemu:dirty-bitmap:b0"
    with qemu_nbd(tmp_path, path, "-r", "-B", "b0", fmt="qcow2"):
        uri = unix_uri(tmp_path / "qemu-nbd.sock")
        with NbdClient.connect(uri, contexts=[BASE_ALLOCATION, context]) as client:
            ours = _merged([tuple(e) for e in client.block_status(context=context)])
        assert ours == _nbdinfo_map(uri, context)
        dirty = [(offset, length) for offset, length, flags in ours if flags & 1]
        assert dirty == [(2 * MiB, 65536), (5 * MiB, MiB)]
