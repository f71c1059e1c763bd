"""The NBD client: connect by URI, then read, write, zero, trim, flush, cache and query block
status over one connection (nbd-proto.md, "Transmission", "Request types").

Concurrency: one connection carries many requests at once. Any thread may call any method;
each request is sent whole under a send lock, and one reader thread per connection reads the
replies, matches them to their requests by cookie, writes read data straight into the
caller's buffer and wakes the caller. The ``submit_*`` methods return a ``Command`` without
waiting, so a single thread can also keep several requests in flight. (A connection pool was
not chosen: qemu-nbd serves one client at a time by default.)

Errors: an error reply becomes a ``BlockError`` carrying the errno, and the connection goes
on. A server that breaks the protocol gets a hard disconnect: every request in flight, and
every later one, fails with ``ProtocolError``. Connecting raises ``ImageError`` (refused,
unreachable, TLS refused) or ``ProtocolError`` (not speaking NBD properly).

With ``strict`` (the default) requests the server would have to refuse are refused here
first (past the end, writes to a read-only export, unadvertised commands); tests turn it off
to see the server's answers. Requests are split to the server's maximum payload and padded to
its minimum block size (unaligned writes read-modify-write the edge blocks).

Invariants: a request is registered before its first byte is sent, so its reply always
finds it; a caller's buffer is only written while its call is waiting; ``close`` waits for
requests in flight, then sends NBD_CMD_DISC.
"""

from __future__ import annotations

import errno
import itertools
import logging
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import suppress
from typing import NamedTuple

from pyfleece.errors import BlockError, ProtocolError
from pyfleece.nbd import proto
from pyfleece.nbd.client_handshake import ExportInfo
from pyfleece.nbd.client_replies import Command, Receiver, ReplyReader
from pyfleece.nbd.client_session import (
    CONNECT_TIMEOUT,
    list_exports,
    list_meta_contexts,
    negotiate_export,
    open_socket,
    start_session,
)
from pyfleece.nbd.client_transport import Transport
from pyfleece.nbd.proto import BASE_ALLOCATION, Cmd, CmdFlag, TransmitFlag
from pyfleece.nbd.uri import NbdUri, parse_uri

__all__ = [
    "Command",
    "ExportInfo",
    "NbdClient",
    "StatusExtent",
    "list_exports",
    "list_meta_contexts",
]

log = logging.getLogger(__name__)

Buffer = bytes | bytearray | memoryview

#: Largest request we send, whatever larger maximum the server allows.
MAX_IO = proto.MAX_REQUEST
#: Largest effect length of a payload-less request (write zeroes, trim, block status).
MAX_EFFECT = 1 << 31
#: How long ``close`` waits for requests in flight by default, in seconds.
CLOSE_TIMEOUT = 30.0


class StatusExtent(NamedTuple):
    """One extent of a metadata context: ``flags`` as the context defines them."""

    offset: int
    length: int
    flags: int


