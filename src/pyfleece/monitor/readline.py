"""One HMP connection in readline mode: banner, prompt, line editing, echo.

What the client sees, as from QEMU's socket monitor::

    QEMU 7.2.0 monitor - type 'help' for more information\\r\\n
    (qemu) info version\\r\\n            <- the echo of what the client typed
    7.2.0 (pyfleece 0.1.0)\\r\\n
    (qemu)

Decisions (see docs/monitor.md):

- **Echo is on**, as QEMU's readline echoes what it receives (it is written for a terminal).
  A script written against QEMU expects the echoed line before the output; a script that just
  reads until ``(qemu) `` works either way. ``echo=False`` turns it off.
- Output lines end in CRLF, as QEMU's monitor writes them.
- A line ends at ``\\n`` or ``\\r``; ``\\r\\n`` is one line end (QEMU would run an empty second
  command and print a second prompt, which only confuses scripts).
- Editing: backspace (0x08, 0x7F) deletes the last character; terminal escape sequences
  (arrow keys) and other control characters are ignored; a line keeps at most 4095
  characters, as QEMU's readline buffer does, so memory per connection is bounded.

Threads: the caller of ``run`` serves the connection; each command runs through the
dispatcher (serialised with every other monitor's), and its output is sent after the command
lock is released, so a client that does not read blocks only its own session.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from typing import Any

from pyfleece.monitor.core import HMP_BANNER, HMP_PROMPT
from pyfleece.monitor.dispatch import Dispatcher

log = logging.getLogger(__name__)

MAX_LINE = 4095


class LineEditor:
    """Turns received bytes into complete lines (pure; see the module docstring)."""

    def __init__(self) -> None:
        self._line = bytearray()
        self._escape = 0  # 0: none; 1: after ESC; 2: in a CSI/SS3 sequence
        self._last_cr = False

    def feed(self, data: bytes) -> list[str]:
        lines: list[str] = []
        for byte in data:
            if self._escape:
                self._in_escape(byte)
                continue
            if byte in (0x0A, 0x0D):
                if not (byte == 0x0A and self._last_cr):
                    lines.append(self._line.decode("utf-8", "replace"))
                    self._line.clear()
                self._last_cr = byte == 0x0D
                continue
            self._last_cr = False
            if byte in (0x08, 0x7F):
                self._backspace()
            elif byte == 0x1B:
                self._escape = 1
            elif byte >= 0x20 and len(self._line) < MAX_LINE:
                self._line.append(byte)
        return lines

    def _in_escape(self, byte: int) -> None:
        if self._escape == 1:
            self._escape = 2 if byte in b"[O" else 0
        elif 0x40 <= byte <= 0x7E:
            self._escape = 0  # the final byte of the sequence

    def _backspace(self) -> None:
        """Deletes the last character, all of its UTF-8 bytes."""
        while self._line:
            byte = self._line.pop()
            if not 0x80 <= byte < 0xC0:  # not a continuation byte: the character's first
                return


class HmpSession:
    """Serves one HMP client on a connected socket."""

    def __init__(
        self,
        sock: socket.socket,
        dispatcher: Dispatcher,
        ctx: Any,
        *,
        echo: bool = True,
        name: str = "hmp",
    ) -> None:
        self.sock = sock
        self.dispatcher = dispatcher
        self.ctx = ctx
        self.echo = echo
        self.log = log.getChild(name)
        self._editor = LineEditor()
        self._closed = threading.Event()

    def run(self) -> None:
        """Greets the client and serves it; returns when the connection ends."""
        try:
            self._send(f"{HMP_BANNER}\n{HMP_PROMPT}")
            while not self._closed.is_set():
                data = self.sock.recv(1 << 16)
                if not data:
                    return
                for line in self._editor.feed(data):
                    output = self.dispatcher.run_hmp(self.ctx, line)
                    echoed = f"{line}\n" if self.echo else ""
                    self._send(f"{echoed}{output}{HMP_PROMPT}")
        except OSError as err:
            self.log.debug("connection ended: %s", err)
        finally:
            self.close()
            self.sock.close()

    def close(self, *, drain: float = 0.0) -> None:
        """Ends the session (output is written synchronously: nothing is left to drain)."""
        self._closed.set()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    def _send(self, text: str) -> None:
        self.sock.sendall(text.replace("\n", "\r\n").encode("utf-8", "replace"))
