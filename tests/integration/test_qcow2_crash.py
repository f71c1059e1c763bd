"""Crash safety: a process writing through our qcow2 driver is killed with SIGKILL at random
instants, many times over. ``qemu-img check`` never finds corruption (leaks are allowed),
and everything acknowledged by a flush before the kill reads back intact.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from pyfleece.block.image import open_image
from tests.integration.qcow2_crash_child import Op, crash_ops
from tests.integration.qcow2_oracle import check, create, to_raw

ROOT = Path(__file__).resolve().parents[2]
SIZE = 4 << 20
RUNS = 32
# (options, backing): 512-byte clusters with 64-bit refcounts make the refcount table grow.
CONFIGS = [
    ("cluster_size=512,refcount_bits=64", False),
    ("cluster_size=4096", True),
    ("cluster_size=65536", False),
    ("cluster_size=4096,compat=0.10", False),
    ("cluster_size=65536,compat=0.10", True),
]


def _run_and_kill(image: Path, seed: int, kill_after: int, delay: float) -> tuple[int, int]:
    """Runs the writer, kills it ``delay`` seconds after its ``kill_after``-th line;
    returns (last completed op, last acknowledged flush), -1 for none."""
    env = dict(os.environ, PYTHONPATH=f"{ROOT / 'src'}{os.pathsep}{ROOT}")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.integration.qcow2_crash_child", str(image), str(seed)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
        env=env,
    )
    watchdog = threading.Timer(60, proc.kill)
    watchdog.start()
    completed = flushed = -1
    lines = 0
    try:
        assert proc.stdout is not None
        for raw in proc.stdout:
            text = raw.decode().split()
            index = int(text[-1])
            completed = max(completed, index)
            if text[0] == "f":
                flushed = index
            lines += 1
            if lines == kill_after:
                # Not a synchronisation: this picks the instant of the kill, somewhere
                # inside the next operation (often a flush: the interesting part).
                time.sleep(delay)
                os.kill(proc.pid, signal.SIGKILL)
        code = proc.wait()
    finally:
        watchdog.cancel()
    assert proc.stderr is not None
    errors = proc.stderr.read().decode()
    assert code in (0, -signal.SIGKILL), f"writer failed ({code}): {errors}"
    return completed, flushed


def _apply(model: bytearray, op: Op, *, v2_backing: bool, cs: int) -> None:
    kind, offset, length, arg = op
    if kind == "write":
        model[offset : offset + length] = bytes([arg]) * length
    elif kind == "zero":
        model[offset : offset + length] = bytes(length)
    elif kind == "discard" and not v2_backing:
        start = -(-offset // cs) * cs
        end = offset + length
        stop = SIZE if end == SIZE else end // cs * cs
        if start < stop:
            model[start:stop] = bytes(stop - start)


def _expected(
    base: bytes, ops: list[Op], completed: int, flushed: int, data: bytes, **kw: int
) -> bytes:
    """The model after the last flush, except where later operations may have landed."""
    model = bytearray(base)
    for op in ops[: flushed + 1]:
        _apply(model, op, v2_backing=bool(kw["v2_backing"]), cs=kw["cs"])
    for kind, offset, length, _ in ops[flushed + 1 : completed + 2]:
        if kind != "flush":
            model[offset : offset + length] = data[offset : offset + length]
    return bytes(model)


def test_sigkill_at_random_instants(tmp_path: Path) -> None:
    rnd = random.Random(20240601)
    for run in range(RUNS):
        options, with_backing = CONFIGS[run % len(CONFIGS)]
        cs = int(options.split(",")[0].split("=")[1])
        base = bytearray(SIZE)
        kwargs = {}
        if with_backing:
            raw = tmp_path / f"b{run}.raw"
            pattern = bytes(range(256)) * (SIZE // 2 // 256)
            raw.write_bytes(pattern)
            base[: len(pattern)] = pattern
            kwargs = {"backing": raw.name, "backing_fmt": "raw"}
        image = create(tmp_path / f"r{run}.qcow2", SIZE, options, **kwargs)
        seed = rnd.randrange(1 << 30)
        kill_after = rnd.randrange(1, 300)
        completed, flushed = _run_and_kill(image, seed, kill_after, rnd.uniform(0, 0.004))

        code, report = check(image)
        assert code in (0, 3), f"run {run} ({options}): qemu-img check exit {code}: {report}"
        ops = crash_ops(seed, SIZE, cs)
        data = to_raw(image)
        v2_backing = int("compat=0.10" in options and with_backing)
        want = _expected(bytes(base), ops, completed, flushed, data, v2_backing=v2_backing, cs=cs)
        assert data == want, f"run {run} ({options}): flushed data lost (flush #{flushed})"

        # The survivor is still a good image to write to.
        node = open_image(str(image), read_only=False)
        try:
            node.write(SIZE // 3, b"\xee" * 3000)
        finally:
            node.close()
        code, report = check(image)
        assert code in (0, 3), f"run {run}: after reopening, qemu-img check exit {code}"
        assert to_raw(image)[SIZE // 3 : SIZE // 3 + 3000] == b"\xee" * 3000
