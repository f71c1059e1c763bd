"""``pyfleece nbd``'s command line, as qemu-nbd's users know it: options, errors and exit
codes, lifetime (-t, signals, pid file), -r, -e, --discard, IPv6."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import require_tool
from tests.nbdtest import SRC, TIMEOUT, free_port, nbd_tool, pattern, short_tempdir, wait_for

pytestmark = pytest.mark.timeout(60)
MiB = 1 << 20


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.raw"
    with open(path, "wb") as f:
        f.truncate(4 * MiB)
        f.write(pattern(0, MiB))
    return path


def tool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pyfleece", "nbd", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env=dict(os.environ, PYTHONPATH=SRC),
    )


def test_help() -> None:
    result = tool("--help")
    assert result.returncode == 0
    assert result.stdout.startswith("Usage: pyfleece nbd [OPTIONS] FILE")
    for option in ("--read-only", "--socket", "--shared", "--persistent", "--tls-creds"):
        assert option in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "Invalid number of arguments"),
        (["a", "b"], "Invalid number of arguments"),
        (["--bogus", "x"], "unrecognized option '--bogus'"),
        (["-Z", "x"], "invalid option -- 'Z'"),
        (["x", "-x"], "option requires an argument -- 'x'"),
        (["-e", "abc", "x"], "Invalid shared device number 'abc'"),
        (["-e", "-1", "x"], "Invalid shared device number '-1'"),
        (["--discard=foo", "x"], "Invalid discard mode `foo'"),
        (["--cache=fast", "x"], "Invalid cache mode `fast'"),
        (["-x", "n" * 4097, "x"], "' too long"),
        (["-D", "d" * 4097, "x"], "' too long"),
        (["/nonexistent.img"], "Could not open '/nonexistent.img': No such file or directory"),
        (["--object", "tls-creds-x509,dir=/d", "x"], "Parameter 'id' is missing"),
    ],
    ids=[
        "no-file",
        "two-files",
        "unknown-long",
        "unknown-short",
        "missing-argument",
        "shared-not-a-number",
        "shared-negative",
        "discard",
        "cache",
        "long-name",
        "long-description",
        "no-such-file",
        "object-without-id",
    ],
)
def test_bad_command_lines(args: list[str], message: str) -> None:
    result = tool(*args)
    assert result.returncode == 1
    assert result.stderr.startswith("pyfleece nbd: ") and message in result.stderr


def test_unknown_format(image: Path) -> None:
    result = tool("-f", "foo", "-k", str(image.parent / "s"), str(image))
    assert result.returncode == 1 and "Unknown driver 'foo'" in result.stderr


def test_bad_port(image: Path) -> None:
    result = tool("-b", "127.0.0.1", "-p", "0x10", str(image))
    assert result.returncode == 1
    assert "address resolution failed for 127.0.0.1:0x10" in result.stderr


def test_socket_in_use_by_a_live_server(image: Path) -> None:
    with short_tempdir() as tmp:
        sock = str(tmp / "s")
        with nbd_tool(["-f", "raw", "-k", sock, "-t", str(image)], tmp / "pid"):
            result = tool("-f", "raw", "-k", sock, str(image))
        assert result.returncode == 1 and "Address already in use" in result.stderr


def test_stale_socket_is_replaced(image: Path) -> None:
    with short_tempdir() as tmp:
        stale = socket.socket(socket.AF_UNIX)
        stale.bind(str(tmp / "s"))
        stale.close()  # the file stays, nobody listens
        with nbd_tool(["-f", "raw", "-k", str(tmp / "s"), "-t", str(image)], tmp / "pid"):
            out = subprocess.run(
                [require_tool("nbdinfo"), "--size", f"nbd+unix:///?socket={tmp / 's'}"],
                capture_output=True,
                text=True,
                timeout=30,
            )
            assert out.stdout.strip() == str(4 * MiB)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["term", "int"])
def test_signals_exit_cleanly(image: Path, signum: int) -> None:
    with short_tempdir() as tmp:
        sock, pid_file = tmp / "s", tmp / "pid"
        with nbd_tool(["-f", "raw", "-k", str(sock), "-t", str(image)], pid_file) as proc:
            assert int(pid_file.read_text()) == proc.pid
            client = socket.socket(socket.AF_UNIX)
            client.connect(str(sock))  # a client still connected does not hold the exit
            proc.send_signal(signum)
            assert proc.wait(TIMEOUT) == 0
            client.close()
        assert not sock.exists() and not pid_file.exists()


def test_without_persistent_exits_after_the_last_client(image: Path) -> None:
    with short_tempdir() as tmp:
        sock = tmp / "s"
        with nbd_tool(["-f", "raw", "-k", str(sock), str(image)], tmp / "pid") as proc:
            nbdinfo = require_tool("nbdinfo")
            uri = f"nbd+unix:///?socket={sock}"
            out = subprocess.run([nbdinfo, "--size", uri], capture_output=True, timeout=30)
            assert out.returncode == 0
            assert proc.wait(TIMEOUT) == 0


def test_persistent_keeps_serving(image: Path) -> None:
    with short_tempdir() as tmp:
        sock = tmp / "s"
        with nbd_tool(["-f", "raw", "-k", str(sock), "-t", str(image)], tmp / "pid") as proc:
            nbdinfo = require_tool("nbdinfo")
            for _ in range(3):
                out = subprocess.run(
                    [nbdinfo, "--size", f"nbd+unix:///?socket={sock}"],
                    capture_output=True,
                    timeout=30,
                )
                assert out.returncode == 0
            assert proc.poll() is None


def _can(uri: str, what: str) -> int:
    result = subprocess.run(
        [require_tool("nbdinfo"), f"--can={what}", uri], capture_output=True, timeout=30
    )
    return result.returncode


def test_read_only(image: Path) -> None:
    with short_tempdir() as tmp:
        sock = tmp / "s"
        with nbd_tool(["-r", "-f", "raw", "-k", str(sock), "-t", str(image)], tmp / "pid"):
            uri = f"nbd+unix:///?socket={sock}"
            assert _can(uri, "write") == 2 and _can(uri, "read") == 0
            qemu_io = require_tool("qemu-io")
            write = subprocess.run(
                [qemu_io, "-f", "raw", "-c", "write 0 512", uri],
                capture_output=True,
                text=True,
                timeout=30,
            )  # qemu sees NBD_FLAG_READ_ONLY and refuses to open for writing
            assert write.returncode != 0 and "Permission denied" in write.stderr
            read = subprocess.run(
                [qemu_io, "-r", "-f", "raw", "-c", "read -P 0 1M 512", uri],
                capture_output=True,
                text=True,
                timeout=30,
            )
            assert read.returncode == 0 and "read 512/512" in read.stdout
    assert image.read_bytes()[:512] == pattern(0, 512)


def test_shared_one_means_no_multi_conn(image: Path) -> None:
    with short_tempdir() as tmp:
        sock = tmp / "s"
        for shared, expected in (("1", 2), ("2", 0)):
            args = ["-f", "raw", "-k", str(sock), "-t", "-e", shared, str(image)]
            with nbd_tool(args, tmp / "pid"):
                assert _can(f"nbd+unix:///?socket={sock}", "multi-conn") == expected


@pytest.mark.parametrize(
    ("mode", "punched"), [("ignore", False), ("unmap", True)], ids=["ignore", "unmap"]
)
def test_discard_mode(image: Path, mode: str, punched: bool) -> None:
    with short_tempdir() as tmp:
        sock = tmp / "s"
        args = ["-f", "raw", "-k", str(sock), "-t", f"--discard={mode}", str(image)]
        with nbd_tool(args, tmp / "pid"):
            subprocess.run(
                [require_tool("qemu-io"), "-f", "raw", "-c", "discard 0 1M",
                 f"nbd+unix:///?socket={sock}"],
                check=True, capture_output=True, timeout=30,
            )  # fmt: skip
    fd = os.open(image, os.O_RDONLY)
    try:
        assert (os.lseek(fd, 0, os.SEEK_DATA) >= MiB) == punched
    except OSError:
        assert punched  # no data left at all
    finally:
        os.close(fd)


def test_ipv6(image: Path) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback")
    port = free_port()
    with short_tempdir() as tmp:
        with nbd_tool(["-f", "raw", "-b", "::1", "-p", str(port), "-t", str(image)], tmp / "p"):
            result = subprocess.run(
                [require_tool("nbdinfo"), "--size", f"nbd://[::1]:{port}"],
                capture_output=True,
                text=True,
                timeout=30,
            )
            assert result.stdout.strip() == str(4 * MiB)
        wait_for(lambda: not (tmp / "p").exists(), "the pid file to go")
