"""Hostile input on raw sockets: every session gets an error or is dropped, never the server.

Each test ends by proving the server still serves: a fresh connection negotiates and runs a
command.
"""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import threading
from pathlib import Path

import pytest

from pyfleece.monitor.client import QmpConnection
from pyfleece.monitor.qmp import QmpLimits
from tests.integration.test_monitor_support import rss_bytes, serving, wait_until

MiB = 1 << 20
SYNC = b'{"execute":"query-version","id":"sync"}\n'


def still_serving(path: str) -> None:
    with QmpConnection(path) as conn:
        conn.negotiate()
        assert "return" in conn.execute("query-version")


def errors_until_sync(conn: QmpConnection) -> list[str]:
    """Sends the sync command; returns the error descs that arrive before its reply."""
    conn.send_raw(SYNC)
    reply, before = conn.reply_to("sync")
    assert "return" in reply
    return [m["error"]["desc"] for m in before]


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b'{ "execute": }', ["JSON parse error, expecting value"]),
        (b"[1, 2]", ["QMP input must be a JSON object"]),
        (b'"just a string"', ["QMP input must be a JSON object"]),
        (b'{"execute": 1}', ["QMP input member 'execute' must be a string"]),
        (b'{"execute": "query-version", "arguments": []}',
         ["QMP input member 'arguments' must be an object"]),
        (b'{"execute": "query-version", "bogus": 1}', ["QMP input member 'bogus' is unexpected"]),
        (b'{"execute": "query-version", "arguments": {"x": 1}}', ["Parameter 'x' is unexpected"]),
        (b'{"execute": "no-such-command"}', ["The command no-such-command has not been found"]),
        (b'{"execute": "blockdev-del"}', ["The command blockdev-del has not been found"]),
        (b'{"execute": "human-monitor-command"}', ["Parameter 'command-line' is missing"]),
        (b'{"execute": "human-monitor-command", "arguments": {"command-line": 5}}',
         ["Invalid parameter type for 'command-line', expected: string"]),
        (b'{"a": \xff}', ["JSON parse error, stray '\ufffd'", "JSON parse error, expecting value"]),
        (b'{"execute": "query-version", "id": "\xc3"}',
         ["JSON parse error, invalid UTF-8 sequence in string"]),
        (b"\x00\x01\x1b", ["JSON parse error, stray ''", "JSON parse error, stray '\x01'",
                           "JSON parse error, stray '\x1b'"]),
        (b"}}]", ["JSON parse error, expecting value"] * 3),
    ],
    ids=lambda v: repr(v)[:40] if isinstance(v, bytes) else "",
)  # fmt: skip
def test_bad_input_gets_errors_and_the_session_goes_on(
    tmp_path: Path, data: bytes, expected: list[str]
) -> None:
    with serving(tmp_path) as (_, _, path, _), QmpConnection(path) as conn:
        conn.negotiate()
        assert errors_until_sync(QmpSend(conn, data)) == expected
        assert errors_until_sync(conn) == []
        still_serving(path)


class QmpSend:
    """Sends ``data`` first, then behaves as the connection."""

    def __new__(cls, conn: QmpConnection, data: bytes) -> QmpConnection:  # type: ignore[misc]
        conn.send_raw(data)
        return conn


def test_commands_before_negotiation(tmp_path: Path) -> None:
    with serving(tmp_path) as (_, _, path, _), QmpConnection(path) as conn:
        assert conn.greeting["QMP"]["capabilities"] == []
        for name in ("query-version", "quit", "no-such-command"):
            reply = conn.execute(name)
            assert reply["error"] == {
                "class": "CommandNotFound",
                "desc": "Expecting capabilities negotiation with 'qmp_capabilities'",
            }
        reply = conn.execute("qmp_capabilities", {"enable": ["oob"]})
        assert reply["error"] == {"class": "GenericError", "desc": "Capability oob not available"}
        conn.negotiate()
        reply = conn.execute("qmp_capabilities")
        assert reply["error"]["class"] == "CommandNotFound"
        assert "return" in conn.execute("query-version")


def test_huge_lines_are_refused_without_buffering_them(tmp_path: Path) -> None:
    limits = QmpLimits(max_message=1 * MiB)
    huge_string = b'{"execute": "query-version", "id": "' + b"x" * (24 * MiB) + b'"}\n'
    many_tokens = b'{"execute": "query-version", "id": [' + b"1," * 100_000 + b"1]}\n"
    letters = b"a" * (8 * MiB) + b"\n"  # one endless keyword
    with serving(tmp_path, limits=limits) as (_, _, path, _), QmpConnection(path) as conn:
        conn.negotiate()
        before = rss_bytes()  # the payloads above already count: only the server's growth shows
        assert errors_until_sync(QmpSend(conn, huge_string)) == ["JSON token size limit exceeded"]
        assert errors_until_sync(QmpSend(conn, many_tokens)) == ["JSON token count limit exceeded"]
        assert errors_until_sync(QmpSend(conn, letters)) == ["JSON token size limit exceeded"]
        assert rss_bytes() - before < 16 * MiB  # buffering any one of them would exceed this
        still_serving(path)


