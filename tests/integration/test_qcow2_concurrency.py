"""Many threads on one qcow2 node: no lost writes, one allocation per guest cluster, no
leaks, and a read never returns another guest cluster's data, even while clusters are
discarded and their host clusters reused."""

from __future__ import annotations

import errno
import os
import random
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from pyfleece.block.fault import FaultNode, Rule
from pyfleece.block.image import open_image
from pyfleece.block.node import Node
from pyfleece.block.qcow2.driver import Qcow2Node
from pyfleece.block.qcow2.format import OFFSET_MASK
from pyfleece.block.registry import open_node
from pyfleece.errors import BlockError
from tests.integration.qcow2_oracle import assert_clean, check, compare_raw, create

SECTOR = 512


def _threads(count: int, target: Callable[[int], None], timeout: float = 60) -> None:
    """Runs ``target(i)`` in ``count`` threads; re-raises the first failure."""
    errors: list[BaseException] = []

    def wrap(i: int) -> None:
        try:
            target(i)
        except BaseException as err:  # reported below
            errors.append(err)

    threads = [threading.Thread(target=wrap, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
        assert not t.is_alive(), "a worker thread hung (deadlock?)"
    if errors:
        raise errors[0]


def _stamped(offset: int, length: int, generation: int) -> bytes:
    """Data whose every sector names its own guest offset."""
    out = bytearray()
    for sector in range(offset // SECTOR, (offset + length) // SECTOR):
        out += struct.pack(">QQ", sector * SECTOR, generation) + bytes(SECTOR - 16)
    return bytes(out)


def _check_stamps(data: bytes, offset: int, backing: bytes) -> None:
    for i in range(0, len(data), SECTOR):
        sector = data[i : i + SECTOR]
        at = offset + i
        if sector == bytes(SECTOR) or sector == backing[at : at + SECTOR]:
            continue
        (owner,) = struct.unpack_from(">Q", sector)
        assert owner == at, f"read at {at} returned the data of guest offset {owner}"


@pytest.mark.parametrize("cs", [512, 4096, 65536])
def test_disjoint_writers_and_zeroers(tmp_path: Path, cs: int) -> None:
    """Eight threads share every cluster, each owning one eighth of it."""
    clusters = 24
    size = clusters * cs
    image = create(tmp_path / "t.qcow2", size, f"cluster_size={cs}")
    node = open_image(str(image), read_only=False)
    part = cs // 8
    model = bytearray(size)
    lock = threading.Lock()

    def work(t: int) -> None:
        rnd = random.Random(t)
        for _ in range(150):
            offset = rnd.randrange(clusters) * cs + t * part
            length = part if rnd.random() < 0.7 else rnd.randrange(1, part)
            if rnd.random() < 0.75:
                data = bytes([rnd.randrange(1, 256)]) * length
                node.write(offset, data)
            else:
                data = bytes(length)
                node.write_zeroes(offset, length, may_unmap=rnd.random() < 0.5)
            with lock:
                model[offset : offset + length] = data

    try:
        _threads(8, work)
        assert node.read(0, size) == model
    finally:
        node.close()
    assert_clean(image)
    compare_raw(image, bytes(model))


def test_writers_to_the_same_new_clusters_allocate_once(tmp_path: Path) -> None:
    cs, clusters, writers = 65536, 16, 8
    size = clusters * cs
    backing = tmp_path / "b.raw"
    base = bytes(range(256)) * (size // 256)
    backing.write_bytes(base)
    image = create(tmp_path / "t.qcow2", size, f"cluster_size={cs}", backing="b.raw")
    node = open_image(str(image), read_only=False)
    part = cs // writers
    start = threading.Barrier(writers)

    def work(t: int) -> None:
        start.wait(10)
        for c in range(clusters):
            node.write(c * cs + t * part + 1, bytes([t + 1]) * (part - 2))

    try:
        _threads(writers, work)
    finally:
        node.close()
    model = bytearray(base)
    for c in range(clusters):
        for t in range(writers):
            at = c * cs + t * part + 1
            model[at : at + part - 2] = bytes([t + 1]) * (part - 2)
    code, report = check(image)
    assert code == 0, report
    assert report["allocated-clusters"] == clusters
    compare_raw(image, bytes(model))


def _churn(node: Node, size: int, cs: int, rounds: int) -> Callable[[int], None]:
    """Writers that keep discarding, zeroing and rewriting stamped data; readers that
    check every sector they read; a flusher that lets freed clusters be reused."""
    stop = threading.Event()
    done = threading.Barrier(3)

    def work(i: int) -> None:
        rnd = random.Random(i)
        if i == 0:
            while not stop.is_set():
                node.flush()
            return
        if i < 4:  # writers
            for generation in range(rounds):
                offset = rnd.randrange(size // cs) * cs
                length = min(size - offset, rnd.randrange(1, 4) * cs)
                choice = rnd.random()
                if choice < 0.5:
                    node.write(offset, _stamped(offset, length, generation))
                elif choice < 0.75:
                    node.discard(offset, length)
                else:
                    node.write_zeroes(offset, length, may_unmap=True)
            if done.wait(60) == 0:
                stop.set()
            return
        while not stop.is_set():  # readers
            offset = rnd.randrange(size // SECTOR) * SECTOR
            length = min(size - offset, rnd.randrange(1, 9) * SECTOR)
            _check_stamps(node.read(offset, length), offset, b"")

    return work


@pytest.mark.parametrize("cs", [512, 4096])
def test_reads_never_see_another_clusters_data(tmp_path: Path, cs: int) -> None:
    size = 64 * cs
    image = create(tmp_path / "t.qcow2", size, f"cluster_size={cs}")
    node = open_image(str(image), read_only=False)
    try:
        node.write(0, _stamped(0, size, 0))
        _threads(7, _churn(node, size, cs, rounds=400))
        _check_stamps(node.read(0, size), 0, b"")
    finally:
        node.close()
    assert_clean(image)


def test_overlapping_writers_zeroers_discarders(tmp_path: Path) -> None:
    """Overlapping requests may land in any order, but the image stays consistent and
    every sector holds zeros, the backing file's data, or data stamped for its place."""
    cs = 4096
    size = 32 * cs
    backing = tmp_path / "b.raw"
    base = b"\xbb" * (size // 2)
    backing.write_bytes(base)
    image = create(tmp_path / "t.qcow2", size, f"cluster_size={cs}", backing="b.raw")
    node = open_image(str(image), read_only=False)

    def work(t: int) -> None:
        rnd = random.Random(100 + t)
        for generation in range(200):
            offset = rnd.randrange(size // SECTOR) * SECTOR
            length = min(size - offset, rnd.randrange(1, 3 * cs // SECTOR) * SECTOR)
            choice = rnd.random()
            if choice < 0.5:
                node.write(offset, _stamped(offset, length, generation))
            elif choice < 0.7:
                node.write_zeroes(offset, length, may_unmap=rnd.random() < 0.5)
            elif choice < 0.9:
                node.discard(offset, length)
            else:
                node.flush()

    try:
        _threads(6, work)
        _check_stamps(node.read(0, size), 0, base + bytes(size - len(base)))
    finally:
        node.close()
    assert_clean(image)


# -- staged races: the fault node holds one request while others go on -----------------------


def _wait_until(condition: Callable[[], bool], timeout: float = 10) -> None:
    """Polls ``condition`` until it holds; fails after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        threading.Event().wait(0.001)


def _open_over_fault(image: Path, spare: int) -> tuple[Qcow2Node, FaultNode]:
    """Opens the image over a fault node; ``spare`` bytes are added to the file first,
    because the fault node (unlike a file node) does not grow."""
    with open(image, "r+b") as f:
        f.truncate(os.path.getsize(image) + spare)
    spec = {"driver": "fault", "image": {"driver": "file", "filename": str(image)}}
    node = open_node({"driver": "qcow2", "file": spec, "read-only": False})
    assert isinstance(node, Qcow2Node) and isinstance(node.file, FaultNode)
    return node, node.file


@pytest.mark.parametrize("held", ["read", "write"])
def test_held_request_keeps_its_cluster_from_reuse(tmp_path: Path, held: str) -> None:
    """A read (or in-place write) of guest cluster A is held at the host cluster X while A
    is discarded, the discard flushed and cluster B written: B must not get X, or the held
    request would read B's data (or overwrite it)."""
    cs = 4096
    image = create(tmp_path / "t.qcow2", 16 * cs, f"cluster_size={cs}")
    node, fault = _open_over_fault(image, 1 << 20)
    a, b = 2 * cs, 9 * cs
    result: list[bytes] = []
    try:
        node.write(a, _stamped(a, cs, 1))
        node.flush()
        host = node.block_status(a, cs).host_offset
        assert host is not None
        pause = threading.Event()
        rule = fault.add_rule(Rule(op=held, offset=host, length=cs, pause=pause))

        def held_request() -> None:
            if held == "read":
                result.append(node.read(a, cs))
            else:
                node.write(a, _stamped(a, cs, 2))

        worker = threading.Thread(target=held_request)
        worker.start()
        try:
            assert rule.reached.wait(10)
            node.discard(a, cs)
            node.flush()
            node.write(b, _stamped(b, cs, 3))
            node.flush()
            assert node.block_status(b, cs).host_offset != host
        finally:
            pause.set()
            worker.join(10)
        assert not worker.is_alive()
        if held == "read":
            _check_stamps(result[0], a, b"")
        _check_stamps(node.read(0, 16 * cs), 0, b"")
        assert node.read(b, cs) == _stamped(b, cs, 3)
        node.flush()  # the held request is done: the discarded cluster is released now
    finally:
        node.close()
    assert_clean(image)


def test_second_writer_waits_for_the_first_allocation(tmp_path: Path) -> None:
    """Writer 1 is held while writing a new cluster's data; writer 2 writes another part of
    the same guest cluster meanwhile. One allocation, both writes land, no leak."""
    cs = 65536
    image = create(tmp_path / "t.qcow2", 8 * cs, f"cluster_size={cs}")
    end = os.path.getsize(image)
    node, fault = _open_over_fault(image, 1 << 20)
    pause = threading.Event()
    rule = fault.add_rule(Rule(op="write", offset=end, pause=pause))
    first = threading.Thread(target=node.write, args=(cs, b"\x01" * 1000))
    second = threading.Thread(target=node.write, args=(cs + 5000, b"\x02" * 1000))
    try:
        first.start()
        assert rule.reached.wait(10)
        second.start()
        _wait_until(lambda: len(node.tracker.in_flight()) == 2)
        pause.set()
        first.join(10)
        second.join(10)
        assert not first.is_alive() and not second.is_alive()
        want = bytes(1000) + b"\x01" * 1000 + bytes(4000) + b"\x02" * 1000
        assert node.read(cs - 1000, 7000) == want
    finally:
        pause.set()
        node.close()
    code, report = check(image)
    assert code == 0, report
    assert report["allocated-clusters"] == 1


def test_an_allocation_that_fails_late_leaves_its_guest_cluster_free(tmp_path: Path) -> None:
    """Writer 1's new cluster is written, but its L2 table left the cache meanwhile and
    reading it back fails (EIO). Writer 1 fails; its guest cluster must not stay busy, or
    every later write to it waits for ever, and its host cluster must not leak."""
    cs = 4096
    per_table = cs // 8 * cs  # the guest bytes one L2 table maps
    tables = 20
    image = create(tmp_path / "t.qcow2", tables * per_table, f"cluster_size={cs}")
    spec = {"driver": "fault", "image": {"driver": "file", "filename": str(image)}}
    node = open_node(
        {"driver": "qcow2", "file": spec, "read-only": False, "l2-cache-size": 16 * cs}
    )
    assert isinstance(node, Qcow2Node) and isinstance(node.file, FaultNode)
    fault = node.file
    errors: list[BaseException] = []

    def first_writer() -> None:
        try:
            node.write(cs, b"\x02" * cs)
        except BaseException as err:  # checked below
            errors.append(err)

    try:
        for t in range(tables):
            node.write(t * per_table, b"\x01" * cs)
        node.flush()  # every L2 table is on disk and clean: the cache may drop it
        l2 = node.map.l1[0] & OFFSET_MASK
        pause = threading.Event()
        held = fault.add_rule(Rule(op="write", pause=pause))
        first = threading.Thread(target=first_writer)
        first.start()
        assert held.reached.wait(10)  # the new cluster's data is being written
        for t in range(1, tables):
            node.read(t * per_table, 512)  # table 0 leaves the cache
        fault.add_rule(Rule(op="read", offset=l2, length=cs, errno=errno.EIO))
        pause.set()
        first.join(10)
        assert not first.is_alive() and len(errors) == 1
        assert isinstance(errors[0], BlockError) and errors[0].errno == errno.EIO
        second = threading.Thread(target=node.write, args=(cs, b"\x03" * cs), daemon=True)
        second.start()
        second.join(10)
        assert not second.is_alive(), "the second writer waits for a cluster left busy"
        assert node.read(0, 2 * cs) == b"\x01" * cs + b"\x03" * cs
    finally:
        pause.set()
        node.close()
    assert_clean(image)
