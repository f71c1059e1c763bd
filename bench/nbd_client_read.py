"""NBD client read throughput: pyfleece's client against nbdcopy, both reading a whole 1 GiB
page-cached raw file that qemu-nbd serves over a Unix socket, in the same run.

Configurations of our client: one thread keeping N requests of S bytes in flight with
``submit_read`` (what convert and the snapshot pull do), and T threads each calling
``readinto`` on the one shared connection (or, for comparison, on one connection each).
Each is run ROUNDS times, interleaved with nbdcopy, and the best time counts (the machine is
shared; the best is the least disturbed).

Usage: python bench/nbd_client_read.py [DIR]   (DIR holds the 1 GiB file; default /var/tmp)
"""

from __future__ import annotations

import collections
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from pyfleece.nbd.client import Command, NbdClient

SIZE = 1 << 30
ROUNDS = 5
PIPELINES = [(256 << 10, 16), (1 << 20, 8), (2 << 20, 8), (4 << 20, 4)]
THREADS = [(1 << 20, 1), (1 << 20, 4)]


def read_pipelined(uri: str, chunk: int, depth: int) -> None:
    with NbdClient.connect(uri) as client:
        bufs = [memoryview(bytearray(chunk)) for _ in range(depth)]
        queue: collections.deque[Command] = collections.deque()
        for i, offset in enumerate(range(0, client.size, chunk)):
            if len(queue) >= depth:
                queue.popleft().wait()
            n = min(chunk, client.size - offset)
            queue.append(client.submit_read(offset, bufs[i % depth][:n]))
        while queue:
            queue.popleft().wait()


def read_threads(uri: str, chunk: int, threads: int, *, shared: bool = True) -> None:
    """``threads`` threads calling ``readinto``, on one shared connection or one each."""
    clients = [NbdClient.connect(uri) for _ in range(1 if shared else threads)]

    def worker(k: int) -> None:
        client = clients[0 if shared else k]
        buf = memoryview(bytearray(chunk))
        for offset in range(k * chunk, client.size, chunk * threads):
            client.readinto(offset, buf[: min(chunk, client.size - offset)])

    pool = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    for client in clients:
        client.close()


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def serve(directory: Path) -> tuple[subprocess.Popen[bytes], str]:
    image, sock, pid = directory / "bench-1g.raw", directory / "bench.sock", directory / "bench.pid"
    if not image.exists() or image.stat().st_size != SIZE:
        block = bytes(range(256)) * 4096
        with open(image, "wb") as f:
            for _ in range(SIZE // len(block)):
                f.write(block)
    with open(image, "rb") as f:  # into the page cache
        while f.read(1 << 24):
            pass
    for stale in (sock, pid):
        stale.unlink(missing_ok=True)
    args = ["qemu-nbd", "-t", "-r", "-e", "8", "-f", "raw", "-k", str(sock), "--pid-file", str(pid)]
    proc = subprocess.Popen([*args, str(image)], stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 15
    while not (pid.exists() and pid.stat().st_size and sock.exists()):
        if time.monotonic() > deadline:
            proc.kill()
            raise SystemExit("qemu-nbd did not start")
        try:
            proc.wait(timeout=0.02)
            raise SystemExit(f"qemu-nbd exited with {proc.returncode}")
        except subprocess.TimeoutExpired:
            pass
    return proc, f"nbd+unix:///?socket={sock}"


def main() -> int:
    if not (shutil.which("qemu-nbd") and shutil.which("nbdcopy")):
        print("qemu-nbd and nbdcopy are needed")
        return 1
    proc, uri = serve(Path(sys.argv[1] if len(sys.argv) > 1 else "/var/tmp"))
    try:
        runs: dict[str, Callable[[], object]] = {
            "nbdcopy -> null:": lambda: subprocess.run(["nbdcopy", uri, "null:"], check=True),
        }
        for chunk, depth in PIPELINES:
            name = f"pyfleece, 1 thread, {depth} x {chunk >> 10} KiB in flight"
            runs[name] = lambda c=chunk, d=depth: read_pipelined(uri, c, d)
        for chunk, threads in THREADS:
            name = f"pyfleece, {threads} thread(s) x readinto({chunk >> 10} KiB)"
            runs[name] = lambda c=chunk, t=threads: read_threads(uri, c, t)
        runs["pyfleece, 4 threads x readinto(1024 KiB), 4 conns"] = lambda: read_threads(
            uri, 1 << 20, 4, shared=False
        )
        best = {name: min(timed(fn) for _ in range(1)) for name, fn in runs.items()}
        for _ in range(ROUNDS - 1):
            for name, fn in runs.items():
                best[name] = min(best[name], timed(fn))
    finally:
        proc.terminate()
        proc.wait()
    peer = SIZE / best["nbdcopy -> null:"] / (1 << 30)
    for name, seconds in best.items():
        rate = SIZE / seconds / (1 << 30)
        print(f"{name:52s} {rate:5.2f} GiB/s  ratio {rate / peer:4.2f}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("LIBNBD_DEBUG", "0")
    sys.exit(main())
