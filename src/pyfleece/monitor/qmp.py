"""One QMP connection (qmp-spec.rst): greeting, negotiation, commands, replies, events.

Threads: the connection's *reader* thread (the caller of ``run``) reads, frames
(``jsonstream``) and executes requests one after another, through the dispatcher (which
serialises commands across all monitors). A *writer* thread sends the outbound queue. Replies
and events share that queue, so the client sees them in the order they were produced.

States: NEGOTIATING (only ``qmp_capabilities``; anything else is CommandNotFound "Expecting
capabilities negotiation with 'qmp_capabilities'"; no events) -> COMMAND (every registered
command; events delivered) -> CLOSED.

Bounds (Design invariant 3): the input framer bounds each message; the outbound queue is
bounded in bytes. A reply waits for room (the reader stops reading: TCP flow control pushes
back on a client that sends without reading); an event never waits — it is produced on the
emitter's thread — so a session whose client does not read its events is disconnected when
the queue is full, and the producers and the other sessions carry on.

Capabilities: none offered (``oob`` is not implemented); ``enable: ["oob"]`` gets QEMU's
"Capability oob not available".
"""

from __future__ import annotations

import contextlib
import enum
import logging
import socket
import threading
from collections import deque
from dataclasses import dataclass
from typing import Any

from pyfleece.errors import CommandError
from pyfleece.events import Event
from pyfleece.monitor.core import version_info
from pyfleece.monitor.dispatch import Dispatcher
from pyfleece.monitor.jsonstream import JsonStreamer, Message
from pyfleece.monitor.jsonvalue import encode
from pyfleece.monitor.schema import validate

log = logging.getLogger(__name__)


class State(enum.Enum):
    NEGOTIATING = "negotiating"
    COMMAND = "command"
    CLOSED = "closed"


@dataclass(frozen=True)
class QmpLimits:
    """Per-connection bounds.

    Attributes:
        max_message: bytes of token text one request may hold.
        max_tokens: tokens one request may hold.
        max_nesting: open ``{``/``[`` one request may nest (QEMU: 1024).
        (A request crossing a bound gets one error; the rest of it is skipped, up to 64 times
        ``max_message`` bytes, beyond which the connection is closed.)
        max_queued: bytes of replies and events waiting to be sent.
    """

    max_message: int = 1 << 20
    max_tokens: int = 1 << 16
    max_nesting: int = 1024
    max_queued: int = 4 << 20