class NbdClient:
    """One connection to one NBD export. Create it with ``NbdClient.connect``."""

    def __init__(self, transport: Transport, info: ExportInfo, uri: NbdUri, *, strict: bool):
        self.uri = uri
        self.info = info
        self.strict = strict
        self.where = uri.endpoint()
        self._transport = transport
        self._cookies = itertools.count(1)
        self._inflight: dict[int, Command] = {}
        self._lock = threading.Lock()  # guards _inflight, _broken, _closing, _shutdown_seen
        self._send_lock = threading.Lock()
        self._rmw_lock = threading.Lock()
        self._broken: ProtocolError | None = None
        self._closing = False
        self._shutdown_seen = False
        step = max(info.min_block, 1)
        self.max_io = max(step, min(info.max_payload, MAX_IO) // step * step)
        self._max_effect = max(step, MAX_EFFECT // step * step)
        self._context_names = {ident: name for name, ident in info.contexts.items()}
        self._replies = ReplyReader(
            Receiver(transport), self.where, info.structured, self._context_names, self._inflight
        )
        self._reader = threading.Thread(
            target=self._read_replies, name=f"nbd-client {self.where}", daemon=True
        )
        self._reader.start()

    # -- connecting ---------------------------------------------------------------------------

    @classmethod
    def connect(
        cls,
        uri: str | NbdUri,
        *,
        contexts: Iterable[str] = (BASE_ALLOCATION,),
        timeout: float = CONNECT_TIMEOUT,
        strict: bool = True,
    ) -> NbdClient:
        """Connects to the export ``uri`` names and enters the transmission phase.

        Args:
            uri: an NBD URI (see ``pyfleece.nbd.uri``) or a parsed one.
            contexts: metadata contexts to select for block status (those the server
                does not know are silently absent from ``contexts``).
            timeout: seconds allowed for connecting and the handshake.
            strict: refuse locally what the server would have to refuse.

        Raises:
            ConfigError: the URI is malformed.
            ImageError: the server cannot be reached, refuses the export or TLS.
            ProtocolError: the server does not follow the NBD handshake.
        """
        parsed = parse_uri(uri) if isinstance(uri, str) else uri
        sock = open_socket(parsed, timeout)
        try:
            _, neg = start_session(sock, parsed)
            info = negotiate_export(neg, parsed, list(contexts))
            sock.settimeout(None)
        except BaseException:
            sock.close()
            raise
        log.info("connected to %s export '%s' (%d bytes)", neg.where, info.name, info.size)
        return cls(neg.transport, info, parsed, strict=strict)

    # -- what the export allows ---------------------------------------------------------------

    @property
    def size(self) -> int:
        return self.info.size

    @property
    def flags(self) -> TransmitFlag:
        return self.info.flags

    @property
    def read_only(self) -> bool:
        return bool(self.info.flags & TransmitFlag.READ_ONLY)

    def can(self, flag: TransmitFlag) -> bool:
        """Whether the server advertised ``flag`` (SEND_TRIM, SEND_FUA, CAN_MULTI_CONN...)."""
        return bool(self.info.flags & flag)

    @property
    def contexts(self) -> dict[str, int]:
        """The negotiated metadata contexts, name -> id."""
        return dict(self.info.contexts)

    # -- commands, waiting --------------------------------------------------------------------

    def readinto(self, offset: int, buf: Buffer) -> None:
        """Reads ``len(buf)`` bytes at ``offset`` into ``buf`` (a writable buffer).

        Raises:
            BlockError: the server (or strict mode) refused, with its errno.
            ProtocolError: the connection broke.
        """
        view = memoryview(buf).cast("B")
        if not view:
            return
        self._check(offset, len(view), errno.EINVAL)
        start, end = self._aligned(offset, len(view))
        if (start, end) == (offset, offset + len(view)):
            self._wait_all(
                [
                    self.submit_read(o, view[o - offset : o - offset + n])
                    for o, n in _pieces(offset, len(view), self.max_io)
                ]
            )
            return
        padded = bytearray(end - start)
        self.readinto(start, padded)
        view[:] = memoryview(padded)[offset - start : offset - start + len(view)]

    def read(self, offset: int, length: int) -> bytes:
        """Reads ``length`` bytes at ``offset``."""
        buf = bytearray(length)
        self.readinto(offset, buf)
        return bytes(buf)

    def write(self, offset: int, data: Buffer, *, fua: bool = False) -> None:
        """Writes ``data`` at ``offset``; with ``fua`` it is durable when this returns."""
        view = memoryview(data).cast("B")
        if not view:
            return
        self._check_write(offset, len(view))
        start, end = self._aligned(offset, len(view))
        if (start, end) != (offset, offset + len(view)):
            self._write_unaligned(offset, view, start, end, fua)
            return
        cmds = [
            self.submit_write(o, view[o - offset : o - offset + n], fua=fua)
            for o, n in _pieces(offset, len(view), self.max_io)
        ]
        self._wait_all(cmds)
        self._emulate_fua(fua)

    def zero(
        self,
        offset: int,
        length: int,
        *,
        may_trim: bool = True,
        fua: bool = False,
        fast: bool = False,
    ) -> None:
        """Makes the range read as zeros (NBD_CMD_WRITE_ZEROES); ``may_trim`` lets the server
        deallocate it; ``fast`` fails with ENOTSUP unless zeroing is faster than writing.
        Without server support, zeros are written (or ENOTSUP with ``fast``)."""
        if length <= 0:
            return
        self._check_write(offset, length)
        if not self.can(TransmitFlag.SEND_WRITE_ZEROES) and self.strict:
            if fast:
                raise BlockError(errno.ENOTSUP, f"NBD server {self.where} cannot zero fast")
            self._write_zeros(offset, length, fua)
            return
        step = self.info.min_block
        end = offset + length
        head_end = min(-(-offset // step) * step, end)
        tail_start = max(end // step * step, head_end)
        if head_end > offset or tail_start < end:  # unaligned edges: explicit zeros
            self._write_zeros(offset, head_end - offset, fua)
            self._write_zeros(tail_start, end - tail_start, fua)
            offset, length = head_end, tail_start - head_end
            if length == 0:
                return
        flags = (0 if may_trim else CmdFlag.NO_HOLE) | (CmdFlag.FAST_ZERO if fast else 0)
        if fast and not self.can(TransmitFlag.SEND_FAST_ZERO) and self.strict:
            raise BlockError(errno.ENOTSUP, f"NBD server {self.where} cannot zero fast")
        self._effect(Cmd.WRITE_ZEROES, offset, length, flags, fua)

    def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        """Tells the server the range is no longer needed (advisory; a no-op when the server
        does not take NBD_CMD_TRIM). Only whole minimum blocks are trimmed."""
        self._check_write(offset, length)
        start = -(-offset // self.info.min_block) * self.info.min_block
        end = (offset + length) // self.info.min_block * self.info.min_block
        if end <= start or (self.strict and not self.can(TransmitFlag.SEND_TRIM)):
            return
        self._effect(Cmd.TRIM, start, end - start, 0, fua)

    def flush(self) -> None:
        """Makes every write completed so far durable (a no-op when the server advertises no
        flush: it then has no volatile cache)."""
        if self.strict and not self.can(TransmitFlag.SEND_FLUSH):
            return
        self._wait_all([self._submit(Cmd.FLUSH, 0, 0, 0)])

    def cache(self, offset: int, length: int) -> None:
        """Asks the server to prefetch the range (NBD_CMD_CACHE; advisory)."""
        self._check(offset, length, errno.EINVAL)
        if length <= 0 or (self.strict and not self.can(TransmitFlag.SEND_CACHE)):
            return
        start, end = self._aligned(offset, length)
        self._wait_all(
            [self._submit(Cmd.CACHE, 0, o, n) for o, n in _pieces(start, end - start, self.max_io)]
        )

    def block_status_once(
        self, offset: int, length: int, *, req_one: bool = False
    ) -> dict[str, list[StatusExtent]]:
        """One NBD_CMD_BLOCK_STATUS: for each negotiated context, the extents the server
        gave from ``offset`` (they may cover less, or a little more, than asked)."""
        if not self.info.contexts:
            raise BlockError(errno.ENOTSUP, f"no metadata context negotiated with {self.where}")
        if length <= 0:
            raise BlockError(errno.EINVAL, f"block status of an empty range at {offset}")
        self._check(offset, length, errno.EINVAL)
        start, end = self._aligned(offset, length)
        n = min(end - start, self._max_effect)
        cmd = self._submit(Cmd.BLOCK_STATUS, CmdFlag.REQ_ONE if req_one else 0, start, n)
        self._wait_all([cmd])
        result: dict[str, list[StatusExtent]] = {}
        for ident, extents in cmd.status.items():
            pos, out = start, []
            for ext_len, flags in extents:
                out.append(StatusExtent(pos, ext_len, flags))
                pos += ext_len
            result[self._context_names[ident]] = out
        return result

    def block_status(
        self, offset: int = 0, length: int | None = None, context: str = BASE_ALLOCATION
    ) -> Iterator[StatusExtent]:
        """Yields the extents of ``context`` covering [offset, offset+length) (to the end of
        the export by default), clipped to the range, asking the server as often as needed.

        Raises:
            BlockError: ENOTSUP if ``context`` was not negotiated, or the server's error.
        """
        if context not in self.info.contexts:
            raise BlockError(errno.ENOTSUP, f"metadata context '{context}' was not negotiated")
        end = self.size if length is None else offset + length
        while offset < end:
            before = offset
            for ext in self.block_status_once(offset, end - offset)[context]:
                lo, hi = max(ext.offset, offset), min(ext.offset + ext.length, end)
                if hi > lo:
                    yield StatusExtent(lo, hi - lo, ext.flags)
                    offset = hi
            if offset == before:
                raise ProtocolError(f"NBD server {self.where}: block status made no progress")

    # -- commands, without waiting ------------------------------------------------------------

    def submit_read(self, offset: int, buf: memoryview) -> Command:
        """Sends a read of ``len(buf)`` (at most ``max_io``) bytes into ``buf`` and returns
        at once; ``Command.wait()`` gives the outcome. ``buf`` is written until then."""
        self._check_size(len(buf))
        return self._submit(Cmd.READ, 0, offset, len(buf), buf=buf)

    def submit_write(self, offset: int, data: memoryview, *, fua: bool = False) -> Command:
        """Sends a write of at most ``max_io`` bytes and returns at once."""
        self._check_size(len(data))
        return self._submit(Cmd.WRITE, self._fua_flag(fua), offset, len(data), payload=data)

    # -- closing ------------------------------------------------------------------------------

    def close(self, timeout: float | None = CLOSE_TIMEOUT) -> None:
        """Waits for requests in flight (up to ``timeout`` seconds; then they fail with
        ProtocolError), then disconnects with NBD_CMD_DISC. Idempotent."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
            pending = list(self._inflight.values())
        deadline = None if timeout is None else time.monotonic() + timeout
        for cmd in pending:
            left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            try:
                cmd.wait(left)
            except TimeoutError:
                self._break(ProtocolError(f"NBD server {self.where} did not answer in time"))
            except (BlockError, ProtocolError):
                pass  # its caller hears about it
        if self._broken is None:
            with suppress(OSError), self._send_lock:  # OSError: the server went first
                self._transport.send([proto.encode_request(0, Cmd.DISC, 0, 0, 0)])
        self._transport.shutdown()
        self._reader.join()
        self._transport.close()
        log.info("disconnected from %s", self.where)

    def __enter__(self) -> NbdClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ----------------------------------------------------------------------------

    def _submit(
        self,
        kind: Cmd,
        flags: int,
        offset: int,
        length: int,
        *,
        buf: memoryview | None = None,
        payload: memoryview | None = None,
    ) -> Command:
        cmd = Command(kind, offset, length, buf)
        with self._lock:
            if self._broken is not None:
                raise ProtocolError(str(self._broken))
            if self._closing or self._shutdown_seen:
                raise BlockError(errno.ESHUTDOWN, f"connection to {self.where} is closing")
            cookie = next(self._cookies)
            self._inflight[cookie] = cmd
        header = proto.encode_request(flags, kind, cookie, offset, length)
        try:
            with self._send_lock:
                self._transport.send([header, payload] if payload is not None else [header])
        except OSError as err:
            self._break(ProtocolError(f"sending to NBD server {self.where} failed: {err}"))
        return cmd

    def _read_replies(self) -> None:
        """The reader thread: applies replies until the connection ends, then fails whatever
        is still in flight (only this thread completes commands, so no caller's buffer is
        written after its call has returned)."""
        try:
            while True:
                try:
                    ended = self._replies.next_reply()
                except EOFError:
                    self._end_of_stream()
                    return
                if ended is not None:
                    self._finish(*ended)
        except ProtocolError as err:
            self._break(err)
        except OSError as err:
            self._break(ProtocolError(f"connection to NBD server {self.where} failed: {err}"))
        except Exception as err:  # a bug here must not leave callers waiting forever
            log.exception("NBD client reader for %s failed", self.where)
            self._break(ProtocolError(f"NBD client reader failed: {err!r}"))
        finally:
            with self._lock:
                error = self._broken or ProtocolError(f"connection to {self.where} closed")
                pending = list(self._inflight.values())
                self._inflight.clear()
            for cmd in pending:
                cmd.complete(error)

    def _end_of_stream(self) -> None:
        """The server closed the connection between two replies."""
        with self._lock:
            inflight = len(self._inflight)
            if self._closing and not inflight:
                return
        when = f" with {inflight} request(s) in flight" if inflight else ""
        self._break(ProtocolError(f"NBD server {self.where} closed the connection{when}"))

    def _finish(self, cookie: int, error: BaseException | None) -> None:
        with self._lock:
            cmd = self._inflight.pop(cookie)
            if isinstance(error, BlockError) and error.errno == errno.ESHUTDOWN:
                self._shutdown_seen = True  # the spec: the client must then disconnect
            idle = self._shutdown_seen and not self._inflight and not self._closing
        cmd.complete(error)
        if idle:
            threading.Thread(target=self.close, name="nbd-client close", daemon=True).start()

    def _break(self, error: ProtocolError) -> None:
        """Hard disconnect. The reader thread then stops and fails every request in flight
        with the first error recorded."""
        with self._lock:
            if self._broken is not None:
                return
            self._broken = error
            quiet = self._closing and not self._inflight
        if not quiet:
            log.warning("%s", error)
        self._transport.shutdown()

    def _wait_all(self, cmds: list[Command]) -> None:
        first: BaseException | None = None
        for cmd in cmds:
            try:
                cmd.wait()
            except (BlockError, ProtocolError) as err:
                first = first or err
        if first is not None:
            raise first

    def _effect(self, kind: Cmd, offset: int, length: int, flags: int, fua: bool) -> None:
        flags |= self._fua_flag(fua)
        cmds = [
            self._submit(kind, flags, o, n) for o, n in _pieces(offset, length, self._max_effect)
        ]
        self._wait_all(cmds)
        self._emulate_fua(fua)

    def _emulate_fua(self, fua: bool) -> None:
        """FUA asked of a server that does not advertise it: flush instead."""
        if fua and not self._fua_flag(fua):
            self.flush()

    def _write_zeros(self, offset: int, length: int, fua: bool) -> None:
        if length <= 0:
            return
        zeros = memoryview(bytes(min(length, self.max_io)))
        for o, n in _pieces(offset, length, len(zeros)):
            self.write(o, zeros[:n], fua=fua)

    def _write_unaligned(
        self, offset: int, view: memoryview, start: int, end: int, fua: bool
    ) -> None:
        """Read-modify-write of the blocks around an unaligned write (serialised here)."""
        with self._rmw_lock:
            block = bytearray(end - start)
            self.readinto(start, block)
            block[offset - start : offset - start + len(view)] = view
            self.write(start, block, fua=fua)

    def _fua_flag(self, fua: bool) -> int:
        return CmdFlag.FUA if fua and (self.can(TransmitFlag.SEND_FUA) or not self.strict) else 0

    def _aligned(self, offset: int, length: int) -> tuple[int, int]:
        step = self.info.min_block
        start = offset // step * step
        return start, min(-(-(offset + length) // step) * step, max(self.size, offset + length))

    def _check(self, offset: int, length: int, err: int) -> None:
        if offset < 0 or length < 0:
            raise BlockError(errno.EINVAL, f"invalid request: offset {offset}, length {length}")
        if self.strict and offset + length > self.size:
            raise BlockError(
                err,
                f"request [{offset}, {offset + length}) is past the end of the NBD export "
                f"on {self.where} ({self.size} bytes)",
            )

    def _check_write(self, offset: int, length: int) -> None:
        if self.strict and self.read_only:
            raise BlockError(errno.EPERM, f"the NBD export on {self.where} is read-only")
        self._check(offset, length, errno.ENOSPC)

    def _check_size(self, length: int) -> None:
        if length > self.max_io:
            raise BlockError(errno.EINVAL, f"request of {length} bytes exceeds {self.max_io}")


def _pieces(offset: int, length: int, step: int) -> Iterator[tuple[int, int]]:
    end = offset + length
    while offset < end:
        n = min(step, end - offset)
        yield offset, n
        offset += n
