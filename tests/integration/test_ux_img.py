"""``pyfleece img`` as a user meets it: images past 2 GiB, and failures that name where.

Found by trying the README's examples (a 10G image): every command that asked the block
layer about a whole image at once (compare, convert) failed past 2 GiB, the largest request
a node takes. qemu-img is the oracle: same outputs, same exit statuses.
"""

from __future__ import annotations

import errno
import json
import re
import resource
import signal
import struct
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import require_tool
from tests.integration.test_img_helpers import Outcome, both, our_env, ours, qemu_ok
from tests.nbdtest import free_port, short_tempdir
from tests.support import running

GiB = 1 << 30
MiB = 1 << 20


@pytest.fixture(scope="module")
def large(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Sparse 3 GiB images with data below and above the 2 GiB mark:
    ``big.raw``, ``big.qcow2`` (its copy), ``empty.qcow2`` and ``over.qcow2`` (an overlay
    of ``big.raw`` with data of its own at 2.5 GiB)."""
    d = tmp_path_factory.mktemp("large")
    qemu_ok("qemu-img", "create", "-q", "-f", "raw", "big.raw", "3G", cwd=d)
    writes = ["write -P 1 0 64k", "write -P 2 2304M 1M", "write -P 3 3071M 1M"]
    qemu_ok("qemu-io", "-f", "raw", *[a for w in writes for a in ("-c", w)], "big.raw", cwd=d)
    qemu_ok("qemu-img", "convert", "-f", "raw", "-O", "qcow2", "big.raw", "big.qcow2", cwd=d)
    qemu_ok("qemu-img", "create", "-q", "-f", "qcow2", "empty.qcow2", "3G", cwd=d)
    qemu_ok("qemu-img", "create", "-q", "-f", "qcow2", "-b", "big.raw", "-F", "raw",
            "over.qcow2", cwd=d)  # fmt: skip
    qemu_ok("qemu-io", "-c", "write -P 9 2560M 64k", "over.qcow2", cwd=d)
    return d


@pytest.mark.parametrize(
    "args",
    [
        "map big.raw",
        "map --output=json big.raw",
        "map --output=json over.qcow2",
        "compare big.raw big.qcow2",
        "compare -s big.raw big.qcow2",
        "compare big.qcow2 over.qcow2",
        "compare empty.qcow2 big.raw",
        "compare -p big.raw big.qcow2",
    ],
)
def test_commands_over_2gib_match_qemu_img(large: Path, args: str) -> None:
    theirs, mine = both(*args.split(), cwd=large)
    assert mine == theirs


@pytest.mark.parametrize(
    ("source", "fmt"),
    [("big.raw", "raw"), ("big.raw", "qcow2"), ("big.qcow2", "raw"), ("over.qcow2", "raw")],
)
def test_convert_over_2gib(large: Path, source: str, fmt: str) -> None:
    out = f"conv-{Path(source).stem}-{Path(source).suffix[1:]}.{fmt}"
    result = ours("convert", "-O", fmt, source, out, cwd=large)
    assert (result.rc, result.err) == (0, "")
    compared = qemu_ok("qemu-img", "compare", source, out, cwd=large)
    assert compared == "Images are identical.\n"


def _fault_json(image: str, rule: dict[str, object]) -> str:
    file = {"driver": "fault", "image": {"driver": "file", "filename": image}, "rules": [rule]}
    return "json:" + json.dumps({"driver": "raw", "file": file})


def test_convert_read_error_names_the_offset(tmp_path: Path) -> None:
    (tmp_path / "src.raw").write_bytes(b"\1" * (8 * MiB))
    source = _fault_json("src.raw", {"op": "read", "nth": 3, "errno": errno.EIO})
    result = ours("convert", "-O", "raw", source, "out.raw", cwd=tmp_path)
    assert result.rc == 1
    # pieces are read 2 MiB at a time, in order: the third starts at 4 MiB
    assert result.err.startswith("qemu-img: error while reading at byte 4194304: ")


def test_convert_write_error_names_the_offset(tmp_path: Path) -> None:
    (tmp_path / "src.raw").write_bytes(b"\1" * (2 * MiB) + bytes(2 * MiB) + b"\2" * (2 * MiB))
    qemu_ok("qemu-img", "create", "-q", "-f", "raw", "dst.raw", "6M", cwd=tmp_path)
    target = _fault_json("dst.raw", {"op": "write", "nth": 2, "errno": errno.ENOSPC})
    result = ours("convert", "-n", "-O", "raw", "src.raw", target, cwd=tmp_path)
    assert result.rc == 1
    # the zeros between are written as write-zeroes, not a write: the second write is at 4M
    assert result.err.startswith("qemu-img: error while writing at byte 4194304: ")


def test_convert_block_status_error_matches_qemu_img(tmp_path: Path) -> None:
    """An L2 table at an unaligned offset: both tools fail the walk at offset 0."""
    qemu_ok("qemu-img", "create", "-q", "-f", "qcow2", "bad.qcow2", "4M", cwd=tmp_path)
    qemu_ok("qemu-io", "-c", "write -P 3 2M 64k", "bad.qcow2", cwd=tmp_path)
    with open(tmp_path / "bad.qcow2", "r+b") as f:
        (l1_offset,) = struct.unpack(">Q", f.read(48)[40:48])
        f.seek(l1_offset)
        (entry,) = struct.unpack(">Q", f.read(8))
        f.seek(l1_offset)
        f.write(struct.pack(">Q", entry + 512))
    theirs, mine = both("convert", "-O", "raw", "bad.qcow2", "out.raw", cwd=tmp_path)
    prefix = "qemu-img: error while reading block status at offset 0: "
    assert theirs.rc == mine.rc == 1
    assert prefix in theirs.err
    assert mine.err.startswith(prefix)


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_convert_into_missing_directory_matches_qemu_img(tmp_path: Path, fmt: str) -> None:
    qemu_ok("qemu-img", "create", "-q", "-f", "qcow2", "src.qcow2", "1M", cwd=tmp_path)
    theirs, mine = both("convert", "-O", fmt, "src.qcow2", "no/such/dir/out", cwd=tmp_path)
    assert mine == theirs


def test_convert_progress_starts_before_opening(tmp_path: Path) -> None:
    """qemu-img prints its 0% line before it opens anything, then the newline."""
    theirs, mine = both("convert", "-p", "missing.qcow2", "out.raw", cwd=tmp_path)
    assert mine == theirs
    assert mine.out.startswith("    (0.00/100%)")


def _file_size_limit(limit: int) -> Callable[[], None]:
    """A child set-up that makes every file past ``limit`` bytes fail with EFBIG: a full
    disk, without needing one."""

    def limit_child() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return limit_child


def _both_limited(args: list[str], cwd: Path, limit: int) -> tuple[Outcome, Outcome]:
    def run(command: list[str], env: dict[str, str] | None) -> Outcome:
        proc = subprocess.run(
            command, cwd=cwd, capture_output=True, text=True, timeout=60, env=env,
            preexec_fn=_file_size_limit(limit),
        )  # fmt: skip
        err = proc.stderr.replace("pyfleece img", "qemu-img")
        return Outcome(proc.returncode, proc.stdout, err)

    theirs = run([require_tool("qemu-img"), *args], None)
    mine = run([sys.executable, "-m", "pyfleece", "img", *args], our_env())
    return theirs, mine


@pytest.mark.parametrize(
    "args",
    [
        "create -f raw new.raw 8M",
        "create -f raw -o preallocation=full new.raw 8M",
        "create -f raw -o preallocation=falloc new.raw 8M",
        "convert -O raw src.qcow2 out.raw",
    ],
)
def test_output_too_large_matches_qemu_img(tmp_path: Path, args: str) -> None:
    qemu_ok("qemu-img", "create", "-q", "-f", "qcow2", "src.qcow2", "8M", cwd=tmp_path)
    theirs, mine = _both_limited(args.split(), tmp_path, 4 * MiB)
    assert theirs.rc == 1
    assert mine == theirs


def test_convert_out_of_space_is_a_write_error(tmp_path: Path) -> None:
    """The target's file system fills up mid-copy: one line, naming where, exit 1."""
    (tmp_path / "src.raw").write_bytes(b"\1" * (8 * MiB))
    args = ["convert", "-O", "qcow2", "src.raw", "out.qcow2"]
    theirs, mine = _both_limited(args, tmp_path, 4 * MiB)
    assert theirs.rc == mine.rc == 1
    pattern = r"qemu-img: error while writing at byte \d+: File too large\n"
    assert re.fullmatch(pattern, theirs.err)
    assert re.fullmatch(pattern, mine.err)


@pytest.fixture
def nbd_images() -> Iterator[tuple[Path, list[str]]]:
    """An nbdkit memory disk with 64 KiB of data at 1 MiB, on a Unix socket (default
    export) and on TCP (export "foo"); yields the scratch directory and the URIs."""
    nbdkit = require_tool("nbdkit")
    with short_tempdir() as tmp:
        port = free_port()
        unix = [nbdkit, "-f", "-U", str(tmp / "s"), "-P", str(tmp / "u.pid"), "memory", "64M"]
        tcp = [nbdkit, "-f", "-i", "127.0.0.1", "-p", str(port), "-e", "foo",
               "-P", str(tmp / "t.pid"), "memory", "64M"]  # fmt: skip
        with running(unix, tmp / "u.pid"), running(tcp, tmp / "t.pid"):
            uris = [f"nbd+unix:///?socket={tmp / 's'}", f"nbd://127.0.0.1:{port}/foo"]
            for uri in uris:
                qemu_ok("qemu-io", "-f", "raw", "-c", "write -P 1 1M 64k", uri, cwd=tmp)
            qemu_ok("qemu-img", "create", "-q", "-f", "qcow2", "-b", uris[0], "-F", "raw",
                    "over.qcow2", cwd=tmp)  # fmt: skip
            yield tmp, uris


@pytest.mark.parametrize("command", ["map", "map --output=json", "info"])
def test_nbd_images_are_named_as_qemu_names_them(
    nbd_images: tuple[Path, list[str]], command: str
) -> None:
    """The File column and the image: line show QEMU's name for an NBD image (a Python
    None stood in the File column)."""
    tmp, uris = nbd_images
    for image in [*uris, "over.qcow2"]:
        fmt = [] if image == "over.qcow2" else ["-f", "raw"]
        theirs, mine = both(*command.split(), *fmt, image, cwd=tmp)
        assert theirs.rc == 0
        assert mine == theirs


class _Collect:
    """A convert target that keeps what it is given, in memory."""

    zero_init = True

    def __init__(self, size: int) -> None:
        self.data = bytearray(size)

    def write(self, offset: int, views: list[memoryview]) -> None:
        for view in views:
            self.data[offset : offset + len(view)] = view
            offset += len(view)

    def zero(self, offset: int, length: int) -> None:
        raise AssertionError("a zero_init target is never asked to zero")

    def finish(self) -> None:
        pass

    def close(self) -> None:
        pass


def test_remote_sources_are_read_by_overlapping_readers() -> None:
    """With 4 readers, 4 reads are in flight at once (each waits for the other three at a
    barrier: one reader alone would break it), and the pieces still land in order."""
    from pyfleece.block.memory import MemoryNode
    from pyfleece.img.copy import copy
    from pyfleece.img.progress import Progress
    from pyfleece.img.sources import CHUNK, Sources

    pieces = 16
    node = MemoryNode("src", pieces * CHUNK)
    content = b"".join(bytes([i + 1]) * CHUNK for i in range(pieces))
    node.write(0, content)
    together = threading.Barrier(4, timeout=10)
    plain_read = node._readinto

    def read_with_others(offset: int, buf: memoryview) -> None:
        together.wait()
        plain_read(offset, buf)

    node._readinto = read_with_others  # type: ignore[method-assign]
    target = _Collect(node.size)
    sources = Sources([(node, "src")], top_only=False)
    copy(sources, target, min_sparse=4096, progress=Progress(False, 1.0), readers=4)
    assert bytes(target.data) == content


def test_convert_from_nbd_matches_the_source(nbd_images: tuple[Path, list[str]]) -> None:
    """Through the command line: an NBD source (several readers) into raw and qcow2."""
    tmp, uris = nbd_images
    for fmt in ("raw", "qcow2"):
        result = ours("convert", "-f", "raw", "-O", fmt, uris[1], f"out.{fmt}", cwd=tmp)
        assert (result.rc, result.err) == (0, "")
        compared = qemu_ok("qemu-img", "compare", "-f", "raw", uris[1], f"out.{fmt}", cwd=tmp)
        assert compared == "Images are identical.\n"
