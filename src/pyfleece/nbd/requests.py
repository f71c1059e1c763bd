"""The transmission phase of one connection (nbd-proto.md, "Transmission", "Request types",
"Error values"): the request loop and the commands. Replies are written by ``replies``.

Concurrency (measured in docs/nbd.md): the connection's own thread reads the requests and
serves the fast ones inline, in order: reads of host-mapped nodes, writes, trims, zeroes,
block status. Requests that may block for long go to the session's workers and reply out of
order: FLUSH, CACHE, TRIM and WRITE_ZEROES with FUA, and large reads of nodes that do not
map to a host file (qcow2, ...).

Headers are parsed from a 64 KiB receive buffer (one ``recv`` brings many pipelined
requests); write payloads are received straight into a reused buffer (``recv_into`` a
memoryview). Before the reader may block in ``recv``, it flushes its batched replies.

Errors, as the spec's SHOULDs say, keep the connection: out-of-range read, trim, cache and
block status get EINVAL; writes and write-zeroes past the end ENOSPC (a write's payload is
drained first); writes to a read-only export EPERM; unknown commands and flags EINVAL;
payload-free requests of length 0 succeed (block status: EINVAL). Bad request magic, or a
write payload beyond ``DataPath.max_drain``, closes this connection (ProtocolError).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

from pyfleece.block.node import Node
from pyfleece.errors import BlockError, ProtocolError
from pyfleece.nbd import proto
from pyfleece.nbd.meta import MetaContext
from pyfleece.nbd.proto import Cmd, CmdFlag, Err
from pyfleece.nbd.replies import DataPath, Replies
from pyfleece.nbd.transport import ConnectionClosed, PlainTransport

_REQUEST = proto.REQUEST
_REQUEST_MAGIC = proto.REQUEST_MAGIC
_FUA = int(CmdFlag.FUA)
_DF = int(CmdFlag.DF)
_NO_HOLE = int(CmdFlag.NO_HOLE)
_FAST_ZERO = int(CmdFlag.FAST_ZERO)
_REQ_ONE = int(CmdFlag.REQ_ONE)
_MAX_REQUEST = proto.MAX_REQUEST

__all__ = ["DataPath", "RecvBuffer", "Transmission"]


class RecvBuffer:
    """Request headers and payloads from a transport, many headers per ``recv``.

    ``before_block`` runs before every ``recv`` (the batched replies leave then).
    """

    SIZE = 64 << 10

    def __init__(self, transport: PlainTransport, before_block: Callable[[], None]) -> None:
        self._buf = bytearray(self.SIZE)
        self._view = memoryview(self._buf)
        self._start = 0
        self._end = 0
        self._recv = transport.recv_into
        self._before_block = before_block

    def header(self) -> tuple[int, int, int, int, int, int] | None:
        """The next request header, or None if the client closed between requests.

        Raises:
            ConnectionClosed: the client closed in the middle of a header.
        """
        start = self._start
        if self._end - start < 28:
            if not self._fill():
                return None
            start = 0
        self._start = start + 28
        return _REQUEST.unpack_from(self._buf, start)

    def _fill(self) -> bool:
        rest = self._end - self._start
        if rest:
            self._buf[:rest] = self._buf[self._start : self._end]
        self._start, self._end = 0, rest
        while self._end < 28:
            self._before_block()
            n = self._recv(self._view[self._end :])
            if n == 0:
                if self._end == 0:
                    return False
                raise ConnectionClosed("the client closed the connection mid-request")
            self._end += n
        return True

    def payload_into(self, view: memoryview) -> None:
        """Fills ``view`` with the next payload bytes, bypassing the buffer for the bulk."""
        want = len(view)
        have = min(self._end - self._start, want)
        if have:
            view[:have] = self._view[self._start : self._start + have]
            self._start += have
        while have < want:
            self._before_block()
            n = self._recv(view[have:])
            if n == 0:
                raise ConnectionClosed("the client closed the connection mid-payload")
            have += n

    def drain(self, length: int) -> None:
        """Consumes and drops ``length`` payload bytes."""
        have = min(self._end - self._start, length)
        self._start += have
        length -= have
        if length <= 0:
            return
        self._start = self._end = 0
        while length > 0:
            self._before_block()
            n = self._recv(self._view[: min(length, self.SIZE)])
            if n == 0:
                raise ConnectionClosed("the client closed the connection mid-payload")
            length -= n


Submit = Callable[..., None]


class Transmission:
    """Serves requests on one negotiated connection until DISC or disconnection."""

    def __init__(
        self,
        transport: PlainTransport,
        node: Node,
        *,
        size: int,
        writable: bool,
        unmap: bool,
        structured: bool,
        contexts: list[tuple[int, MetaContext]],
        submit: Submit,
        path: DataPath,
        log: logging.LoggerAdapter[logging.Logger],
    ) -> None:
        self.node = node
        self.size = size
        self.writable = writable
        self.unmap = unmap
        self.structured = structured
        self.contexts = contexts
        self.stopping = False
        self.replies = Replies(transport, node, structured=structured, path=path, log=log)
        self._handoff = submit
        self._path = path
        self._log = log
        self._rx = RecvBuffer(transport, self.replies.flush)
        self._host_map = node.host_map
        self._queue_read = self.replies.queue_small_read
        self._buf = bytearray(64 << 10)
        self._bufview = memoryview(self._buf)
        fast = path.sendfile_min if transport.zero_copy else 1 << 62
        self._fast_max = min(fast, path.sparse_min if structured else fast, path.arena)
        self._read_flags = _FUA | (_DF if structured else 0)
        self._commands: list[Callable[[int, int, int, int], bool | None]] = [
            self._read,
            self._write,
            self._disc,
            self._flush,
            self._trim,
            self._cache,
            self._write_zeroes,
            self._block_status,
        ]

    # -- the loop ----------------------------------------------------------------------------

    def serve(self) -> None:
        """Runs until DISC (after which the caller finishes requests in flight) or EOF.

        Raises:
            ProtocolError: the client broke the protocol (bad magic, absurd payload).
            ConnectionClosed: the connection died.
        """
        header = self._rx.header
        commands = self._commands
        count = len(commands)
        try:
            while True:
                request = header()
                if request is None:
                    return
                magic, flags, kind, cookie, offset, length = request
                if magic != _REQUEST_MAGIC:
                    raise ProtocolError(f"bad request magic {magic:#010x}")
                if self.stopping:
                    if self._refuse_shutdown(kind, cookie, length):
                        return
                elif kind < count:
                    if commands[kind](flags, cookie, offset, length):
                        return
                else:
                    self.replies.fail(cookie, Err.EINVAL, f"unknown command {kind}")
        finally:
            self.replies.flush()

    def _refuse_shutdown(self, kind: int, cookie: int, length: int) -> bool:
        if kind == Cmd.DISC:
            return True
        if kind == Cmd.WRITE:
            self._drain_or_disconnect(length)
        self.replies.fail(cookie, Err.ESHUTDOWN, "the server is shutting down")
        return False

    # -- helpers -----------------------------------------------------------------------------

    def _submit(self, fn: Callable[..., None], *args: object) -> None:
        """Hands a request to the workers; the batch leaves first, so replies stay roughly
        in request order (the spec allows any order)."""
        self.replies.flush()
        self._handoff(fn, *args)

    def _done(self, cookie: int, fn: Callable[[], object]) -> None:
        """Runs a node operation and replies with its outcome (any thread)."""
        try:
            fn()
        except BlockError as err:
            self.replies.fail_block(cookie, err)
        else:
            self.replies.ok(cookie)

    def _done_inline(self, cookie: int, fn: Callable[[], object]) -> None:
        """The same, on the reader thread: a success reply joins the batch."""
        try:
            fn()
        except BlockError as err:
            self.replies.fail_block(cookie, err)
        else:
            self.replies.queue_ok(cookie)

    def _buffer(self, length: int) -> memoryview:
        """A buffer for one inline request: the connection's own, grown as needed."""
        if length <= len(self._buf):
            return self._bufview[:length]
        if length > self._path.keep_buffer:
            return memoryview(bytearray(length))
        self._buf = bytearray(1 << (length - 1).bit_length())
        self._bufview = memoryview(self._buf)
        return self._bufview[:length]

    def _refused(
        self, cookie: int, flags: int, allowed: int, name: str, *, write: bool = False
    ) -> bool:
        """Checks flags, and for writing commands the export's mode; replies if refused."""
        if flags & ~allowed:
            self.replies.fail(cookie, Err.EINVAL, f"invalid flags {flags:#x} for NBD_CMD_{name}")
            return True
        if write and not self.writable:
            self.replies.fail(cookie, Err.EPERM, "the export is read-only")
            return True
        return False

    def _out_of_range(self, cookie: int, offset: int, length: int, err: Err) -> bool:
        if offset + length > self.size:
            end = offset + length
            message = f"request [{offset}, {end}) is past the end of the export ({self.size} bytes)"
            self.replies.fail(cookie, err, message)
            return True
        return False

    # -- READ --------------------------------------------------------------------------------

    def _read(self, flags: int, cookie: int, offset: int, length: int) -> None:
        if (
            flags & ~self._read_flags
            or not 0 < length <= _MAX_REQUEST
            or (offset + length > self.size)
        ):
            self._read_refused(flags, cookie, offset, length)
            return
        mapping = self._host_map(offset, length)
        if length < self._fast_max and mapping is not None and mapping.length == length:
            try:
                self._queue_read(cookie, offset, length, mapping.fd, mapping.offset)
            except BlockError as err:
                self.replies.fail_block(cookie, err)
            return
        fragment = not flags & _DF
        if mapping is None and length >= self._path.worker_read_min:
            self._submit(self._read_worker, cookie, offset, length, fragment)
            return
        self.replies.flush()  # keep the batch ahead of this reply's own writes
        self.replies.read(cookie, offset, length, self._buffer, fragment=fragment, mapping=mapping)

    def _read_refused(self, flags: int, cookie: int, offset: int, length: int) -> None:
        """The reads that are not served: bad flags, too long, out of range, or empty."""
        if flags & ~self._read_flags:
            self._refused(cookie, flags, self._read_flags, "READ")
        elif length > _MAX_REQUEST:
            self.replies.fail(cookie, Err.EINVAL, f"read of {length} bytes exceeds {_MAX_REQUEST}")
        elif not self._out_of_range(cookie, offset, length, Err.EINVAL):
            self.replies.empty_read(cookie)

    def _read_worker(self, cookie: int, offset: int, length: int, fragment: bool) -> None:
        self.replies.read(cookie, offset, length, _fresh_buffer, fragment=fragment, mapping=None)

    # -- WRITE -------------------------------------------------------------------------------

    def _drain_or_disconnect(self, length: int) -> None:
        if length > self._path.max_drain:
            raise ProtocolError(f"write payload of {length} bytes is too large to drain")
        self._rx.drain(length)

    def _write(self, flags: int, cookie: int, offset: int, length: int) -> None:
        problem: tuple[Err, str] | None = None
        if length > _MAX_REQUEST:
            problem = Err.EINVAL, f"write of {length} bytes exceeds {_MAX_REQUEST}"
        elif flags & ~_FUA:
            problem = Err.EINVAL, f"invalid flags {flags:#x} for NBD_CMD_WRITE"
        elif not self.writable:
            problem = Err.EPERM, "the export is read-only"
        elif offset + length > self.size:
            problem = (
                Err.ENOSPC,
                (
                    f"write [{offset}, {offset + length}) is past the end of the export "
                    f"({self.size} bytes)"
                ),
            )
        if problem is not None:
            self._drain_or_disconnect(length)
            self.replies.fail(cookie, *problem)
            return
        view = self._bufview[:length] if length <= len(self._buf) else self._buffer(length)
        self._rx.payload_into(view)
        try:
            self.node.write(offset, view, fua=bool(flags & _FUA))
        except BlockError as err:
            self.replies.fail_block(cookie, err)
            return
        self.replies.queue_ok(cookie)

    # -- commands without payload ------------------------------------------------------------

    def _disc(self, flags: int, cookie: int, offset: int, length: int) -> bool:
        self._log.debug("client sent NBD_CMD_DISC")
        return True

    def _flush(self, flags: int, cookie: int, offset: int, length: int) -> None:
        if not self._refused(cookie, flags, _FUA, "FLUSH"):
            self._submit(self._done, cookie, self.node.flush)

    def _trim(self, flags: int, cookie: int, offset: int, length: int) -> None:
        if self._refused(cookie, flags, _FUA, "TRIM", write=True) or self._out_of_range(
            cookie, offset, length, Err.EINVAL
        ):
            return
        node = self.node
        fua = bool(flags & _FUA)

        def trim() -> None:
            if self.unmap and length:
                node.discard(offset, length)
            if fua:
                node.flush()

        if fua:
            self._submit(self._done, cookie, trim)
        else:
            self._done_inline(cookie, trim)

    def _cache(self, flags: int, cookie: int, offset: int, length: int) -> None:
        if self._refused(cookie, flags, _FUA, "CACHE") or self._out_of_range(
            cookie, offset, length, Err.EINVAL
        ):
            return
        self._submit(self._done, cookie, lambda: self._prefetch(offset, length))

    def _prefetch(self, offset: int, length: int) -> None:
        """CACHE: ask the kernel to read ahead where the node maps to a host file; read
        through the node otherwise (filling its caches), up to one maximum payload."""
        end = offset + min(length, _MAX_REQUEST)
        while offset < end:
            mapping = self.node.host_map(offset, end - offset)
            if mapping is None:
                self.node.readinto(offset, memoryview(bytearray(end - offset)))
                return
            try:
                os.posix_fadvise(mapping.fd, mapping.offset, mapping.length, os.POSIX_FADV_WILLNEED)
            except OSError as err:
                raise BlockError.from_os(err, "cache") from err
            offset += mapping.length

    def _write_zeroes(self, flags: int, cookie: int, offset: int, length: int) -> None:
        allowed = _FUA | _NO_HOLE | _FAST_ZERO
        if self._refused(cookie, flags, allowed, "WRITE_ZEROES", write=True) or (
            self._out_of_range(cookie, offset, length, Err.ENOSPC)
        ):
            return
        node = self.node
        may_unmap = self.unmap and not flags & _NO_HOLE
        fua = bool(flags & _FUA)
        fast = bool(flags & _FAST_ZERO)

        def zero() -> None:
            if length:
                node.write_zeroes(offset, length, may_unmap=may_unmap, fua=fua, fast=fast)

        if fua:
            self._submit(self._done, cookie, zero)
        else:
            self._done_inline(cookie, zero)

    def _block_status(self, flags: int, cookie: int, offset: int, length: int) -> None:
        if self._refused(cookie, flags, _FUA | _REQ_ONE, "BLOCK_STATUS"):
            return
        if not self.contexts:
            self.replies.fail(cookie, Err.EINVAL, "no metadata context was negotiated")
            return
        if length == 0:
            self.replies.fail(cookie, Err.EINVAL, "block status of an empty range")
            return
        if self._out_of_range(cookie, offset, length, Err.EINVAL):
            return
        chunks = []
        one = bool(flags & _REQ_ONE)
        last = len(self.contexts) - 1
        try:
            for index, (ident, ctx) in enumerate(self.contexts):
                extents = ctx.extents(self.node, offset, length, one=one)
                chunks.append(proto.chunk_block_status(cookie, ident, extents, done=index == last))
        except BlockError as err:
            self.replies.fail_block(cookie, err)
            return
        self.replies.send(*chunks)


def _fresh_buffer(length: int) -> memoryview:
    return memoryview(bytearray(length))
