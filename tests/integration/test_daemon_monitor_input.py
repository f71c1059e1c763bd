"""Bad input to the daemon's monitors gets errors, and the daemon keeps serving everyone.

Broken JSON, wrong types, unknown commands and members, a huge line, commands before
negotiation, bad HMP lines and block commands naming things that do not exist: each gets a
clear error, the same session goes on, and other clients (QMP, HMP, NBD) are unaffected.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyfleece.monitor.client import HmpConnection, QmpConnection
from tests.support import PYFLEECE, qemu_io, run, running


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Path]:
    run(["qemu-img", "create", "-q", "-f", "raw", str(tmp_path / "d.raw"), "4M"])
    argv = [*PYFLEECE, "daemon",
            "--drive", f"file={tmp_path / 'd.raw'},format=raw,id=d0,if=none",
            "--chardev", f"socket,path={tmp_path / 'qmp.sock'},server=on,wait=off,id=q",
            "--monitor", "chardev=q",
            "--chardev", f"socket,path={tmp_path / 'hmp.sock'},server=on,wait=off,id=h",
            "--monitor", "chardev=h,mode=readline",
            "--nbd-server", f"addr.type=unix,addr.path={tmp_path / 'nbd.sock'}",
            "--export", "type=nbd,id=e0,node-name=d0,writable=on",
            "--pidfile", str(tmp_path / "pid")]  # fmt: skip
    with running(argv, tmp_path / "pid"):
        yield tmp_path


def error_of(reply: dict[str, object]) -> tuple[str, str]:
    error = reply.get("error")
    assert isinstance(error, dict), reply
    return str(error["class"]), str(error["desc"])


def test_qmp_bad_input(daemon: Path) -> None:
    with QmpConnection(str(daemon / "qmp.sock")) as qmp:
        assert error_of(qmp.execute("query-block")) == (
            "CommandNotFound",
            "Expecting capabilities negotiation with 'qmp_capabilities'",
        )
        qmp.negotiate()
        qmp.send_raw(b'{"execute": "query-block", \n')
        qmp.send_raw(b"}}}\n")
        assert error_of(qmp.receive())[0] == "GenericError"
        assert error_of(qmp.execute("no-such-command")) == (
            "CommandNotFound",
            "The command no-such-command has not been found",
        )
        assert error_of(qmp.execute("blockdev-del", {"node-name": 5})) == (
            "GenericError",
            "Invalid parameter type for 'node-name', expected: string",
        )
        assert error_of(qmp.execute("blockdev-backup", {"device": "d0", "sync": "none"})) == (
            "GenericError",
            "Parameter 'target' is missing",
        )
        assert (
            error_of(
                qmp.execute("blockdev-add", {"driver": "raw", "node-name": "x", "file": "nope"})
            )[0]
            == "GenericError"
        )
        assert error_of(qmp.execute("block-job-cancel", {"device": "nope"})) == (
            "DeviceNotActive",
            "Block job 'nope' not found",
        )
        assert error_of(qmp.execute("blockdev-del", {"node-name": "d0"}))[0] == "GenericError"
        qmp.send_raw(b'{"execute": "query-version", "arguments": {"x": "' + b"a" * (8 << 20)
                     + b'"}}\n')  # fmt: skip
        assert error_of(qmp.receive())[0] == "GenericError"
        assert "return" in qmp.execute("query-version")
        # Another client, and the NBD export, were never disturbed.
        with QmpConnection(str(daemon / "qmp.sock")) as other:
            other.negotiate()
            assert other.execute("query-block")["return"][0]["device"] == "d0"
        qemu_io(
            f"nbd+unix:///d0?socket={daemon / 'nbd.sock'}",
            "write -P 0x5a 0 64k",
            "read -P 0x5a 0 64k",
        )


def test_hmp_bad_input(daemon: Path) -> None:
    with HmpConnection(str(daemon / "hmp.sock")) as hmp:
        assert "unknown command: 'frobnicate'" in hmp.command("frobnicate")
        assert "not found" in hmp.command("drive_del nope")
        assert "Device 'nope' not found" in hmp.command('qemu-io nope "read 0 512"')
        out = hmp.command("drive_add file=/nonexistent/x.img,id=bad,if=none")
        assert "Could not open" in out, out
        assert "if=ide" in hmp.command("drive_add file=x,id=y,if=ide")
        assert hmp.command('qemu-io d0 "write -P 0x11 0 4k"').startswith("wrote 4096/4096")
        assert "d0" in hmp.command("info block")


def test_abrupt_disconnects(daemon: Path) -> None:
    for path in ("qmp.sock", "hmp.sock"):
        for payload in (b"", b'{"execute": "qmp_capab', b"\xff\xfe garbage"):
            with socket.socket(socket.AF_UNIX) as raw:
                raw.connect(str(daemon / path))
                raw.sendall(payload)
    with QmpConnection(str(daemon / "qmp.sock")) as qmp:
        qmp.negotiate()
        assert "return" in qmp.execute("query-block-exports")
