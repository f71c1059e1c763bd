"""The ``nbd`` block driver: open_image on NBD URIs, blockdev options, the node API passed
through to qemu-nbd, block status as qemu-img map shows it, and a server that dies turning
into EIO."""

from __future__ import annotations

import errno
import json
from pathlib import Path
from typing import Any

import pytest

from pyfleece.block.image import open_image
from pyfleece.block.nbd import NbdNode
from pyfleece.block.registry import OpenContext, open_node
from pyfleece.errors import BlockError, ConfigError
from tests.conftest import require_tool
from tests.integration.nbd_client_peers import free_port, qemu_nbd, run, unix_uri

MiB = 1 << 20
SIZE = 16 * MiB


@pytest.fixture
def chain(tmp_path: Path) -> Path:
    qemu_img, qemu_io = require_tool("qemu-img"), require_tool("qemu-io")
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    run(qemu_img, "create", "-q", "-f", "qcow2", str(base), str(SIZE))
    run(qemu_io, "-f", "qcow2", "-c", "write -P 1 0 2M", str(base))
    run(qemu_img, "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(top))
    run(qemu_io, "-f", "qcow2", "-c", "write -P 2 1M 2M", "-c", "write -z 8M 1M", str(top))
    return top


def _qemu_map(uri: str) -> list[tuple[int, int, bool, bool, int | None]]:
    out = json.loads(run(require_tool("qemu-img"), "map", "--output=json", uri))
    return [(e["start"], e["length"], e["data"], e["zero"], e.get("offset")) for e in out]


def _nbdinfo_allocated(uri: str) -> list[tuple[int, int, bool]]:
    """nbdinfo's qemu:allocation-depth map, as allocated-or-not runs."""
    out = run(require_tool("nbdinfo"), "--map=qemu:allocation-depth", "--json", uri)
    runs: list[tuple[int, int, bool]] = []
    for e in json.loads(out):
        allocated = e["type"] > 0
        if runs and runs[-1][2] == allocated:
            runs[-1] = (runs[-1][0], runs[-1][1] + e["length"], allocated)
        else:
            runs.append((e["offset"], e["length"], allocated))
    return runs


def test_open_image_reads_like_qemu_img_map(tmp_path: Path, chain: Path) -> None:
    with qemu_nbd(tmp_path, chain, "-r", "-A", "-x", "top", fmt="qcow2"):
        uri = unix_uri(tmp_path / "qemu-nbd.sock", "top")
        node = open_image(uri)
        try:
            assert node.driver == "raw" and node.size == SIZE and node.read_only
            protocol = node.child("file")
            assert isinstance(protocol, NbdNode)
            assert node.read(MiB - 1, 2) == b"\x01\x02"
            ours = [(e.offset, e.length, e.data, e.zero, e.host_offset) for e in node.extents()]
            assert ours == _qemu_map(uri)
            # below the raw layer, the server's allocation depth says what its chain holds
            depth = [(e.offset, e.length, e.allocated) for e in protocol.extents()]
            assert depth == _nbdinfo_allocated(uri)
            assert (3 * MiB, 5 * MiB, False) in depth
            with pytest.raises(BlockError) as info:
                node.write(0, b"x")
            assert info.value.errno == errno.EPERM
        finally:
            node.close()


def test_node_api_passes_through(tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    run(require_tool("qemu-img"), "create", "-q", "-f", "raw", str(image), str(SIZE))
    with qemu_nbd(tmp_path, image, "--discard=unmap"):
        uri = unix_uri(tmp_path / "qemu-nbd.sock")
        node = open_image(uri, read_only=False)
        try:
            node.write(MiB, b"\xaa" * MiB, fua=True)
            hole = node.block_status(8 * MiB, 8 * MiB)  # never written
            assert (hole.data, hole.zero, hole.length) == (False, True, 8 * MiB)
            assert node.block_status(MiB, MiB).data
            node.write(12 * MiB, b"x" * 4096)  # the status remembered above is now stale
            assert node.block_status(12 * MiB, 4096).data
            node.write_zeroes(MiB, 4096, may_unmap=False)
            assert node.read(MiB, 8192) == bytes(4096) + b"\xaa" * 4096
            node.discard(4 * MiB, MiB)
            node.flush()
            if node.child("file").can_fast_zero():  # type: ignore[union-attr]
                node.write_zeroes(2 * MiB, MiB, may_unmap=True, fast=True)
        finally:
            node.close()
        check = f"read -P 0xaa {MiB + 4096} 4096"
        out = run(require_tool("qemu-io"), "-r", "-f", "raw", uri, "-c", check)
        assert "Pattern verification failed" not in out and "read 4096/4096" in out


@pytest.mark.parametrize("transport", ["unix", "inet"])
def test_blockdev_options(tmp_path: Path, transport: str) -> None:
    image = tmp_path / "disk.raw"
    image.write_bytes(b"\x42" * MiB)
    port = free_port()
    bind = ["-b", "127.0.0.1", "-p", str(port)] if transport == "inet" else []
    server: dict[str, Any] = (
        {"type": "inet", "host": "127.0.0.1", "port": str(port)}
        if transport == "inet"
        else {"type": "unix", "path": str(tmp_path / "qemu-nbd.sock")}
    )
    with qemu_nbd(tmp_path, image, "-x", "exp", *bind):
        options = {"driver": "nbd", "node-name": "remote", "server": server, "export": "exp"}
        node = open_node(options, OpenContext(read_only=False))
        try:
            assert node.node_name == "remote" and not node.read_only and node.size == MiB
            node.write(0, b"\x43")
            assert node.read(0, 2) == b"\x43\x42"
        finally:
            node.close()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"uri": "nbd://h/x", "export": "y"}, "cannot be used together with 'uri'"),
        ({"server": {"type": "inet", "host": "h", "port": "http"}}, "expects a port number"),
        ({"server": {"type": "vsock", "cid": "3"}}, "does not accept value 'vsock'"),
        ({"server": {"type": "unix", "path": "/s", "bogus": 1}}, "bogus"),
        ({"server": "nope"}, "expected: SocketAddress"),
        ({"uri": "nbd://h/x", "tls-creds": "missing"}, "cannot be used together"),
        ({"server": {"type": "unix", "path": "/s"}, "tls-creds": "nope"}, "No TLS credentials"),
        ({"uri": "http://h/x"}, "unknown scheme 'http'"),
        ({"uri": "nbd://h/x", "x-dirty-bitmap": "b"}, "not supported"),
    ],
)
def test_bad_options(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        open_node({"driver": "nbd", **options})


def test_dead_server_gives_eio(tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    image.write_bytes(bytes(MiB))
    with qemu_nbd(tmp_path, image, "-r"):
        node = open_image(unix_uri(tmp_path / "qemu-nbd.sock"))
    try:  # the server has been stopped under the open node
        with pytest.raises(BlockError) as info:
            node.read(0, 512)
        assert info.value.errno == errno.EIO
        assert "closed the connection" in str(info.value)
    finally:
        node.close()
