"""README.md's examples, run as written: a newcomer copies them, so they must work.

The code blocks are read from README.md itself, so the test follows the text: the daemon's
command line and the recipe lines (each sent where its tag says: the shell, HMP on
hmp.sock, QMP in qmp-shell's ``command key=value`` syntax on qmp.sock, the backup tool),
and the image and export examples. ``pyfleece`` is this checkout's ``python -m pyfleece``;
servers get a pidfile added, to know when they are ready.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyfleece.monitor.client import HmpConnection, QmpConnection
from tests.conftest import require_tool
from tests.nbdtest import SRC, short_tempdir
from tests.support import PYFLEECE, running

README = Path(__file__).resolve().parents[2] / "README.md"
#: the recipe's tags: where each line goes
TAG = re.compile(r"^(?P<line>.*?)\s+\((?P<tag>shell|HMP|QMP|the backup tool)\)$")


def blocks(section: str) -> list[list[str]]:
    """The code blocks of a README section, as logical lines (continuations joined)."""
    text = README.read_text()
    body = text.split(f"### {section}\n", 1)[1].split("\n#", 1)[0]
    found = re.findall(r"```\n(.*?)```", body, re.S)
    return [block.replace("\\\n", " ").splitlines() for block in found]


def argv(line: str) -> list[str]:
    """A shell line's words, with ``pyfleece`` this checkout's, comments and ``&`` dropped."""
    words = shlex.split(line.split("  #")[0], comments=False)
    if words and words[-1] == "&":
        words.pop()
    if words[0] == "pyfleece":
        return [*PYFLEECE, *words[1:]]
    return [require_tool(words[0]), *words[1:]]


def sh(line: str, cwd: Path) -> str:
    result = subprocess.run(
        argv(line), cwd=cwd, capture_output=True, text=True, timeout=60,
        env=dict(os.environ, PYTHONPATH=SRC),
    )  # fmt: skip
    assert result.returncode == 0, f"{line}\n{result.stdout}{result.stderr}"
    return result.stdout


@pytest.fixture
def workdir() -> Iterator[Path]:
    with short_tempdir() as tmp:  # Unix socket paths must stay short
        yield tmp


def test_seed_recipe_as_written(workdir: Path) -> None:
    start, recipe = blocks("Image fleecing, the seed's recipe")[:2]
    create_disk, daemon = start
    sh(create_disk, workdir)
    env = dict(os.environ, PYTHONPATH=SRC)
    server = [*argv(daemon), "--pidfile", str(workdir / "pid")]
    with (
        running(server, workdir / "pid", cwd=workdir, env=env),
        HmpConnection(str(workdir / "hmp.sock")) as hmp,
        QmpConnection(str(workdir / "qmp.sock")) as qmp,
    ):
        qmp.negotiate()
        hmp.command('qemu-io ide0-hd0 "write -P 0x11 0 64k"')
        for raw in recipe:
            match = TAG.match(raw)
            assert match, f"untagged recipe line: {raw!r}"
            line, tag = match["line"], match["tag"]
            if tag == "HMP":
                answer = hmp.command(line).strip()
                assert answer in ("", "OK"), f"{line}: {answer}"
            elif tag == "QMP":
                name, *pairs = line.split()
                reply = qmp.execute(name, dict(pair.split("=", 1) for pair in pairs))
                assert "return" in reply, f"{line}: {reply}"
            else:
                sh(line, workdir)
            if line.startswith("blockdev-backup"):  # the guest writes after the snapshot
                hmp.command('qemu-io ide0-hd0 "write -P 0x22 0 64k"')
        assert not (workdir / "BACKUP.qcow2").exists()
    backup = (workdir / "backup.raw").read_bytes()
    assert backup[: 64 << 10] == b"\x11" * (64 << 10)  # the disk at the snapshot instant
    assert backup.count(0) == len(backup) - (64 << 10)
    assert not list(workdir.glob("*.sock"))  # the daemon removed its sockets


def test_image_and_export_examples_as_written(workdir: Path) -> None:
    (lines,) = blocks("Images and exports")
    # /tmp/nbd.sock is shared by whoever runs the suite at the same time: use our own
    lines = [line.replace("/tmp/nbd.sock", str(workdir / "nbd.sock")) for line in lines]
    expected_out = {"compare": "Images are identical.\n"}
    for line in lines:
        if line.startswith("pyfleece nbd"):
            server = [*argv(line), "--pid-file", str(workdir / "nbd.pid")]
            env = dict(os.environ, PYTHONPATH=SRC)
            with running(server, workdir / "nbd.pid", cwd=workdir, env=env):
                continue_with = lines[lines.index(line) + 1 :]
                for client in continue_with:
                    assert "export-size: 10737418240" in sh(client, workdir)
            break
        out = sh(line, workdir)
        command = line.split()[2]
        if command in expected_out:
            assert out == expected_out[command]
