"""HMP over a socket (banner, prompt, echo, help, quoting) and through human-monitor-command."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest

from pyfleece.block.memory import MemoryNode
from pyfleece.errors import CommandError
from pyfleece.monitor.client import HmpConnection, QmpConnection
from pyfleece.monitor.core import HMP_BANNER, PACKAGE, create_dispatcher
from pyfleece.monitor.dispatch import Dispatcher
from pyfleece.monitor.qemuio import QemuIo
from tests.integration.test_monitor_support import serving, wait_until


def with_block_commands() -> tuple[Dispatcher, MemoryNode, list[dict[str, Any]]]:
    """A dispatcher with the kind of HMP commands the daemon registers: qemu-io on a device,
    and drive_add with its optional address."""
    dispatcher = create_dispatcher()
    disk = MemoryNode("ide0-hd0", 1 << 20)
    calls: list[dict[str, Any]] = []

    def qemu_io(ctx: Any, args: dict[str, Any]) -> str:
        if args["device"] != "ide0-hd0":
            raise CommandError(f"Device '{args['device']}' not found")
        return QemuIo(disk).run(args["command"]).output

    def drive_add(ctx: Any, args: dict[str, Any]) -> str:
        calls.append(args)
        return "OK\n"

    dispatcher.hmp.register(
        "qemu-io", "qdev:-d,device:B,command:s", '[-d] [device] "[command]"',
        "run a qemu-io command on a block device", qemu_io,
    )  # fmt: skip
    dispatcher.hmp.register(
        "drive_add", "node:-n,pci_addr:s?,opts:s", "[-n] [addr] opts",
        "add a drive", drive_add,
    )  # fmt: skip
    return dispatcher, disk, calls


def test_banner_prompt_echo_and_line_endings(tmp_path: Path) -> None:
    with serving(tmp_path, hmp=True) as (_, _, _, path):
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(path)
        sock.settimeout(10)
        expected = f"{HMP_BANNER}\r\n(qemu) ".encode()
        got = b""
        while len(got) < len(expected):
            got += sock.recv(4096)
        assert got == expected
        sock.sendall(b"info version\r\n")  # CRLF is one line end
        expected = f"info version\r\n7.2.0 ({PACKAGE})\r\n(qemu) ".encode()
        got = b""
        while len(got) < len(expected):
            got += sock.recv(4096)
        assert got == expected
        sock.close()


def test_help_info_and_unknown_commands(tmp_path: Path) -> None:
    with serving(tmp_path, hmp=True) as (_, _, _, path), HmpConnection(path) as hmp:
        listing = hmp.command("help")
        assert listing.splitlines()[:3] == [
            "help|? [cmd] -- show the help for all commands or one",
            "info [subcommand] -- show information about the daemon",
            "quit|q  -- shut the daemon down",
        ]
        assert hmp.command("? quit") == "quit|q  -- shut the daemon down\n"
        info = "info version  -- show the version of QEMU this daemon speaks as\n"
        assert hmp.command("info") == info
        assert hmp.command("help info") == info
        assert hmp.command("help info version") == info
        assert hmp.command("info version") == f"7.2.0 ({PACKAGE})\n"
        assert hmp.command("foo bar") == "unknown command: 'foo'\n"
        assert hmp.command("info foo") == "unknown command: 'info foo'\n"
        assert hmp.command("help foo") == "unknown command: 'foo'\n"
        assert hmp.command("help info foo") == "unknown command: 'info foo'\n"
        assert hmp.command("quit now") == (
            "quit|q: extraneous characters at the end of line\n"
            'Try "help quit" for more information\n'
        )
        assert hmp.command("") == ""
        assert hmp.command("   ") == ""


def test_quoting_and_qemu_io(tmp_path: Path) -> None:
    dispatcher, disk, _ = with_block_commands()
    with (
        serving(tmp_path, hmp=True, dispatcher=dispatcher) as (_, _, _, path),
        HmpConnection(path) as hmp,
    ):
        out = hmp.command('qemu-io ide0-hd0 "write -P 0xab 0 64k"')
        assert out.startswith("wrote 65536/65536 bytes at offset 0\n64 KiB, 1 ops; ")
        assert disk.read(0, 65536) == b"\xab" * 65536
        out = hmp.command('qemu-io ide0-hd0 "read -P 0xab 0 64k"')
        assert out.startswith("read 65536/65536 bytes at offset 0\n")
        out = hmp.command('qemu-io ide0-hd0 "read -P 0xcd 0 512"')
        assert out.startswith("Pattern verification failed at offset 0, 512 bytes\n")
        assert hmp.command('qemu-io ide0-hd0 "discard 0 64k"').startswith("discard 65536/")
        assert hmp.command('qemu-io ide0-hd0 "flush"') == ""
        assert hmp.command('qemu-io nosuch "flush"') == "Error: Device 'nosuch' not found\n"
        assert hmp.command("qemu-io ide0-hd0") == (
            'qemu-io: string expected\nTry "help qemu-io" for more information\n'
        )
        assert hmp.command("qemu-io") == (
            'qemu-io: block device name expected\nTry "help qemu-io" for more information\n'
        )
        assert hmp.command('qemu-io ide0-hd0 "read 0 512" extra').startswith(
            "qemu-io: extraneous characters at the end of line\n"
        )
        assert hmp.command('qemu-io ide0-hd0 "unterminated').startswith(
            "qemu-io: string expected\n"
        )
        assert hmp.command("qemu-io -x ide0-hd0 flush") == (
            'qemu-io: unsupported option -x\nTry "help qemu-io" for more information\n'
        )


def test_optional_leading_argument(tmp_path: Path) -> None:
    dispatcher, _, calls = with_block_commands()
    with (
        serving(tmp_path, hmp=True, dispatcher=dispatcher) as (_, _, _, path),
        HmpConnection(path) as hmp,
    ):
        opts = "backing=ide0-hd0,file=BACKUP.qcow2,id=target0,if=none"
        assert hmp.command(f"drive_add {opts}") == "OK\n"
        assert hmp.command(f"drive_add 0 {opts}") == "OK\n"
        assert hmp.command(f'drive_add -n "0" "{opts}"') == "OK\n"
        assert hmp.command("drive_add") == (
            'drive_add: string expected\nTry "help drive_add" for more information\n'
        )
    assert calls == [
        {"opts": opts},
        {"pci_addr": "0", "opts": opts},
        {"node": True, "pci_addr": "0", "opts": opts},
    ]


def test_human_monitor_command_over_qmp(tmp_path: Path) -> None:
    dispatcher, disk, _ = with_block_commands()
    with serving(tmp_path, dispatcher=dispatcher) as (_, ctx, path, _), QmpConnection(path) as qmp:
        qmp.negotiate()

        def hmp(line: str) -> Any:
            reply = qmp.execute("human-monitor-command", {"command-line": line})
            del reply["id"]
            return reply

        assert hmp("info version") == {"return": f"7.2.0 ({PACKAGE})\r\n"}
        assert hmp("nosuch") == {"return": "unknown command: 'nosuch'\r\n"}
        reply = hmp('qemu-io ide0-hd0 "write -P 0x5d 4k 4k"')
        assert reply["return"].startswith("wrote 4096/4096 bytes at offset 4096\r\n")
        assert disk.read(4096, 4096) == b"\x5d" * 4096
        assert hmp('qemu-io nosuch "flush"') == {"return": "Error: Device 'nosuch' not found\r\n"}
        assert hmp("quit") == {"return": ""}
        assert ctx.quit_requested.is_set()


def test_line_editing_and_bounded_lines(tmp_path: Path) -> None:
    with serving(tmp_path, hmp=True) as (_, _, _, path), HmpConnection(path) as hmp:
        # backspace, an arrow key's escape sequence and a tab are edited out
        assert hmp.command("info versionx\x7f\x1b[D\t") == f"7.2.0 ({PACKAGE})\n"
        long_line = "x" * 100_000
        assert hmp.command(long_line) == f"unknown command: '{'x' * 4095}'\n"


@pytest.mark.parametrize("echo", [True, False])
def test_hmp_sessions_survive_abrupt_clients(tmp_path: Path, echo: bool) -> None:
    with serving(tmp_path, hmp=True) as (server, _, _, path):
        server.hmp_echo = echo
        for data in (b"help", b"info ver", b"\xff\xfe\x00", b""):
            sock = socket.socket(socket.AF_UNIX)
            sock.connect(path)
            sock.sendall(data)
            sock.close()
        with HmpConnection(path, echo=echo) as hmp:
            assert hmp.command("info version") == f"7.2.0 ({PACKAGE})\n"
        wait_until(lambda: len(server._sessions) == 0, what="sessions to end")
