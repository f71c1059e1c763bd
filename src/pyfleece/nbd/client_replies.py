"""Receiving NBD replies on the client (nbd-proto.md, "Simple reply message", "Structured
reply chunk message", "Structured reply types").

``Command`` is one request in flight: what was asked, where a read's data goes, what has
arrived so far, and a one-shot latch its waiter blocks on. ``ReplyReader`` is run by the
client's reader thread: it reads one reply message at a time from a buffered ``Receiver``,
checks it against the command it answers, and completes the command when its reply ends.

Checks (a failure is a ``ProtocolError``, and the client then drops the connection): known
cookie; structured chunks only after negotiation; content chunks only for reads, inside the
request, non-overlapping, covering the whole request on success; hole and status chunks of
the right length; status chunks only for negotiated contexts and once per context; error
chunks whose message fits. Error replies themselves are not violations: they become a
``BlockError`` carrying the errno on the command, and the connection goes on.

Invariants: a read's data goes straight from the socket into the caller's buffer (only the
part that arrived together with a header is copied from the receive buffer); no chunk larger
than the command allows is read into memory.
"""

from __future__ import annotations

import bisect
import errno
import os
import struct
import threading

from pyfleece.errors import BlockError, ProtocolError
from pyfleece.nbd import proto
from pyfleece.nbd.client_transport import Transport
from pyfleece.nbd.proto import Cmd, ReplyFlag, ReplyType

#: Receive buffer for headers (and the first bytes of payloads that arrive with them).
RECV_BUFFER = 16 << 10
#: Largest error chunk or block status chunk accepted (the spec allows 2^20 extents).
MAX_STATUS_CHUNK = 4 + 8 * (1 << 20)
MAX_ERROR_CHUNK = 6 + proto.MAX_STRING + 8 + 1024

_ZEROS = bytes(1 << 20)
_ERROR_HEAD = struct.Struct(">IH")


_HOST_ERRNO = {int(e): int(getattr(errno, e.name)) for e in proto.Err if e}


def host_errno(wire: int) -> int:
    """The host errno for an NBD error value; unknown values count as EINVAL (the spec)."""
    return _HOST_ERRNO.get(wire, errno.EINVAL)


class Command:
    """One request in flight, and how it ended.

    The reader thread fills ``status`` (block status: context id -> [(length, flags)]) and
    ``error``, then releases the latch; ``wait`` blocks on it and raises the error.
    """

    __slots__ = ("_latch", "buf", "cmd", "covered", "error", "length", "offset", "status")

    def __init__(self, cmd: Cmd, offset: int, length: int, buf: memoryview | None) -> None:
        self.cmd = cmd
        self.offset = offset
        self.length = length
        self.buf = buf
        self.covered: list[int] = []  # flat sorted [start0, end0, start1, end1, ...]
        self.status: dict[int, list[tuple[int, int]]] = {}
        self.error: BaseException | None = None
        self._latch = threading.Lock()
        self._latch.acquire()

    @property
    def done(self) -> bool:
        return not self._latch.locked()

    def complete(self, error: BaseException | None = None) -> None:
        if error is not None and self.error is None:
            self.error = error
        self._latch.release()

    def wait(self, timeout: float | None = None) -> None:
        """Blocks until the reply has ended; raises its error.

        Raises:
            BlockError: the server answered with an error (its errno is kept).
            ProtocolError: the connection broke before the reply ended.
            TimeoutError: no reply within ``timeout`` seconds (the command stays in flight).
        """
        if not self._latch.acquire(timeout=-1 if timeout is None else timeout):
            raise TimeoutError(f"NBD {self.cmd.name} at {self.offset} did not complete in time")
        self._latch.release()
        if self.error is not None:
            raise self.error

    def cover(self, start: int, end: int, where: str) -> None:
        """Records a content chunk [start, end) of a read, refusing overlaps."""
        spans = self.covered
        i = bisect.bisect_right(spans, start)
        if i % 2 == 1 or (i < len(spans) and spans[i] < end):
            raise ProtocolError(f"NBD server {where} sent overlapping read chunks at {start}")
        # merge with the neighbours it touches, keeping the list short for in-order servers
        if i > 0 and spans[i - 1] == start:
            if i < len(spans) and spans[i] == end:
                del spans[i - 1 : i + 1]
            else:
                spans[i - 1] = end
        elif i < len(spans) and spans[i] == end:
            spans[i] = start
        else:
            spans[i:i] = [start, end]

    def fully_covered(self) -> bool:
        return self.covered == [self.offset, self.offset + self.length]


