"""The qemu-io interpreter against real qemu-io: same commands, same image, same lines.

Each command runs through ``qemu-io -f raw -c CMD`` on one image and through our interpreter
on an identical image; the outputs must match once the timing figures are masked, and the
images must end up identical. qemu-io's stderr lines (argument counts, getopt) come first in
our output, as they happen first.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from pyfleece.block.registry import open_node
from pyfleece.monitor.qemuio import QemuIo
from tests.conftest import require_tool

SIZE = 4 << 20

# The story: fill patterns, check them, zero and discard, then every error path.
SCRIPT = [
    "write -P 0xab 0 64k",
    "read -P 0xab 0 64k",
    "read -P 0xac 0 64k",
    "w -P 0x41 64k 16",
    "write -P 0x20 65552 8",
    "write -P 0x2e 65560 4",
    "read -v 64k 48",
    "read -v 65543 20",
    "read 0 16 -v",
    "r -P 0x41 -s 0 -l 16 64k 64",
    "read -P 0x41 -s 14 -l 8 64k 64",
    "read -P 0x41 -s 60 -l 8 64k 64",
    "read -P 65 64k 1",
    "read -P 0101 64k 1",
    "read -q 0 512",
    "read -C 0 512",
    "read -q -P 0x00 0 1",
    "write -z 4k 4k",
    "write -z -u 8k 4k",
    "write -f 12k 4k",
    "write 1.5k 1.k",
    "write 0x10 0x20",
    "discard 128k 64k",
    "d 192k 512",
    "discard -q 0 512",
    "discard -C 1k 512",
    "flush",
    "f",
    "read 0 0",
    "write 0 0",
    "read 4M 0",
    "read 0 5M",
    "write 4095k 2k",
    "discard 4095k 2k",
    "write -z 4095k 2k",
    "read 0 3G",
    "write 0 3G",
    "discard 0 3G",
    "read 0 1E",
    "read 0 8E",
    "read 0 99999999999999999999",
    "read 0 abc",
    "read 0 10x",
    "read 0 1kb",
    "read 0 1.5",
    "read 0 0.5b",
    "read 0 .5k",
    "read 0x 1",
    "read 0 0x1k",
    "read 0",
    "read",
    "read 0 1 2",
    "read 0 -5",
    "read -s 4 0 64",
    "read -P",
    "read -P 0x100 0 512",
    "read -P -1 0 1",
    "read -P 0x 0 1",
    "read -P ab -Z 0 1",
    "write -P ab 0 512",
    "write -u 0 512",
    "write -n 0 512",
    "write -z -P 1 0 512",
    "write -Z 0 1",
    "write -b 0 1",
    "flush x",
    "f x",
    "length x",
    "help read write",
    "help nosuch",
    "foo",
    "len",
    "",
]


def _mask(text: str) -> str:
    text = re.sub(r"\d+:\d\d:\d\d\.\d\d,[\d.]+,[\d.]+$", "TIMING", text, flags=re.M)
    text = re.sub(r"; [\d:.]+( sec)? \(.* ops/sec\)$", "; TIMING", text, flags=re.M)
    return text


def test_output_matches_real_qemu_io(tmp_path: Path) -> None:
    qemu_io = require_tool("qemu-io")
    theirs, ours = tmp_path / "theirs.raw", tmp_path / "ours.raw"
    with open(theirs, "wb") as f:
        f.truncate(SIZE)
    shutil.copy(theirs, ours)
    node = open_node({"driver": "raw", "file": {"driver": "file", "filename": str(ours)}})
    interpreter = QemuIo(node)
    try:
        for command in SCRIPT:
            real = subprocess.run(
                [qemu_io, "-f", "raw", "-c", command, str(theirs)],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
            expected = real.stderr.replace("qemu-io: ", "") + real.stdout
            result = interpreter.run(command)
            assert _mask(result.output) == _mask(expected), command
            assert result.ok == (real.returncode == 0), command
    finally:
        node.close()
    assert ours.read_bytes() == theirs.read_bytes()


def test_length_of_an_aligned_image(tmp_path: Path) -> None:
    qemu_io = require_tool("qemu-io")
    path = tmp_path / "d.raw"
    with open(path, "wb") as f:
        f.truncate(5 << 20)
    real = subprocess.run(
        [qemu_io, "-f", "raw", "-c", "length", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    node = open_node({"driver": "raw", "file": {"driver": "file", "filename": str(path)}})
    try:
        assert QemuIo(node).run("length").output == real.stdout == "5 MiB\n"
    finally:
        node.close()


@pytest.mark.parametrize("command", ["write 0 512", "discard 0 512", "write -z 0 512"])
def test_read_only_node_refuses_writes(tmp_path: Path, command: str) -> None:
    qemu_io = require_tool("qemu-io")
    path = tmp_path / "ro.raw"
    with open(path, "wb") as f:
        f.truncate(1 << 20)
    real = subprocess.run(
        [qemu_io, "-r", "-f", "raw", "-c", command, str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    node = open_node(
        {"driver": "raw", "read-only": True, "file": {"driver": "file", "filename": str(path)}}
    )
    try:
        result = QemuIo(node).run(command)
    finally:
        node.close()
    assert result.output == real.stderr.replace("qemu-io: ", "") == "Block node is read-only\n"
    assert not result.ok
