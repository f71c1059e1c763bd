"""pyfleece nbd against nbdkit (file plugin) and qemu-nbd, on the same page-cached raw file.

Three figures per server, over a Unix socket:
  copy      nbdcopy of the whole export to null: (GiB/s; nbdcopy's multi-conn defaults)
  randread  fio's nbd engine, 4 KiB random reads, QD32, one connection (IOPS)
  write     fio's nbd engine, 1 MiB sequential writes, QD8, one connection (MiB/s)

Besides each figure, the server's own CPU time per request (user + system, from /proc) is
printed: unlike throughput it barely depends on what else runs on the machine.

Repetitions are interleaved (every server once, then again) so that a burst of load from
elsewhere on the machine hits them alike. Figures are reported twice, as the median and as the
best of the repetitions: the median resists a burst that favours one server in one run.
Ratios are pyfleece's figure over the peer's: >= 1.0 is the goal (docs/nbd.md).

Usage: bench/nbd_bench.py [--size 1G] [--repeat 3] [--runtime 5] [--file PATH]
                          [--servers pyfleece,nbdkit,qemu-nbd] [--json OUT]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(os.path.dirname(HERE), "src")
FIGURES = ("copy", "randread", "write")
UNITS = {"copy": "GiB/s", "randread": "IOPS", "write": "MiB/s"}
#: Requests per figure, to turn CPU seconds into CPU per request (nbdcopy: 256 KiB reads).
CPU_UNIT = {"copy": "us/256K", "randread": "us/4K", "write": "us/1M"}


def server_command(name: str, image: str, sock: str, pidfile: str) -> list[str]:
    if name == "pyfleece":
        return [sys.executable, "-m", "pyfleece", "nbd", "-f", "raw", "-k", sock, "-t",
                "-e", "16", "--pid-file", pidfile, image]  # fmt: skip
    if name == "nbdkit":
        return ["nbdkit", "-f", "-U", sock, "--pidfile", pidfile, "file", image]
    if name == "qemu-nbd":
        return ["qemu-nbd", "-f", "raw", "-k", sock, "-t", "-e", "16", "--pid-file", pidfile,
                image]  # fmt: skip
    raise SystemExit(f"unknown server {name!r}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def running(name: str, image: str, workdir: str) -> Iterator[tuple[str, int]]:
    """Starts a server, waits for its pid file, yields its NBD URI and pid, then stops it."""
    sock = os.path.join(workdir, f"{name}.sock")
    pidfile = os.path.join(workdir, f"{name}.pid")
    for path in (sock, pidfile):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(server_command(name, image, sock, pidfile), env=env)
    try:
        deadline = time.monotonic() + 30
        while not (os.path.exists(pidfile) and os.path.exists(sock)):
            if proc.poll() is not None:
                raise SystemExit(f"{name} exited with status {proc.returncode}")
            if time.monotonic() > deadline:
                raise SystemExit(f"{name} did not become ready")
            time.sleep(0.02)  # polling for readiness of a foreign process
        yield f"nbd+unix:///?socket={sock}", proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def fio(uri: str, rw: str, bs: str, depth: int, runtime: int) -> dict[str, float]:
    """Runs fio's nbd engine; returns IOPS, MiB/s and the number of requests."""
    cmd = ["fio", "--name=bench", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}",
           f"--bs={bs}", f"--iodepth={depth}", "--numjobs=1", "--time_based",
           f"--runtime={runtime}", "--output-format=json"]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    job = json.loads(out[out.index("{") :])["jobs"][0]
    side = job["read"] if "read" in rw else job["write"]
    return {
        "iops": float(side["iops"]),
        "mibps": float(side["bw_bytes"]) / (1 << 20),
        "ios": float(side["total_ios"]),
    }


def nbdcopy(uri: str, size: int) -> float:
    start = time.perf_counter()
    subprocess.run(["nbdcopy", uri, "null:"], check=True)
    return size / (time.perf_counter() - start) / (1 << 30)