class Receiver:
    """A buffered reader over a transport: headers come from the buffer, payloads go to
    their destination directly."""

    def __init__(self, transport: Transport) -> None:
        self.transport = transport
        self.buf = bytearray(RECV_BUFFER)
        self.view = memoryview(self.buf)
        self.start = 0
        self.end = 0

    def at_boundary(self) -> bool:
        return self.start == self.end

    def fill(self, need: int) -> None:
        """Ensures ``need`` bytes are buffered. Raises EOFError at the end of the stream."""
        if self.start == self.end:
            self.start = self.end = 0
        elif self.start + need > len(self.buf):
            n = self.end - self.start
            self.buf[:n] = self.view[self.start : self.end]
            self.start, self.end = 0, n
        while self.end - self.start < need:
            got = self.transport.recv_into(self.view[self.end :])
            if got == 0:
                raise EOFError
            self.end += got

    def unpack(self, st: struct.Struct) -> tuple[int, ...]:
        self.fill(st.size)
        values = st.unpack_from(self.buf, self.start)
        self.start += st.size
        return values

    def readinto(self, dst: memoryview) -> None:
        n = len(dst)
        have = min(n, self.end - self.start)
        if have:
            dst[:have] = self.view[self.start : self.start + have]
            self.start += have
        while have < n:
            got = self.transport.recv_into(dst[have:], wait_all=True)
            if got == 0:
                raise EOFError
            have += got

    def take(self, n: int) -> bytes:
        out = bytearray(n)
        self.readinto(memoryview(out))
        return bytes(out)