def test_deep_nesting_is_refused(tmp_path: Path) -> None:
    with serving(tmp_path) as (_, _, path, _), QmpConnection(path) as conn:
        conn.negotiate()
        ok = b'{"execute": "query-version", "id": ' + b"[" * 1023 + b"]" * 1023 + b"}"
        conn.send_raw(ok)
        reply = conn.receive()
        assert "return" in reply
        depth, value = 0, reply["id"]
        while value != []:
            depth, value = depth + 1, value[0]
        assert depth == 1022
        deep = b"[" * 100_000 + b"]" * 100_000
        assert errors_until_sync(QmpSend(conn, deep)) == ["JSON nesting depth limit exceeded"]
        still_serving(path)


def test_input_that_never_resynchronises_closes_that_connection(tmp_path: Path) -> None:
    limits = QmpLimits(max_message=16 << 10)  # discards up to 64 times that, then gives up
    with serving(tmp_path, limits=limits) as (_, _, path, _), QmpConnection(path) as conn:
        conn.negotiate()
        sender = threading.Thread(target=_send_ignoring_errors, args=(conn, b"[" * (8 * MiB)))
        sender.start()
        first = conn.receive()
        assert first["error"]["desc"] == "JSON nesting depth limit exceeded"
        final = conn.receive()
        assert final["error"]["desc"] == "JSON message too large to resynchronise"
        with pytest.raises(ConnectionError):
            conn.receive()
        sender.join(10)
        still_serving(path)


def _send_ignoring_errors(conn: QmpConnection, data: bytes) -> None:
    with contextlib.suppress(OSError):  # the server hangs up on us, as it should
        conn.send_raw(data)


def test_abrupt_disconnects(tmp_path: Path) -> None:
    with serving(tmp_path) as (_, _, path, _):
        for tail in (b'{"execute": "query-ver', b'{"execute": "query-version"}', b""):
            sock = socket.socket(socket.AF_UNIX)
            sock.connect(path)
            sock.sendall(b'{"execute": "qmp_capabilities"}' + tail)
            linger_zero = struct.pack("ii", 1, 0)  # close with a reset, not a clean shutdown
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger_zero)
            sock.close()
        still_serving(path)


def test_client_that_never_reads_events_is_dropped(tmp_path: Path) -> None:
    limits = QmpLimits(max_queued=64 << 10)
    with serving(tmp_path, limits=limits) as (_, ctx, path, _):
        silent = QmpConnection(path)
        silent.negotiate()
        silent.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        reader = QmpConnection(path)
        reader.negotiate()
        wait_until(lambda: len(ctx.events._subscribers) == 2, what="two subscribers")
        received: list[int] = []
        progress = threading.Condition()

        def read_all() -> None:
            while len(received) < 20000:
                n = reader.receive()["data"]["n"]
                with progress:
                    received.append(n)
                    progress.notify()

        thread = threading.Thread(target=read_all)
        thread.start()
        for n in range(20000):  # ~2.5 MiB of events: more than the silent client may hold
            with progress:  # keep the reading client within its bound, whatever the speeds
                assert progress.wait_for(lambda n=n: len(received) >= n - 100, timeout=10)
            ctx.events.emit("FLOOD", {"n": n, "pad": "p" * 64})
        thread.join(30)
        assert not thread.is_alive()
        assert received == list(range(20000))
        wait_until(lambda: len(ctx.events._subscribers) == 1, what="the silent client dropped")
        silent.sock.settimeout(10)
        with pytest.raises((ConnectionError, OSError, json.JSONDecodeError)):
            while True:  # whatever it had received, then the end
                silent.receive()
        silent.close()
        reader.close()
        still_serving(path)


def test_client_that_never_reads_replies_is_held_back(tmp_path: Path) -> None:
    limits = QmpLimits(max_queued=32 << 10)
    with serving(tmp_path, limits=limits) as (_, _, path, _):
        greedy = QmpConnection(path)
        greedy.negotiate()
        count = 5000  # ~0.5 MiB of replies, never read until the end
        payload = b"".join(b'{"execute": "query-version", "id": %d}\n' % i for i in range(count))
        sender = threading.Thread(target=greedy.send_raw, args=(payload,))
        sender.start()
        still_serving(path)  # the held-back session holds nothing the others need
        ids = [greedy.receive()["id"] for _ in range(count)]
        sender.join(10)
        assert ids == list(range(count))
        greedy.close()
