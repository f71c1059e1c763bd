"""``pyfleece img convert`` against ``qemu-img convert``, raw to qcow2 and qcow2 to raw, on
a 1 GiB image with mixed content, in the same run.

The source holds, megabyte by megabyte: random data (40%), zeros written as data (15%),
a 4 KiB piece of data in an otherwise unallocated megabyte (10%), and holes (the rest).
Both tools convert the same files (qcow2 to raw starts from qemu-img's qcow2 for both);
each conversion runs ROUNDS times, alternating which tool goes first, and the best and the
median wall-clock times are reported with the ratio pyfleece/qemu-img (below 1: pyfleece
is faster). The times include starting the process, as a user of either tool pays it;
pyfleece runs with its bytecode cached, as an installed package does. The results are
checked with ``qemu-img compare`` once, outside the timings. This is a benchmark, not a
test: the machine is shared, so rerun it when it is quiet.

Usage: python bench/img_convert.py [DIR] [ROUNDS]   (default DIR /var/tmp, ROUNDS 5)
"""

from __future__ import annotations

import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIZE = 1 << 30
MiB = 1 << 20
ROOT = Path(__file__).resolve().parent.parent


def make_source(path: Path) -> None:
    rng = random.Random(2013)
    block = rng.randbytes(MiB)
    with open(path, "wb") as f:
        f.truncate(SIZE)
        for i in range(SIZE // MiB):
            r = rng.random()
            if r < 0.40:
                shift = rng.randrange(MiB)
                f.seek(i * MiB)
                f.write(block[shift:] + block[:shift])
            elif r < 0.55:
                f.seek(i * MiB)
                f.write(bytes(MiB))
            elif r < 0.65:
                f.seek(i * MiB + rng.randrange(0, MiB - 4096, 4096))
                f.write(block[:4096])


def pyfleece_env(cache: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = str(cache)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT / "src"), env.get("PYTHONPATH", "")) if p
    )
    return env


def timed(cmd: list[str], env: dict[str, str] | None = None) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> int:
    base = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("/var/tmp")
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    qemu_img = shutil.which("qemu-img")
    if qemu_img is None:
        print("qemu-img is not installed", file=sys.stderr)
        return 1
    work = Path(tempfile.mkdtemp(prefix="img-convert-bench.", dir=base))
    try:
        return run(work, qemu_img, rounds)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(work: Path, qemu_img: str, rounds: int) -> int:
    src = work / "src.raw"
    make_source(src)
    env = pyfleece_env(work / "pycache")
    ours = [sys.executable, "-m", "pyfleece", "img", "convert"]
    q_qcow2, p_qcow2 = work / "q.qcow2", work / "p.qcow2"
    cases = {
        "raw -> qcow2": (
            [qemu_img, "convert", "-O", "qcow2", str(src), str(q_qcow2)],
            [*ours, "-O", "qcow2", str(src), str(p_qcow2)],
        ),
        "qcow2 -> raw": (
            [qemu_img, "convert", "-O", "raw", str(q_qcow2), str(work / "q.raw")],
            [*ours, "-O", "raw", str(q_qcow2), str(work / "p.raw")],
        ),
    }
    for qemu_cmd, our_cmd in cases.values():  # warm the page cache and the bytecode
        timed(qemu_cmd)
        timed(our_cmd, env)
    for a, b in ((src, p_qcow2), (src, work / "p.raw"), (work / "q.raw", work / "p.raw")):
        subprocess.run([qemu_img, "compare", "-q", str(a), str(b)], check=True)
    tiny = work / "tiny.raw"
    tiny.write_bytes(bytes(4096) + b"x" * 4096)
    startup = (
        min(
            timed([qemu_img, "convert", "-O", "qcow2", str(tiny), str(work / "t.q")])
            for _ in range(3)
        ),
        min(timed([*ours, "-O", "qcow2", str(tiny), str(work / "t.p")], env) for _ in range(3)),
    )
    print(f"1 GiB source, {rounds} rounds; seconds (best / median)")
    print(f"fixed cost (an 8 KiB image): qemu-img {startup[0]:.3f}   pyfleece {startup[1]:.3f}")
    for name, (qemu_cmd, our_cmd) in cases.items():
        q_times, p_times = [], []
        for i in range(rounds):
            if i % 2:
                p_times.append(timed(our_cmd, env))
                q_times.append(timed(qemu_cmd))
            else:
                q_times.append(timed(qemu_cmd))
                p_times.append(timed(our_cmd, env))
        qb, qm = min(q_times), statistics.median(q_times)
        pb, pm = min(p_times), statistics.median(p_times)
        print(
            f"{name}: qemu-img {qb:.3f} / {qm:.3f}   pyfleece {pb:.3f} / {pm:.3f}   "
            f"ratio pyfleece/qemu-img {pb / qb:.2f} (best) {pm / qm:.2f} (median)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