class QmpSession:
    """Serves one QMP client on a connected socket until it leaves or ``close`` is called."""

    def __init__(
        self,
        sock: socket.socket,
        dispatcher: Dispatcher,
        ctx: Any,
        *,
        pretty: bool = False,
        limits: QmpLimits | None = None,
        name: str = "qmp",
    ) -> None:
        self.sock = sock
        self.dispatcher = dispatcher
        self.ctx = ctx
        self.pretty = pretty
        self.limits = limits or QmpLimits()
        self.log = log.getChild(name)
        self.state = State.NEGOTIATING
        self._streamer = JsonStreamer(
            max_bytes=self.limits.max_message,
            max_tokens=self.limits.max_tokens,
            max_nesting=self.limits.max_nesting,
            max_discard=64 * self.limits.max_message,
        )
        self._cond = threading.Condition()
        self._queue: deque[bytes] = deque()
        self._queued = 0
        self._closing = False
        self._busy = False  # a request is being handled and its reply is not queued yet
        self._events_open = False  # events queue up only once negotiation's reply is queued
        self._early_events: list[bytes] = []
        self._unsubscribe: Any = None
        self._writer = threading.Thread(target=self._write_loop, name=f"{name}-writer")

    # -- lifecycle -------------------------------------------------------------------------

    def run(self) -> None:
        """Greets the client and serves it; returns when the connection ends."""
        self._writer.start()
        try:
            self._send_reply({"QMP": {"version": version_info(), "capabilities": []}})
            self._read_loop()
        finally:
            if self._unsubscribe is not None:
                self._unsubscribe()  # here, never on an emitter's thread (the bus is locked)
            self.close()
            self._writer.join()
            self.sock.close()

    def close(self, *, drain: float = 0.0) -> None:
        """Ends the session; with ``drain`` seconds, the request being handled gets its reply
        and queued output is sent first, if the client takes it in time. Safe from any
        thread but an EventBus subscriber, any number of times."""
        with self._cond:
            if drain > 0 and not self._closing:
                self._cond.wait_for(
                    lambda: (not self._queue and not self._busy) or self._closing, timeout=drain
                )
            if self._closing:
                return
            self._closing = True
            self.state = State.CLOSED
            self._cond.notify_all()
        with contextlib.suppress(OSError):  # already gone
            self.sock.shutdown(socket.SHUT_RDWR)

    # -- input -----------------------------------------------------------------------------

    def _read_loop(self) -> None:
        while not self._closing:
            try:
                data = self.sock.recv(1 << 16)
            except OSError as err:
                self.log.debug("receive failed: %s", err)
                return
            if not data:
                self.log.debug("client disconnected")
                return
            for message in self._streamer.feed(data):
                with self._cond:
                    self._busy = True
                try:
                    sent = self._send_reply(self._handle(message))
                finally:
                    with self._cond:
                        self._busy = False
                        self._cond.notify_all()
                if not sent:
                    return
                if message.fatal:  # the input cannot be resynchronised: say so, then go
                    self.log.warning("closing the connection: %s", message.error)
                    self.close(drain=1.0)
                    return

    def _handle(self, message: Message) -> dict[str, Any]:
        if message.error is not None:
            return {"error": {"class": "GenericError", "desc": message.error}}
        request = message.value
        if not isinstance(request, dict):
            return {"error": {"class": "GenericError", "desc": "QMP input must be a JSON object"}}
        body = self._execute(request)
        if "id" not in request:
            return body
        if "return" in body:
            return {"return": body["return"], "id": request["id"]}
        return {"id": request["id"], **body}

    def _execute(self, request: dict[str, Any]) -> dict[str, Any]:
        problem = check_request(request)
        if problem is not None:
            return _error("GenericError", problem)
        name = request["execute"]
        arguments = request.get("arguments", {})
        if self.state is State.NEGOTIATING:
            if name != "qmp_capabilities":
                return _error(
                    "CommandNotFound", "Expecting capabilities negotiation with 'qmp_capabilities'"
                )
            return self._negotiate(arguments)
        return self.dispatcher.qmp_reply(self.ctx, name, arguments)

    def _negotiate(self, arguments: dict[str, Any]) -> dict[str, Any]:
        spec = self.dispatcher.qmp.spec("qmp_capabilities")
        try:
            args = validate(spec.args if spec else None, arguments)
        except CommandError as err:
            return _error(err.error_class, str(err))
        wanted = args.get("enable", [])
        if wanted:  # we offer no capability
            return _error("GenericError", f"Capability {', '.join(wanted)} not available")
        self.state = State.COMMAND
        self._unsubscribe = self.ctx.events.subscribe(self._on_event)
        return {"return": {}}

    # -- output ----------------------------------------------------------------------------

    def _encode(self, message: dict[str, Any]) -> bytes:
        return encode(message, pretty=self.pretty).encode("ascii") + b"\r\n"

    def _encode_reply(self, message: dict[str, Any]) -> bytes:
        try:
            return self._encode(message)
        except (TypeError, ValueError) as err:  # a handler returned something not JSON
            self.log.error("reply cannot be encoded as JSON: %s", err)
            error = _error("GenericError", f"internal error: reply is not JSON: {err}")
            return self._encode({"id": message["id"], **error} if "id" in message else error)

    def _send_reply(self, message: dict[str, Any]) -> bool:
        """Queues a reply, waiting for room; False once the session is closing."""
        data = self._encode_reply(message)
        with self._cond:
            self._cond.wait_for(
                lambda: (
                    self._closing
                    or self._queued + len(data) <= self.limits.max_queued
                    or not self._queue
                )
            )
            if self._closing:
                return False
            self._append(data)
            if self.state is State.COMMAND and not self._events_open:
                for event in self._early_events:  # those that raced negotiation's reply
                    self._append(event)
                self._early_events.clear()
                self._events_open = True
        return True

    def _on_event(self, event: Event) -> None:
        """EventBus subscriber: runs on the emitter's thread, so it never waits."""
        data = self._encode(event.to_qmp())
        with self._cond:
            if self._closing:
                return
            if not self._events_open and len(self._early_events) < 1024:
                self._early_events.append(data)
                return
            if self._events_open and self._queued + len(data) <= self.limits.max_queued:
                self._append(data)
                return
        self.log.warning(
            "client is not reading its events (%d bytes queued): disconnecting it", self._queued
        )
        self.close()  # the reader thread unsubscribes: the bus is locked while we run

    def _append(self, data: bytes) -> None:
        self._queue.append(data)
        self._queued += len(data)
        self._cond.notify_all()

    def _write_loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._queue or self._closing)
                if not self._queue:
                    return
                data = self._queue.popleft()
            try:
                self.sock.sendall(data)
            except OSError as err:
                self.log.debug("send failed: %s", err)
                self.close()
                return
            finally:
                with self._cond:
                    self._queued -= len(data)
                    self._cond.notify_all()


def check_request(request: dict[str, Any]) -> str | None:
    """QEMU's checks of a request's members, in its words; None when it is well formed."""
    for key, value in request.items():
        if key == "execute":
            if not isinstance(value, str):
                return "QMP input member 'execute' must be a string"
        elif key == "arguments":
            if not isinstance(value, dict):
                return "QMP input member 'arguments' must be an object"
        elif key != "id":
            return f"QMP input member '{key}' is unexpected"
    if "execute" not in request:
        return "QMP input lacks member 'execute'"
    return None


def _error(error_class: str, desc: str) -> dict[str, Any]:
    return {"error": {"class": error_class, "desc": desc}}
