"""The backup job's background copy: full and top onto memory and file nodes, the speed
limit, and point-in-time semantics while the guest writes."""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest

from pyfleece.block.file import FileNode
from pyfleece.block.memory import MemoryNode
from pyfleece.block.node import Node
from pyfleece.events import EventBus
from pyfleece.jobs import JobManager
from pyfleece.jobs.backup import CHUNK
from tests.jobaids import Recorder, wait_until
from tests.overlay import OverlayNode

KiB, MiB = 1 << 10, 1 << 20
SIZE = 4 * MiB

pytestmark = pytest.mark.timeout(30)


def random_disk(name: str = "src") -> MemoryNode:
    """4 MiB of random 64 KiB units, a third of them holes."""
    rng = random.Random(4)
    disk = MemoryNode(name, SIZE)
    for u in range(SIZE // (64 * KiB)):
        if rng.random() < 0.66:
            disk.write(u * 64 * KiB, rng.randbytes(64 * KiB))
    return disk


def file_node(path: Path, name: str) -> FileNode:
    with open(path, "wb") as f:
        f.truncate(SIZE)
    return FileNode(name, str(path), read_only=False)


@pytest.mark.parametrize("kind", ["memory", "file"])
def test_full_backup_equals_the_source(bus: EventBus, tmp_path: Path, kind: str) -> None:
    rec = Recorder(bus)
    source = random_disk()
    target: Node = (
        MemoryNode("tgt", SIZE) if kind == "memory" else file_node(tmp_path / "t.raw", "tgt")
    )
    jobs = JobManager(bus)
    jobs.start_backup(source, target, sync="full", job_id="b0")
    done = rec.wait_for("BLOCK_JOB_COMPLETED")
    assert "error" not in done.data and done.data["offset"] == done.data["len"] == SIZE
    assert target.read(0, SIZE) == source.read(0, SIZE)
    assert target.refs() == [] and source.refs() == []


def test_top_backup_copies_what_the_top_layer_allocates(bus: EventBus) -> None:
    # As measured on qemu-storage-daemon: a 128 KiB write and a 64 KiB zero write in the
    # top layer give len = offset = 196608.
    base = MemoryNode("base", SIZE)
    base.write(0, b"\x01" * (2 * MiB))
    top = OverlayNode("top", SIZE, backing=base)
    top.write(1 * MiB, b"\x02" * (128 * KiB))
    top.write_zeroes(3 * MiB, 64 * KiB)
    target = MemoryNode("tgt", SIZE)
    target.write(3 * MiB, b"\xff" * (64 * KiB))  # proves the zero unit is written
    rec = Recorder(bus)
    JobManager(bus).start_backup(top, target, sync="top", job_id="t0")
    done = rec.wait_for("BLOCK_JOB_COMPLETED").data
    assert (done["len"], done["offset"]) == (196608, 196608)
    expected = bytearray(SIZE)
    expected[1 * MiB : 1 * MiB + 128 * KiB] = b"\x02" * (128 * KiB)
    assert target.read(0, SIZE) == bytes(expected)


def test_speed_limit_holds_the_copy_until_lifted(bus: EventBus) -> None:
    rec = Recorder(bus)
    source, target = random_disk(), MemoryNode("tgt", SIZE)
    jobs = JobManager(bus)
    job = jobs.start_backup(source, target, sync="full", job_id="s0", speed=1)
    wait_until(lambda: not job.busy and job.progress()[0] > 0, what="the job to throttle")
    info = jobs.query_block_jobs()[0]
    assert (info["offset"], info["status"], info["speed"]) == (CHUNK, "running", 1)
    jobs.block_job_set_speed("s0", 0)  # wakes the throttled job at once
    rec.wait_for("BLOCK_JOB_COMPLETED")
    assert target.read(0, SIZE) == source.read(0, SIZE)


def test_speed_limit_is_a_lower_bound_on_duration(bus: EventBus) -> None:
    rec = Recorder(bus)
    speed = 16 * MiB
    started = time.monotonic()
    JobManager(bus).start_backup(random_disk(), MemoryNode("t", SIZE), sync="full",
                                 job_id="s1", speed=speed)  # fmt: skip
    rec.wait_for("BLOCK_JOB_COMPLETED")
    # The first chunk goes at once; the rest cannot go faster than the limit.
    assert time.monotonic() - started >= (SIZE - CHUNK) / speed * 0.95


def test_full_backup_is_point_in_time(bus: EventBus) -> None:
    rec = Recorder(bus)
    source, target = random_disk(), MemoryNode("tgt", SIZE)
    frozen = source.read(0, SIZE)
    jobs = JobManager(bus)
    job = jobs.start_backup(source, target, sync="full", job_id="p0", speed=1)
    wait_until(lambda: not job.busy and job.progress()[0] > 0, what="the job to throttle")
    source.write(100, b"\xee" * 10)  # already copied: no copy needed
    source.write(3 * MiB - 5, b"\xee" * 10)  # not yet: copied first
    source.discard(2 * MiB, 64 * KiB)
    assert job.progress()[0] == CHUNK + 3 * 64 * KiB
    jobs.block_job_set_speed("p0", 0)
    rec.wait_for("BLOCK_JOB_COMPLETED")
    assert target.read(0, SIZE) == frozen
