"""qcow2 exports: random writes through ``pyfleece nbd`` leave an image ``qemu-img check``
accepts and ``qemu-img compare`` finds identical to the same writes made by qemu-io
directly; a backing chain's metadata contexts read as qemu-nbd reports them."""

from __future__ import annotations

import json
import random
import subprocess

import pytest

from tests.conftest import require_tool
from tests.nbdtest import nbd_tool, short_tempdir, wait_for

pytestmark = pytest.mark.timeout(120)
MiB = 1 << 20
SIZE = 64 * MiB


def run(*cmd: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"{cmd[0]}: {result.stdout} {result.stderr}"
    return result


def random_commands(seed: int, count: int = 120) -> list[str]:
    """qemu-io commands: writes of varied sizes and alignment, zeroes (some unmapping),
    discards, FUA writes and flushes."""
    rng = random.Random(seed)
    commands = []
    for _ in range(count):
        offset = rng.randrange(0, SIZE - 2 * MiB)
        if rng.random() < 0.5:
            offset -= offset % 512
        length = rng.choice([512, 4096, 65536, 65536 + 512, 300_000, MiB + 12345])
        pick = rng.random()
        if pick < 0.6:
            fua = "-f " if rng.random() < 0.2 else ""
            commands.append(f"write {fua}-P {rng.randrange(1, 256)} {offset} {length}")
        elif pick < 0.75:
            unmap = "-u " if rng.random() < 0.5 else ""
            commands.append(f"write -z {unmap}{offset} {length}")
        elif pick < 0.85:
            commands.append(f"discard {offset} {length}")
        else:
            commands.append("flush")
    return commands


def qemu_io(fmt: str, target: str, commands: list[str]) -> None:
    args = [require_tool("qemu-io"), "-f", fmt]
    for c in commands:
        args += ["-c", c]
    out = run(*args, target).stdout
    assert "fail" not in out.lower(), out


@pytest.mark.parametrize("seed", [1, 2])
def test_random_writes_through_a_qcow2_export(seed: int) -> None:
    qemu_img = require_tool("qemu-img")
    with short_tempdir() as tmp:
        ours, theirs = tmp / "ours.qcow2", tmp / "theirs.qcow2"
        for image in (ours, theirs):
            run(qemu_img, "create", "-q", "-f", "qcow2", str(image), str(SIZE))
        commands = random_commands(seed)
        sock = tmp / "s"
        args = ["-f", "qcow2", "-x", "disk", "-t", "--discard=unmap", "-k", str(sock), str(ours)]
        with nbd_tool(args, tmp / "pid"):
            qemu_io("raw", f"nbd+unix:///disk?socket={sock}", commands)
        qemu_io("qcow2", str(theirs), commands)
        run(qemu_img, "check", "-f", "qcow2", str(ours))
        run(qemu_img, "compare", "-f", "qcow2", "-F", "qcow2", str(ours), str(theirs))


def _map(uri: str, context: str) -> list[tuple[int, int, int]]:
    out = run(require_tool("nbdinfo"), f"--map={context}", "--json", uri).stdout
    runs: list[tuple[int, int, int]] = []
    for e in json.loads(out):
        if runs and runs[-1][2] == e["type"]:
            runs[-1] = (runs[-1][0], runs[-1][1] + e["length"], e["type"])
        else:
            runs.append((e["offset"], e["length"], e["type"]))
    return runs


def test_backing_chain_contexts_match_qemu_nbd() -> None:
    qemu_img, qemu_nbd = require_tool("qemu-img"), require_tool("qemu-nbd")
    with short_tempdir() as tmp:
        base, top = tmp / "base.qcow2", tmp / "top.qcow2"
        run(qemu_img, "create", "-q", "-f", "qcow2", str(base), str(SIZE))
        run(qemu_img, "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(top))
        qemu_io("qcow2", str(base), ["write -P 1 0 4M", "write -z 8M 1M", "write -P 2 16M 1M"])
        qemu_io("qcow2", str(top), ["write -P 3 2M 4M", "write -z 16M 512k", "discard 20M 1M"])
        ours_sock, theirs_sock = tmp / "ours", tmp / "theirs"
        with nbd_tool(["-r", "-f", "qcow2", "-t", "-k", str(ours_sock), str(top)], tmp / "p"):
            proc = subprocess.Popen(
                [qemu_nbd, "-r", "-f", "qcow2", "-A", "-t", "-k", str(theirs_sock), str(top)]
            )
            try:
                wait_for(theirs_sock.exists, "qemu-nbd's socket")
                for context in ("qemu:allocation-depth", "base:allocation"):
                    ours = _map(f"nbd+unix:///?socket={ours_sock}", context)
                    theirs = _map(f"nbd+unix:///?socket={theirs_sock}", context)
                    assert ours == theirs, context
            finally:
                proc.terminate()
                proc.wait(10)