def measure(uri: str, pid: int, size: int, runtime: int) -> dict[str, float]:
    """The three figures, and the server's CPU microseconds per request for each."""
    out: dict[str, float] = {}
    start = cpu_seconds(pid)
    out["copy"] = nbdcopy(uri, size)
    out["copy_cpu"] = (cpu_seconds(pid) - start) * 1e6 / (size / (256 << 10))
    start = cpu_seconds(pid)
    rr = fio(uri, "randread", "4k", 32, runtime)
    out["randread"], out["randread_cpu"] = rr["iops"], (cpu_seconds(pid) - start) * 1e6 / rr["ios"]
    start = cpu_seconds(pid)
    wr = fio(uri, "write", "1m", 8, runtime)
    out["write"], out["write_cpu"] = wr["mibps"], (cpu_seconds(pid) - start) * 1e6 / wr["ios"]
    return out


def make_image(path: str, size: int) -> None:
    with open(path, "wb") as f, open("/dev/urandom", "rb") as rnd:
        left = size
        while left:
            chunk = rnd.read(min(left, 8 << 20))
            f.write(chunk)
            left -= len(chunk)


def warm(path: str) -> None:
    with open(path, "rb") as f:
        while f.read(8 << 20):
            pass


def parse_size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    if text[-1].lower() in units:
        return int(float(text[:-1]) * units[text[-1].lower()])
    return int(text)


def table(title: str, figures: dict[str, dict[str, float]]) -> None:
    servers = list(figures)
    print(f"{title:10}" + "".join(f"{s:>14}" for s in servers) + "".join(
        f"{'vs ' + s:>14}" for s in servers if s != "pyfleece"))  # fmt: skip
    for fig in FIGURES:
        row = f"{fig:10}" + "".join(f"{figures[s][fig]:>14.2f}" for s in servers)
        if "pyfleece" in figures:
            for peer in servers:
                if peer != "pyfleece":
                    row += f"{figures['pyfleece'][fig] / figures[peer][fig]:>13.2f}x"
        print(f"{row}   ({UNITS[fig]})")


def report(runs: dict[str, dict[str, list[float]]], loads: list[float]) -> dict[str, object]:
    """Prints the median and best tables and the CPU per request; returns them."""
    servers = list(runs)
    median = {s: {f: statistics.median(runs[s][f]) for f in FIGURES} for s in servers}
    best = {s: {f: max(runs[s][f]) for f in FIGURES} for s in servers}
    cpu = {s: {f: statistics.median(runs[s][f"{f}_cpu"]) for f in FIGURES} for s in servers}
    print(f"\nload average during the run: {min(loads):.2f} .. {max(loads):.2f} (2 cores)")
    table("median", median)
    table("best", best)
    print("server CPU per request (median):")
    for fig in FIGURES:
        row = f"{fig:10}" + "".join(f"{cpu[s][fig]:>14.2f}" for s in servers)
        print(f"{row}   ({CPU_UNIT[fig]})")
    return {"median": median, "best": best, "cpu": cpu, "load": loads}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="1G")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--runtime", type=int, default=5, help="seconds per fio run")
    parser.add_argument("--file", help="use this raw image instead of a fresh random one")
    parser.add_argument("--servers", default="pyfleece,nbdkit,qemu-nbd")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    servers = args.servers.split(",")
    for tool in ("fio", "nbdcopy", *[s for s in servers if s != "pyfleece"]):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed")
    workdir = tempfile.mkdtemp(prefix="nbd-bench-")
    try:
        image = args.file or os.path.join(workdir, "disk.raw")
        if not args.file:
            make_image(image, parse_size(args.size))
        size = os.path.getsize(image)
        runs: dict[str, dict[str, list[float]]] = {s: {} for s in servers}
        loads = [os.getloadavg()[0]]
        for rep in range(args.repeat):
            for name in servers:
                warm(image)
                with running(name, image, workdir) as (uri, pid):
                    got = measure(uri, pid, size, args.runtime)
                loads.append(os.getloadavg()[0])
                print(f"run {rep + 1} {name:9} " + "  ".join(
                    f"{fig} {got[fig]:.2f} {UNITS[fig]}" for fig in FIGURES
                ) + f"  (load {loads[-1]:.2f})", flush=True)  # fmt: skip
                for key, value in got.items():
                    runs[name].setdefault(key, []).append(value)
        summary = report(runs, loads)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(summary, f, indent=1)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
