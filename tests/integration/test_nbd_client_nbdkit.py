"""The NBD client against nbdkit: the memory plugin's sparse disk, injected errors that come
and go on one connection, block-size constraints the client must honour, and EPERM from a
read-only export."""

from __future__ import annotations

import errno
import json
import os
import threading
from pathlib import Path

import pytest

from pyfleece.errors import BlockError
from pyfleece.nbd.client import NbdClient
from pyfleece.nbd.proto import BASE_ALLOCATION
from tests.conftest import require_tool
from tests.integration.nbd_client_peers import nbdkit, run, unix_uri

MiB = 1 << 20


def test_memory_round_trip_and_holes(tmp_path: Path) -> None:
    with nbdkit(tmp_path, "memory", "16M"):
        uri = unix_uri(tmp_path / "nbdkit.sock")
        data = os.urandom(MiB)
        with NbdClient.connect(uri) as client:
            client.write(2 * MiB, data)
            client.write(9 * MiB + 100, b"edge")
            client.zero(2 * MiB + 65536, 65536)
            expected = data[:65536] + bytes(65536) + data[131072:]
            assert client.read(2 * MiB, MiB) == expected
            ours = [(e.offset, e.length, e.flags) for e in client.block_status()]
        out = run(require_tool("nbdinfo"), "--map", "--json", uri)
        theirs = [(e["offset"], e["length"], e["type"]) for e in json.loads(out)]
        assert ours == theirs
        assert (0, 2 * MiB, 3) in ours  # never written: hole and zero


def test_injected_errors_come_and_go(tmp_path: Path) -> None:
    trigger = tmp_path / "fail-reads"
    plugin = ["--filter=error", "memory", "4M"]
    errors = ["error-pread=EIO", "error-pread-rate=100%", f"error-pread-file={trigger}"]
    errors += ["error-pwrite=ENOSPC", "error-pwrite-rate=100%", f"error-pwrite-file={trigger}"]
    with (
        nbdkit(tmp_path, *plugin, *errors),
        NbdClient.connect(unix_uri(tmp_path / "nbdkit.sock")) as client,
    ):
        client.write(0, b"before")
        trigger.touch()
        with pytest.raises(BlockError) as info:
            client.read(0, 6)
        assert info.value.errno == errno.EIO
        with pytest.raises(BlockError) as info:
            client.write(0, b"during")
        assert info.value.errno == errno.ENOSPC
        trigger.unlink()
        assert client.read(0, 6) == b"before"


def test_block_size_constraints_are_honoured(tmp_path: Path) -> None:
    policy = [
        "--filter=blocksize-policy",
        "memory",
        "4M",
        "blocksize-minimum=4096",
        "blocksize-preferred=65536",
        "blocksize-maximum=1M",
        "blocksize-error-policy=error",  # anything unaligned or too big gets EINVAL
    ]
    with nbdkit(tmp_path, *policy), NbdClient.connect(unix_uri(tmp_path / "nbdkit.sock")) as c:
        assert (c.info.min_block, c.info.max_payload, c.max_io) == (4096, MiB, MiB)
        c.write(0, b"\x01" * (3 * MiB))  # split to the maximum
        c.zero(10, 3 * 4096)  # explicit zeros at the unaligned edges
        c.write(5000, b"hello")  # read-modify-write of one block
        expected = bytearray(b"\x01" * (3 * MiB))
        expected[10 : 10 + 3 * 4096] = bytes(3 * 4096)
        expected[5000:5005] = b"hello"
        assert c.read(1, 3 * MiB - 1) == expected[1:]  # padded, then split
        c.trim(100, 8192)  # only the whole block inside is trimmed
        assert c.read(0, 100) == expected[:100]
        # the policy is real: an unaligned request sent as is gets EINVAL
        with pytest.raises(BlockError) as info:
            c.submit_read(1, memoryview(bytearray(4095))).wait(10)
        assert info.value.errno == errno.EINVAL


def test_read_only_export_answers_eperm(tmp_path: Path) -> None:
    with (
        nbdkit(tmp_path, "-r", "memory", "1M"),
        NbdClient.connect(unix_uri(tmp_path / "nbdkit.sock"), strict=False) as client,
    ):
        assert client.read_only
        with pytest.raises(BlockError) as info:
            client.write(0, b"x")
        assert info.value.errno == errno.EPERM
        assert client.read(0, 1) == b"\0"


def test_concurrent_callers_get_their_own_data(tmp_path: Path) -> None:
    with (
        nbdkit(tmp_path, "memory", "8M"),
        NbdClient.connect(unix_uri(tmp_path / "nbdkit.sock"), contexts=[BASE_ALLOCATION]) as client,
    ):
        failures: list[BaseException] = []

        def worker(k: int) -> None:
            try:
                block = bytes([k]) * 65536
                for i in range(16):
                    offset = (k * 16 + i) * 65536
                    client.write(offset, block)
                    if client.read(offset, 65536) != block:
                        raise AssertionError(f"thread {k}: bad data at {offset}")
            except BaseException as err:
                failures.append(err)

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not failures
        whole = client.read(0, 8 * MiB)
        assert all(whole[k * MiB : (k + 1) * MiB] == bytes([k]) * MiB for k in range(8))
