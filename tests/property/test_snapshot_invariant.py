"""The snapshot invariant, attacked by hypothesis.

Invariant: every snapshot byte equals the disk at snapshot time, and each unit is copied at
most once -- whatever mix of concurrent guest writes, write-zeroes and discards (sub-unit and
cross-unit, many threads) runs while snapshot readers read.
"""

from __future__ import annotations

import random
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyfleece.block.memory import MemoryNode
from pyfleece.events import EventBus
from pyfleece.jobs import JobManager
from tests.overlay import OverlayNode

UNITS = 8

pytestmark = pytest.mark.timeout(90)

Op = tuple[str, int, int]  # (kind, offset, length)


def ops(unit: int) -> st.SearchStrategy[Op]:
    size = UNITS * unit
    return st.tuples(
        st.sampled_from(["write", "write", "zero", "discard"]),
        st.integers(0, size - 1),
        st.one_of(st.integers(1, 4096), st.integers(1, 3 * unit)),
    ).map(lambda op: (op[0], op[1], min(op[2], size - op[1])))


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[int, int, list[list[Op]], list[tuple[int, int]]]:
    unit = draw(st.sampled_from([65536, 131072]))
    seed = draw(st.integers(0, 2**32 - 1))
    writers = draw(st.lists(st.lists(ops(unit), min_size=1, max_size=12), min_size=1,
                            max_size=4))  # fmt: skip
    size = UNITS * unit
    reads = draw(st.lists(st.tuples(st.integers(0, size - 1), st.integers(1, 2 * unit)),
                          min_size=1, max_size=12))  # fmt: skip
    return unit, seed, writers, [(o, min(n, size - o)) for o, n in reads]


def initial_disk(size: int, unit: int, seed: int) -> tuple[MemoryNode, bytes]:
    """A disk whose units are random data or holes (zeros never written)."""
    rng = random.Random(seed)
    disk = MemoryNode("disk", size)
    for u in range(size // unit):
        if rng.random() < 0.7:
            disk.write(u * unit, rng.randbytes(unit))
    return disk, disk.read(0, size)


@contextmanager
def fine_grained_switching() -> Iterator[None]:
    """Makes the interpreter switch threads often, so more interleavings happen."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        yield
    finally:
        sys.setswitchinterval(old)


def touched_units(writers: list[list[Op]], unit: int) -> set[int]:
    return {
        u for ops_ in writers for _, o, n in ops_ for u in range(o // unit, (o + n - 1) // unit + 1)
    }


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_snapshot_bytes_equal_the_disk_at_snapshot_time(
    scenario: tuple[int, int, list[list[Op]], list[tuple[int, int]]],
) -> None:
    unit, seed, writers, reads = scenario
    size = UNITS * unit
    disk, frozen = initial_disk(size, unit, seed)
    snap = OverlayNode("snap", size, cluster_size=unit, backing=disk)
    jobs = JobManager(EventBus(), verb_timeout=10)
    job = jobs.start_backup(disk, snap, sync="none", job_id="fleece")
    start = threading.Barrier(len(writers) + 2)
    wrong: list[str] = []
    errors: list[BaseException] = []

    def guest(script: list[Op]) -> None:
        start.wait()
        for kind, offset, length in script:
            if kind == "write":
                disk.write(offset, bytes([(offset + length) % 251 + 1]) * length)
            elif kind == "zero":
                disk.write_zeroes(offset, length)
            else:
                disk.discard(offset, length)

    def reader(rounds: int) -> None:
        start.wait()
        for _ in range(rounds):
            for offset, length in reads:
                if snap.read(offset, length) != frozen[offset : offset + length]:
                    wrong.append(f"snapshot read [{offset}, +{length}) differs")

    def guarded(fn: object, *args: object) -> threading.Thread:
        def body() -> None:
            try:
                fn(*args)  # type: ignore[operator]
            except BaseException as err:
                errors.append(err)

        return threading.Thread(target=body, daemon=True)

    threads = [guarded(guest, script) for script in writers]
    threads += [guarded(reader, 3), guarded(reader, 3)]
    with fine_grained_switching():
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert not any(t.is_alive() for t in threads), "deadlock: a thread never finished"
    assert not errors, errors
    assert not wrong, wrong[:5]
    assert snap.read(0, size) == frozen
    assert all(count == 1 for count in snap.writes.values()), dict(snap.writes)
    touched = touched_units(writers, unit)
    assert set(snap.writes) == touched
    assert job.progress() == (len(touched) * unit, size)
    jobs.block_job_cancel("fleece")
    assert snap.child("backing") is disk
