"""How replies, and read payloads, reach an NBD client (nbd-proto.md, "Simple reply
message", "Structured reply chunk message", NBD_CMD_READ's rules for chunks).

``Replies`` writes every reply of one connection. Two kinds of callers:

- the connection's reader thread, for requests served inline. Its small replies are
  *batched*: queued (with read payloads in a reused arena) and written by one ``sendmsg``
  when the reader is about to block for more requests, or the batch is full. With a deep
  pipeline this turns N replies into one system call; with a single request in flight the
  reply still leaves at once, because the reader blocks right after;
- the session's workers, whose replies go out directly.

Either way each reply (each chunk of a structured reply) is written whole under the
transport's ``wlock``; replies of different requests may interleave in any order, as the
spec allows.

Read payloads copy nothing they need not: a host-mapped node is read with ``preadv`` into
the arena (small reads) or sent with ``os.sendfile`` (from ``DataPath.sendfile_min``);
other nodes are read with ``Node.readinto`` into a buffer. Structured reads from
``DataPath.sparse_min`` look for zero ranges and send them as hole chunks (never with DF).
A chunk followed by a sendfile payload is never marked final, since the disk may fail while
it is sent: the chunk is then padded, an ERROR_OFFSET chunk follows, and with simple replies
the connection is closed, as the spec requires.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass

from pyfleece.block.node import Extent, HostMapping, Node
from pyfleece.errors import BlockError
from pyfleece.nbd import proto
from pyfleece.nbd.proto import Err
from pyfleece.nbd.transport import ConnectionClosed, PlainTransport

# Plain ints on the hot path: IntEnum arithmetic costs more than the syscalls around it.
_SIMPLE_MAGIC = proto.SIMPLE_REPLY_MAGIC
_STRUCT_MAGIC = proto.STRUCTURED_REPLY_MAGIC
_SIMPLE = proto.SIMPLE_REPLY
_DATA_HEAD = proto.DATA_CHUNK_HEAD
_OFFSET_DATA = int(proto.ReplyType.OFFSET_DATA)
_DONE = int(proto.ReplyFlag.DONE)
_ZEROS = memoryview(bytes(1 << 20))

Alloc = Callable[[int], memoryview]
Buffer = bytes | bytearray | memoryview


@dataclass(frozen=True)
class DataPath:
    """Tunables of the transmission phase (defaults chosen by measurement, docs/nbd.md)."""

    #: Reads this large are sent with os.sendfile when the node maps to a host file.
    sendfile_min: int = 64 << 10
    #: Structured reads this large look for holes first and send them as hole chunks.
    sparse_min: int = 64 << 10
    #: Reads this large of nodes without a host mapping go to a worker.
    worker_read_min: int = 1 << 20
    #: Write payloads over 32 MiB are drained and refused up to here; beyond, disconnect.
    max_drain: int = 64 << 20
    #: The per-connection payload buffer is kept between requests up to this size.
    keep_buffer: int = 4 << 20
    #: Most replies one batch holds, and the size of the arena for their payloads.
    batch_replies: int = 32
    arena: int = 256 << 10


class Replies:
    """Every reply of one connection; see the module docstring for who calls what.
    Create it on the reader thread: that thread alone batches."""

    def __init__(
        self,
        transport: PlainTransport,
        node: Node,
        *,
        structured: bool,
        path: DataPath,
        log: logging.LoggerAdapter[logging.Logger],
    ) -> None:
        self.t = transport
        self.node = node
        self.structured = structured
        self._log = log
        self._sendfile_min = path.sendfile_min if transport.zero_copy else 1 << 62
        self._sparse_min = path.sparse_min if structured else 1 << 62
        self._batch: list[Buffer] = []
        self._batch_max = 2 * path.batch_replies
        self._arena = memoryview(bytearray(path.arena))
        self._arena_pos = 0
        # Reads inside [start, end) were found to be data: no hole search needed there.
        self._data_start = 0
        self._data_end = 0
        self._reader = threading.get_ident()  # the thread that may batch

    # -- batching (reader thread only) -------------------------------------------------------

    def flush(self) -> None:
        """Writes the batched replies; the reader calls it before it may block."""
        batch = self._batch
        if batch:
            self._batch = []
            self._arena_pos = 0
            t = self.t
            with t.wlock:
                t.sendmsg_all(batch)

    def _carve(self, length: int) -> memoryview:
        if length > len(self._arena):
            return memoryview(bytearray(length))
        pos = self._arena_pos
        if pos + length > len(self._arena):
            self.flush()
            pos = 0
        self._arena_pos = pos + length
        return self._arena[pos : pos + length]

    def queue_ok(self, cookie: int) -> None:
        batch = self._batch
        batch.append(_SIMPLE.pack(_SIMPLE_MAGIC, 0, cookie))
        if len(batch) >= self._batch_max:
            self.flush()

    def queue_small_read(self, cookie: int, offset: int, length: int, fd: int, at: int) -> None:
        """The fast path: a small read of a host-mapped node, one final chunk, batched.

        Raises:
            BlockError: the read failed (nothing was queued).
        """
        view = self._carve(length)
        try:
            got = os.preadv(fd, [view], at)
            if got < length:
                _pread_rest(fd, view, at, got)
        except OSError as err:
            raise BlockError.from_os(err, "read") from err
        if self.structured:
            head = _DATA_HEAD.pack(_STRUCT_MAGIC, _DONE, _OFFSET_DATA, cookie, length + 8, offset)
        else:
            head = _SIMPLE.pack(_SIMPLE_MAGIC, 0, cookie)
        batch = self._batch
        batch.append(head)
        batch.append(view)
        if len(batch) >= self._batch_max:
            self.flush()

    # -- direct replies (any thread) ---------------------------------------------------------

    def send(self, *buffers: Buffer) -> None:
        t = self.t
        with t.wlock:
            t.sendmsg_all(buffers)

    def ok(self, cookie: int) -> None:
        self.send(_SIMPLE.pack(_SIMPLE_MAGIC, 0, cookie))

    def fail(self, cookie: int, err: Err, message: str) -> None:
        self._log.debug("request %#x failed: %s (%s)", cookie, message, err.name)
        if self.structured:
            self.send(proto.chunk_error(cookie, err, message))
        else:
            self.send(proto.simple_reply(cookie, err))

    def fail_block(self, cookie: int, err: BlockError) -> None:
        """A node error, mapped to its wire errno (the one place that does it)."""
        self.fail(cookie, proto.wire_errno(err.errno), str(err))

    def empty_read(self, cookie: int) -> None:
        if self.structured:
            self.send(proto.chunk_none(cookie))
        else:
            self.ok(cookie)

    # -- reads -------------------------------------------------------------------------------

    def read(
        self,
        cookie: int,
        offset: int,
        length: int,
        alloc: Alloc,
        *,
        fragment: bool,
        mapping: HostMapping | None,
    ) -> None:
        """Replies to a read of any size; ``fragment`` allows hole chunks (structured, no
        DF). ``mapping`` is the node's host mapping of the range, if the caller has it.
        Errors become error replies."""
        try:
            if (
                fragment
                and length >= self._sparse_min
                and not self._data_start <= offset < offset + length <= self._data_end
            ):
                self._read_sparse(cookie, offset, length, alloc, mapping)
            else:
                self._send_data(cookie, offset, length, alloc, mapping, final=True)
        except BlockError as err:
            self.fail_block(cookie, err)

    def _read_sparse(
        self, cookie: int, offset: int, length: int, alloc: Alloc, mapping: HostMapping | None
    ) -> None:
        end = offset + length
        pos = offset
        while pos < end:
            ext = self._status(pos, end - pos)
            n = end - pos if ext is None else min(ext.length, end - pos)
            if ext is not None and ext.zero:
                self.send(proto.chunk_hole(cookie, pos, n, done=False))
            elif pos == offset and n == length:
                self._send_data(cookie, pos, n, alloc, mapping, final=True)
                return
            else:
                self._send_data(cookie, pos, n, alloc, None, final=False)
            pos += n
        self.send(proto.chunk_none(cookie))

    def _status(self, offset: int, length: int) -> Extent | None:
        """Block status for a sparse read; None when unknown (then the data is read).

        Asks about up to 64 MiB ahead, and remembers a data extent: data never reads
        wrongly as data, so later reads inside it skip the search (a range that became a
        hole since is then sent as explicit zeros, which is still its content).
        """
        ahead = max(length, min(self.node.size - offset, 64 << 20))
        try:
            ext = self.node.block_status(offset, ahead)
        except BlockError:
            return None
        if ext.length <= 0:
            return None
        if ext.data and not ext.zero:
            self._data_start, self._data_end = offset, offset + ext.length
        return ext

    def _send_data(
        self,
        cookie: int,
        offset: int,
        length: int,
        alloc: Alloc,
        mapping: HostMapping | None,
        *,
        final: bool,
    ) -> None:
        """One content chunk (or a simple reply and its payload) for the range.

        Raises:
            BlockError: reading failed before anything of this chunk was sent.
        """
        if mapping is None or mapping.length != length:
            mapping = self.node.host_map(offset, length)
        if mapping is not None and mapping.length == length:
            if length >= self._sendfile_min:
                self._sendfile(cookie, offset, length, mapping.fd, mapping.offset, final)
                return
            view = alloc(length)
            try:
                got = os.preadv(mapping.fd, [view], mapping.offset)
                if got < length:
                    _pread_rest(mapping.fd, view, mapping.offset, got)
            except OSError as err:
                raise BlockError.from_os(err, "read") from err
        else:
            view = alloc(length)
            self.node.readinto(offset, view)
        if self.structured:
            flags = _DONE if final else 0
            head = _DATA_HEAD.pack(_STRUCT_MAGIC, flags, _OFFSET_DATA, cookie, length + 8, offset)
        else:
            head = _SIMPLE.pack(_SIMPLE_MAGIC, 0, cookie)
        self.send(head, view)

    def _sendfile(
        self, cookie: int, offset: int, length: int, fd: int, at: int, final: bool
    ) -> None:
        t = self.t
        if self.structured:
            head = _DATA_HEAD.pack(_STRUCT_MAGIC, 0, _OFFSET_DATA, cookie, length + 8, offset)
        else:
            head = _SIMPLE.pack(_SIMPLE_MAGIC, 0, cookie)
        with t.wlock:
            t.sendmsg_all([head], more=True)
            sent, error = t.sendfile(fd, at, length)
            if error is not None and not self.structured:
                raise ConnectionClosed(f"read failed after its simple reply was sent: {error}")
            if sent < length:  # the file ended (zeros follow) or failed: complete the chunk
                _pad(t, length - sent)
        if error is None:
            if final and self.structured:
                if threading.get_ident() == self._reader:  # NONE may wait in the batch
                    self._batch.append(proto.chunk_none(cookie))
                else:
                    self.send(proto.chunk_none(cookie))
            return
        err = BlockError.from_os(error, "read")
        wire = proto.wire_errno(err.errno)
        self.send(proto.chunk_error_offset(cookie, wire, offset + sent, str(err)))


def _pread_rest(fd: int, view: memoryview, at: int, got: int) -> None:
    while got < len(view):
        n = os.preadv(fd, [view[got:]], at + got)
        if n == 0:  # the file ends here: what lies beyond reads as zeros
            view[got:] = bytes(len(view) - got)
            return
        got += n


def _pad(t: PlainTransport, n: int) -> None:
    while n > 0:
        k = min(n, len(_ZEROS))
        t.sendmsg_all([_ZEROS[:k]])
        n -= k
