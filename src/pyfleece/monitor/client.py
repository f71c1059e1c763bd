"""Small synchronous monitor clients, for tests, tools and the demo.

``QmpConnection`` speaks raw QMP (it can send broken input on purpose); ``HmpConnection``
drives a readline monitor by reading up to each ``(qemu) `` prompt. Both work against
pyfleece and against QEMU alike. Every read has a deadline: a server that stops answering
fails the caller instead of hanging it.
"""

from __future__ import annotations

import json
import socket
import time
from typing import Any

from pyfleece.monitor.jsonstream import JsonStreamer

Address = str | tuple[str, int]


def connect(address: Address, timeout: float) -> socket.socket:
    """A connected stream socket to a Unix path or a (host, port)."""
    if isinstance(address, str):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    else:
        sock = socket.socket(socket.AF_INET6 if ":" in address[0] else socket.AF_INET)
    sock.settimeout(timeout)
    sock.connect(address)
    return sock


class QmpConnection:
    """A raw QMP client: messages in, JSON objects out, one line each."""

    def __init__(self, address: Address, *, timeout: float = 10.0) -> None:
        self.timeout = timeout
        self.sock = connect(address, timeout)
        self._buffer = b""
        self.events: list[dict[str, Any]] = []  # events met while waiting for replies
        self.greeting = self.receive()

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> QmpConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send(self, message: dict[str, Any]) -> None:
        self.send_raw(json.dumps(message).encode() + b"\n")

    def receive(self) -> dict[str, Any]:
        """The next message (reply or event).

        Raises:
            TimeoutError: nothing complete arrived within the timeout.
            ConnectionError: the server closed the connection.
        """
        deadline = time.monotonic() + self.timeout
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no QMP message within the timeout")
            self.sock.settimeout(remaining)
            data = self.sock.recv(1 << 16)
            if not data:
                raise ConnectionError("the QMP server closed the connection")
            self._buffer += data
        line, self._buffer = self._buffer.split(b"\n", 1)
        try:
            message: dict[str, Any] = json.loads(line)
        except RecursionError:  # deeper than Python's parser goes: ours is iterative
            parsed = JsonStreamer(max_bytes=len(line) + 2, max_nesting=1 << 20).feed(line)
            message = parsed[0].value
        return message

    def reply_to(self, ident: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Reads until the reply carrying ``id`` ``ident``; returns it and what came before."""
        before: list[dict[str, Any]] = []
        while True:
            message = self.receive()
            if message.get("id") == ident and ("return" in message or "error" in message):
                return message, before
            before.append(message)

    def execute(self, name: str, arguments: dict[str, Any] | None = None) -> dict[str, Any]:
        """Sends a command with a fresh id; returns its reply (events met on the way are
        kept in ``events``)."""
        ident = f"c{time.monotonic_ns()}"
        message: dict[str, Any] = {"execute": name, "id": ident}
        if arguments is not None:
            message["arguments"] = arguments
        self.send(message)
        reply, before = self.reply_to(ident)
        self.events.extend(m for m in before if "event" in m)
        return reply

    def negotiate(self) -> None:
        reply = self.execute("qmp_capabilities")
        if "return" not in reply:
            raise ConnectionError(f"QMP negotiation failed: {reply}")


class HmpConnection:
    """A readline-monitor client: sends a line, returns the text before the next prompt."""

    PROMPT = b"(qemu) "

    def __init__(self, address: Address, *, timeout: float = 10.0, echo: bool = True) -> None:
        self.timeout = timeout
        self.echo = echo
        self.sock = connect(address, timeout)
        self._buffer = b""
        self.banner = self._until_prompt()

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> HmpConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def command(self, line: str) -> str:
        """Runs a command line; returns its output ("\\n" line ends, the echo removed)."""
        self.sock.sendall(line.encode() + b"\n")
        text = self._until_prompt()
        if self.echo:
            _, _, text = text.partition("\n")
        return text

    def _until_prompt(self) -> str:
        deadline = time.monotonic() + self.timeout
        while self.PROMPT not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no HMP prompt within the timeout")
            self.sock.settimeout(remaining)
            data = self.sock.recv(1 << 16)
            if not data:
                raise ConnectionError("the HMP server closed the connection")
            self._buffer += data
        text, self._buffer = self._buffer.split(self.PROMPT, 1)
        return text.decode("utf-8", "replace").replace("\r\n", "\n")