class ReplyReader:
    """Reads reply messages and applies them to the commands in flight.

    ``commands`` is the client's cookie -> Command table; ``finish(cookie)`` removes a
    command whose reply ended and completes it.
    """

    def __init__(
        self,
        rx: Receiver,
        where: str,
        structured: bool,
        contexts: dict[int, str],
        lookup: dict[int, Command],
    ) -> None:
        self.rx = rx
        self.where = where
        self.structured = structured
        self.contexts = contexts
        self.lookup = lookup

    def violation(self, message: str) -> ProtocolError:
        return ProtocolError(f"NBD server {self.where}: {message}")

    def command(self, cookie: int) -> Command:
        cmd = self.lookup.get(cookie)
        if cmd is None:
            raise self.violation(f"reply for unknown cookie {cookie:#x}")
        return cmd

    def next_reply(self) -> tuple[int, BaseException | None] | None:
        """Reads one message. Returns (cookie, error) when a command's reply has ended,
        None after a chunk that does not end it.

        Raises:
            EOFError: the stream ended cleanly between two messages.
            ProtocolError: the message breaks the protocol, or the stream ended inside it.
        """
        try:
            self.rx.fill(4)
        except EOFError:
            if self.rx.at_boundary():
                raise
            raise self.violation("closed the connection in the middle of a reply") from None
        (magic,) = struct.unpack_from(">I", self.rx.buf, self.rx.start)
        try:
            if magic == proto.SIMPLE_REPLY_MAGIC:
                return self.simple()
            if magic == proto.STRUCTURED_REPLY_MAGIC:
                return self.chunk()
        except EOFError:
            raise self.violation("closed the connection in the middle of a reply") from None
        raise self.violation(f"bad reply magic {magic:#010x}")

    def simple(self) -> tuple[int, BaseException | None]:
        _, err, cookie = self.rx.unpack(proto.SIMPLE_REPLY)
        cmd = self.command(cookie)
        if err:
            return cookie, self.server_error(cmd, err, "")
        if cmd.cmd == Cmd.READ:
            assert cmd.buf is not None  # reads always carry their buffer
            self.rx.readinto(cmd.buf)
        elif cmd.cmd == Cmd.BLOCK_STATUS:
            raise self.violation("simple reply to a successful NBD_CMD_BLOCK_STATUS")
        return cookie, None

    def chunk(self) -> tuple[int, BaseException | None] | None:
        _, flags, kind, cookie, length = self.rx.unpack(proto.STRUCTURED_REPLY)
        if not self.structured:
            raise self.violation("structured reply chunk without negotiation")
        cmd = self.command(cookie)
        if kind == ReplyType.OFFSET_DATA:
            self.data_chunk(cmd, length)
        elif kind == ReplyType.OFFSET_HOLE:
            self.hole_chunk(cmd, length)
        elif kind == ReplyType.BLOCK_STATUS:
            self.status_chunk(cmd, length)
        elif kind & 0x8000:
            self.error_chunk(cmd, kind, length)
        elif kind == ReplyType.NONE:
            if length or not flags & ReplyFlag.DONE:
                raise self.violation("NBD_REPLY_TYPE_NONE with a payload or without DONE")
        else:
            raise self.violation(f"unknown reply chunk type {kind}")
        if not flags & ReplyFlag.DONE:
            return None
        return cookie, cmd.error if cmd.error is not None else self.check_complete(cmd)

    def content_range(self, cmd: Command, offset: int, n: int, what: str) -> int:
        if cmd.cmd != Cmd.READ:
            raise self.violation(f"{what} chunk in reply to NBD_CMD_{cmd.cmd.name}")
        if n <= 0 or offset < cmd.offset or offset + n > cmd.offset + cmd.length:
            raise self.violation(
                f"{what} chunk [{offset}, {offset + n}) outside the request "
                f"[{cmd.offset}, {cmd.offset + cmd.length})"
            )
        cmd.cover(offset, offset + n, self.where)
        return offset - cmd.offset

    def data_chunk(self, cmd: Command, length: int) -> None:
        if length < 9:
            raise self.violation(f"NBD_REPLY_TYPE_OFFSET_DATA of length {length}")
        (offset,) = self.rx.unpack(proto.CHUNK_OFFSET)
        rel = self.content_range(cmd, offset, length - 8, "data")
        assert cmd.buf is not None  # reads always carry their buffer
        self.rx.readinto(cmd.buf[rel : rel + length - 8])

    def hole_chunk(self, cmd: Command, length: int) -> None:
        if length != proto.CHUNK_HOLE.size:
            raise self.violation(f"NBD_REPLY_TYPE_OFFSET_HOLE of length {length}")
        offset, n = self.rx.unpack(proto.CHUNK_HOLE)
        rel = self.content_range(cmd, offset, n, "hole")
        assert cmd.buf is not None  # reads always carry their buffer
        for pos in range(rel, rel + n, len(_ZEROS)):
            k = min(len(_ZEROS), rel + n - pos)
            cmd.buf[pos : pos + k] = _ZEROS[:k]

    def status_chunk(self, cmd: Command, length: int) -> None:
        if cmd.cmd != Cmd.BLOCK_STATUS:
            raise self.violation(f"block status chunk in reply to NBD_CMD_{cmd.cmd.name}")
        if length < 12 or (length - 4) % 8 or length > MAX_STATUS_CHUNK:
            raise self.violation(f"NBD_REPLY_TYPE_BLOCK_STATUS of length {length}")
        payload = self.rx.take(length)
        (ident,) = proto.CHUNK_STATUS_ID.unpack_from(payload)
        if ident not in self.contexts:
            raise self.violation(f"block status for unknown metadata context id {ident}")
        if ident in cmd.status:
            raise self.violation(f"two block status chunks for context id {ident}")
        extents = [(n, fl) for n, fl in proto.EXTENT.iter_unpack(memoryview(payload)[4:])]
        if any(n == 0 for n, _ in extents):
            raise self.violation("block status extent of length 0")
        cmd.status[ident] = extents

    def error_chunk(self, cmd: Command, kind: int, length: int) -> None:
        if length < 6 or length > MAX_ERROR_CHUNK:
            raise self.violation(f"error chunk of length {length}")
        payload = self.rx.take(length)
        err, msg_len = _ERROR_HEAD.unpack_from(payload)
        tail = 8 if kind == ReplyType.ERROR_OFFSET else 0
        if msg_len > length - 6 - tail:
            raise self.violation(f"error chunk message of {msg_len} bytes overflows the chunk")
        message = payload[6 : 6 + msg_len].decode("utf-8", "replace")
        if kind == ReplyType.ERROR_OFFSET:
            (at,) = struct.unpack_from(">Q", payload, 6 + msg_len)
            message = f"{message} (at offset {at})" if message else f"at offset {at}"
        if err == 0:
            raise self.violation("error chunk with error value 0")
        if cmd.error is None:
            cmd.error = self.server_error(cmd, err, message)

    def server_error(self, cmd: Command, err: int, message: str) -> BlockError:
        code = host_errno(err)
        what = f"NBD_CMD_{cmd.cmd.name} [{cmd.offset}, {cmd.offset + cmd.length})"
        text = message or os.strerror(code)
        return BlockError(code, f"{what} failed on NBD server {self.where}: {text}")

    def check_complete(self, cmd: Command) -> BaseException | None:
        if cmd.cmd == Cmd.READ and not cmd.fully_covered():
            raise self.violation(
                f"read [{cmd.offset}, {cmd.offset + cmd.length}) ended successfully "
                "without covering the whole request"
            )
        if cmd.cmd == Cmd.BLOCK_STATUS and len(cmd.status) != len(self.contexts):
            raise self.violation("block status reply without a chunk for every context")
        return None
