"""PyPI's qemu.qmp client against our QMP server: negotiation, commands, events, two clients."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import ExecuteError, QMPClient

from pyfleece.errors import CommandError
from pyfleece.monitor.client import QmpConnection
from pyfleece.monitor.core import PACKAGE, create_dispatcher
from tests.integration.test_monitor_support import serving, wait_until

TIMEOUT = 10


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, TIMEOUT))


def test_qemu_qmp_client_negotiates_and_executes(tmp_path: Path) -> None:
    with serving(tmp_path) as (_, _, path, _):

        async def session() -> None:
            client = QMPClient("t")
            await client.connect(path)
            try:
                version = await client.execute("query-version")
                assert version == {
                    "qemu": {"major": 7, "minor": 2, "micro": 0},
                    "package": PACKAGE,
                }
                names = {c["name"] for c in await client.execute("query-commands")}
                assert names == {
                    "qmp_capabilities",
                    "query-version",
                    "query-commands",
                    "quit",
                    "human-monitor-command",
                }
                text = await client.execute(
                    "human-monitor-command", {"command-line": "info version"}
                )
                assert text == f"7.2.0 ({PACKAGE})\r\n"
                with pytest.raises(ExecuteError) as info:
                    await client.execute("blockdev-add", {"driver": "null-co"})
                assert info.value.error_class == "CommandNotFound"
                assert str(info.value) == "The command blockdev-add has not been found"
            finally:
                await client.disconnect()

        run(session())


def test_events_reach_two_clients_in_emission_order(tmp_path: Path) -> None:
    with serving(tmp_path) as (_, ctx, path, _):

        async def session() -> None:
            clients = [QMPClient(f"c{i}") for i in range(2)]
            for client in clients:
                await client.connect(path)
            wait_until(lambda: len(ctx.events._subscribers) == 2, what="two subscribers")
            for i in range(50):
                ctx.events.emit("BLOCK_JOB_PENDING" if i % 2 else "JOB_STATUS_CHANGE", {"n": i})
            for client in clients:
                seen = [await client.events.get() for _ in range(50)]
                assert [e["data"]["n"] for e in seen] == list(range(50))
                stamps = [(e["timestamp"]["seconds"], e["timestamp"]["microseconds"]) for e in seen]
                assert stamps == sorted(stamps)
                assert all(0 <= us < 1_000_000 for _, us in stamps)
                await client.disconnect()

        run(session())


def test_events_wait_for_negotiation(tmp_path: Path) -> None:
    with serving(tmp_path) as (_, ctx, path, _), QmpConnection(path) as conn:
        ctx.events.emit("NOT_FOR_YOU")
        conn.negotiate()
        ctx.events.emit("FOR_YOU", {"x": 1})
        reply = conn.execute("query-version")
        assert "return" in reply
        assert [e["event"] for e in conn.events] == ["FOR_YOU"]


def test_commands_from_many_sessions_are_serialised(tmp_path: Path) -> None:
    dispatcher = create_dispatcher()
    lock = threading.Lock()
    state = {"inside": 0, "overlaps": 0, "calls": 0}

    def slow(ctx: Any, args: dict[str, Any]) -> dict[str, Any]:
        with lock:
            state["inside"] += 1
            state["calls"] += 1
            state["overlaps"] += state["inside"] > 1
        threading.Event().wait(0.002)  # widen the window another command could enter by
        with lock:
            state["inside"] -= 1
        return {}

    dispatcher.qmp.register("blockdev-del", slow)
    with serving(tmp_path, dispatcher=dispatcher) as (_, _, path, _):

        async def client(i: int) -> None:
            qmp = QMPClient(f"c{i}")
            await qmp.connect(path)
            for _ in range(20):
                await qmp.execute("blockdev-del", {"node-name": "x"})
            await qmp.disconnect()

        async def all_clients() -> None:
            await asyncio.gather(*(client(i) for i in range(4)))

        run(all_clients())
    assert state["calls"] == 80
    assert state["overlaps"] == 0


def test_handler_errors_become_replies_and_the_server_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    dispatcher = create_dispatcher()

    def failing(ctx: Any, args: dict[str, Any]) -> None:
        if args["node-name"] == "bug":
            raise ZeroDivisionError("boom")
        raise CommandError(f"Block job '{args['node-name']}' not found", "DeviceNotActive")

    dispatcher.qmp.register("blockdev-del", failing)
    with serving(tmp_path, dispatcher=dispatcher) as (_, _, path, _), QmpConnection(path) as conn:
        conn.negotiate()
        reply = conn.execute("blockdev-del", {"node-name": "j"})
        assert reply["error"] == {"class": "DeviceNotActive", "desc": "Block job 'j' not found"}
        reply = conn.execute("blockdev-del", {"node-name": "bug"})
        assert reply["error"]["class"] == "GenericError"
        assert "ZeroDivisionError: boom" in reply["error"]["desc"]
        assert "return" in conn.execute("query-version")
    assert any("failed unexpectedly" in r.message for r in caplog.records)


def test_quit_replies_then_the_daemon_may_stop(tmp_path: Path) -> None:
    with serving(tmp_path) as (server, ctx, path, _), QmpConnection(path) as conn:
        conn.negotiate()
        conn.send({"execute": "quit", "id": "q"})
        assert ctx.quit_requested.wait(TIMEOUT)
        server.stop(drain=2)
        reply, _ = conn.reply_to("q")
        assert reply == {"return": {}, "id": "q"}
        with pytest.raises(ConnectionError):
            conn.receive()
        assert not os.path.exists(path)


def test_tcp_chardev_and_several_sessions_per_socket(tmp_path: Path) -> None:
    from pyfleece.monitor.options import parse_chardev, parse_monitor
    from pyfleece.monitor.server import MonitorServer
    from tests.integration.test_monitor_support import Context

    server = MonitorServer(
        create_dispatcher(),
        Context(),
        [parse_monitor("chardev=t")],
        [parse_chardev("socket,id=t,host=127.0.0.1,port=0,server=on,wait=off")],
    )
    server.start()
    try:
        host, port = server.addresses()["t"][0][:2]
        conns = [QmpConnection((host, port)) for _ in range(3)]
        for conn in conns:
            conn.negotiate()
            assert conn.execute("query-version")["return"]["package"] == PACKAGE
        for conn in conns:
            conn.close()
    finally:
        server.stop()


def test_pretty_monitor(tmp_path: Path) -> None:
    from pyfleece.monitor.jsonstream import JsonStreamer
    from pyfleece.monitor.options import parse_chardev, parse_monitor
    from pyfleece.monitor.server import MonitorServer
    from tests.integration.test_monitor_support import Context

    path = str(tmp_path / "p.sock")
    server = MonitorServer(
        create_dispatcher(),
        Context(),
        [parse_monitor("p,pretty=on")],
        [parse_chardev(f"socket,id=p,path={path},server=on,wait=off")],
    )
    server.start()
    try:
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(path)
        sock.settimeout(TIMEOUT)
        sock.sendall(b'{"execute": "qmp_capabilities", "id": 1}')
        streamer = JsonStreamer()
        messages: list[Any] = []
        raw = b""
        while len(messages) < 2:
            data = sock.recv(4096)
            assert data
            raw += data
            messages += streamer.feed(data)
        assert messages[0].value["QMP"]["version"]["package"] == PACKAGE
        assert messages[1].value == {"return": {}, "id": 1}
        assert raw.startswith(b'{\n    "QMP": {\n        "version": {\n')
        sock.close()
    finally:
        server.stop()
