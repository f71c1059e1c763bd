"""The NBD wire protocol (nbd-proto.md): constants, structures and pure encoders/decoders.

No I/O here: the server, the client and the tests build on these definitions. Handshake
reply codes (``Rep``) and transmission errnos (``Err``) are different enums, so one can never
be sent as the other. Fixed newstyle negotiation only; extended headers are not spoken.
"""

from __future__ import annotations

import errno
import struct
from enum import IntEnum, IntFlag
from typing import NamedTuple

from pyfleece.errors import ProtocolError

NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
OPTION_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

#: Largest export or meta-context name, and description (the spec's string limit).
MAX_STRING = 4096
#: Largest payload the spec lets a client rely on; our request cap.
MAX_REQUEST = 32 << 20


class HandshakeFlag(IntFlag):
    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class ClientFlag(IntFlag):
    C_FIXED_NEWSTYLE = 1 << 0
    C_NO_ZEROES = 1 << 1


class TransmitFlag(IntFlag):
    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8
    SEND_RESIZE = 1 << 9
    SEND_CACHE = 1 << 10
    SEND_FAST_ZERO = 1 << 11


class Opt(IntEnum):
    """NBD_OPT_* option types ("Option types")."""

    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    PEEK_EXPORT = 4
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10
    EXTENDED_HEADERS = 11


_ERR = 1 << 31


class Rep(IntEnum):
    """NBD_REP_* option reply types; ERR_* have bit 31 set."""

    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = _ERR + 1
    ERR_POLICY = _ERR + 2
    ERR_INVALID = _ERR + 3
    ERR_PLATFORM = _ERR + 4
    ERR_TLS_REQD = _ERR + 5
    ERR_UNKNOWN = _ERR + 6
    ERR_SHUTDOWN = _ERR + 7
    ERR_BLOCK_SIZE_REQD = _ERR + 8
    ERR_TOO_BIG = _ERR + 9
    ERR_EXT_HEADER_REQD = _ERR + 10

    @property
    def is_error(self) -> bool:
        return bool(self & _ERR)


class Info(IntEnum):
    """NBD_INFO_* types carried in NBD_REP_INFO replies."""

    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class Cmd(IntEnum):
    """NBD_CMD_* request types ("Request types")."""

    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7
    RESIZE = 8


class CmdFlag(IntFlag):
    FUA = 1 << 0
    NO_HOLE = 1 << 1
    DF = 1 << 2
    REQ_ONE = 1 << 3
    FAST_ZERO = 1 << 4
    PAYLOAD_LEN = 1 << 5


class ReplyType(IntEnum):
    """NBD_REPLY_TYPE_* structured reply chunk types."""

    NONE = 0
    OFFSET_DATA = 1
    OFFSET_HOLE = 2
    BLOCK_STATUS = 5
    BLOCK_STATUS_EXT = 6
    ERROR = (1 << 15) + 1
    ERROR_OFFSET = (1 << 15) + 2


class ReplyFlag(IntFlag):
    DONE = 1 << 0


class Err(IntEnum):
    """Transmission-phase errnos ("Error values"), as sent on the wire."""

    OK = 0
    EPERM = 1
    EIO = 5
    ENOMEM = 12
    EINVAL = 22
    ENOSPC = 28
    EOVERFLOW = 75
    ENOTSUP = 95
    ESHUTDOWN = 108


_ERRNO_TO_WIRE = {
    errno.EPERM: Err.EPERM,
    errno.EROFS: Err.EPERM,
    errno.EACCES: Err.EPERM,
    errno.EIO: Err.EIO,
    errno.ENOMEM: Err.ENOMEM,
    errno.EINVAL: Err.EINVAL,
    errno.ENOSPC: Err.ENOSPC,
    errno.EDQUOT: Err.ENOSPC,
    errno.EFBIG: Err.ENOSPC,
    errno.EOVERFLOW: Err.EOVERFLOW,
    errno.ENOTSUP: Err.ENOTSUP,
    errno.ESHUTDOWN: Err.ESHUTDOWN,
}


def wire_errno(err: int) -> Err:
    """The NBD errno to send for a host errno; anything unlisted is EIO."""
    return _ERRNO_TO_WIRE.get(err, Err.EIO)


class StateFlag(IntFlag):
    """base:allocation extent flags."""

    HOLE = 1 << 0
    ZERO = 1 << 1


BASE_ALLOCATION = "base:allocation"
ALLOCATION_DEPTH = "qemu:allocation-depth"
DIRTY_BITMAP_PREFIX = "qemu:dirty-bitmap:"

# -- structures (big endian) ----------------------------------------------------------------
# S: 64 b NBDMAGIC | 64 b IHAVEOPT | 16 b handshake flags
SERVER_GREETING = struct.Struct(">QQH")
# C: 32 b client flags
CLIENT_FLAGS = struct.Struct(">I")
# C: 64 b IHAVEOPT | 32 b option | 32 b length   (then length bytes of data)
OPTION_HEADER = struct.Struct(">QII")
# S: 64 b reply magic | 32 b option | 32 b reply type | 32 b length   (then data)
OPTION_REPLY = struct.Struct(">QIII")
# S (reply to EXPORT_NAME): 64 b size | 16 b transmission flags   (then 124 zero bytes,
#  unless NO_ZEROES was negotiated)
EXPORT_NAME_REPLY = struct.Struct(">QH")
# NBD_INFO_EXPORT: 16 b type | 64 b size | 16 b transmission flags
INFO_EXPORT = struct.Struct(">HQH")
# NBD_INFO_BLOCK_SIZE: 16 b type | 32 b minimum | 32 b preferred | 32 b maximum
INFO_BLOCK_SIZE = struct.Struct(">HIII")
# C: 32 b magic | 16 b flags | 16 b type | 64 b cookie | 64 b offset | 32 b length
REQUEST = struct.Struct(">IHHQQI")
# S: 32 b magic | 32 b error | 64 b cookie
SIMPLE_REPLY = struct.Struct(">IIQ")
# S: 32 b magic | 16 b flags | 16 b type | 64 b cookie | 32 b length
STRUCTURED_REPLY = struct.Struct(">IHHQI")
# OFFSET_DATA / OFFSET_HOLE payload head: 64 b offset [| 32 b hole size]
CHUNK_OFFSET = struct.Struct(">Q")
# A structured reply header and the OFFSET_DATA offset, packed in one call on the read path:
# 32 b magic | 16 b flags | 16 b type | 64 b cookie | 32 b length | 64 b offset
DATA_CHUNK_HEAD = struct.Struct(">IHHQIQ")
CHUNK_HOLE = struct.Struct(">QI")
# ERROR payload: 32 b error | 16 b message length   (then message)
CHUNK_ERROR = struct.Struct(">IH")
# ERROR_OFFSET payload ends with: 64 b offset   (after the message)
CHUNK_ERROR_OFFSET_TAIL = struct.Struct(">Q")
# BLOCK_STATUS payload: 32 b context id, then (32 b length | 32 b flags) per extent
CHUNK_STATUS_ID = struct.Struct(">I")
EXTENT = struct.Struct(">II")
# META_CONTEXT reply: 32 b context id   (then the name)
META_CONTEXT_ID = struct.Struct(">I")

ZERO_PAD_124 = bytes(124)


class Request(NamedTuple):
    flags: int
    type: int
    cookie: int
    offset: int
    length: int


def decode_request(data: bytes | bytearray | memoryview) -> Request:
    """Decodes a 28-byte request header.

    Raises:
        ProtocolError: wrong magic (the connection cannot be resynchronised).
    """
    magic, flags, kind, cookie, offset, length = REQUEST.unpack_from(data)
    if magic != REQUEST_MAGIC:
        raise ProtocolError(f"bad request magic {magic:#010x}")
    return Request(flags, kind, cookie, offset, length)


def encode_request(flags: int, kind: int, cookie: int, offset: int, length: int) -> bytes:
    return REQUEST.pack(REQUEST_MAGIC, flags, kind, cookie, offset, length)


def option_reply(option: int, reply: Rep, data: bytes = b"") -> bytes:
    return OPTION_REPLY.pack(OPTION_REPLY_MAGIC, option, reply, len(data)) + data


def option_error(option: int, reply: Rep, message: str = "") -> bytes:
    """An error reply to an option; the message is for humans (the spec allows one)."""
    return option_reply(option, reply, message.encode()[:MAX_STRING])


def simple_reply(cookie: int, error: int = 0) -> bytes:
    return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, cookie)


def chunk_header(flags: int, kind: int, cookie: int, length: int) -> bytes:
    return STRUCTURED_REPLY.pack(STRUCTURED_REPLY_MAGIC, flags, kind, cookie, length)


def chunk_none(cookie: int) -> bytes:
    return chunk_header(ReplyFlag.DONE, ReplyType.NONE, cookie, 0)


def chunk_hole(cookie: int, offset: int, length: int, *, done: bool) -> bytes:
    flags = ReplyFlag.DONE if done else 0
    return chunk_header(flags, ReplyType.OFFSET_HOLE, cookie, CHUNK_HOLE.size) + CHUNK_HOLE.pack(
        offset, length
    )


def chunk_data_header(cookie: int, offset: int, length: int, *, done: bool) -> bytes:
    """Header and offset of an OFFSET_DATA chunk; ``length`` bytes of data follow."""
    flags = ReplyFlag.DONE if done else 0
    head = chunk_header(flags, ReplyType.OFFSET_DATA, cookie, CHUNK_OFFSET.size + length)
    return head + CHUNK_OFFSET.pack(offset)


def chunk_error(cookie: int, error: int, message: str = "", *, done: bool = True) -> bytes:
    text = message.encode()[:MAX_STRING]
    flags = ReplyFlag.DONE if done else 0
    payload = CHUNK_ERROR.pack(error, len(text)) + text
    return chunk_header(flags, ReplyType.ERROR, cookie, len(payload)) + payload


def chunk_error_offset(
    cookie: int, error: int, offset: int, message: str = "", *, done: bool = True
) -> bytes:
    """An ERROR_OFFSET chunk: the read failed at ``offset`` (inside the request)."""
    text = message.encode()[:MAX_STRING]
    flags = ReplyFlag.DONE if done else 0
    payload = CHUNK_ERROR.pack(error, len(text)) + text + CHUNK_ERROR_OFFSET_TAIL.pack(offset)
    return chunk_header(flags, ReplyType.ERROR_OFFSET, cookie, len(payload)) + payload


def chunk_block_status(
    cookie: int, context_id: int, extents: list[tuple[int, int]], *, done: bool
) -> bytes:
    """A BLOCK_STATUS chunk: (length, flags) pairs for one metadata context."""
    flags = ReplyFlag.DONE if done else 0
    body = CHUNK_STATUS_ID.pack(context_id) + b"".join(EXTENT.pack(n, f) for n, f in extents)
    return chunk_header(flags, ReplyType.BLOCK_STATUS, cookie, len(body)) + body


def info_export(size: int, flags: int) -> bytes:
    return INFO_EXPORT.pack(Info.EXPORT, size, flags)


def info_block_size(minimum: int, preferred: int, maximum: int) -> bytes:
    return INFO_BLOCK_SIZE.pack(Info.BLOCK_SIZE, minimum, preferred, maximum)


def info_string(kind: Info, text: str) -> bytes:
    return struct.pack(">H", kind) + text.encode()[:MAX_STRING]


def rep_server(name: str, description: str = "") -> bytes:
    """NBD_REP_SERVER data: 32 b name length | name | description."""
    encoded = name.encode()
    return struct.pack(">I", len(encoded)) + encoded + description.encode()


def rep_meta_context(context_id: int, name: str) -> bytes:
    return META_CONTEXT_ID.pack(context_id) + name.encode()


class Reader:
    """Consumes an option's payload field by field.

    A malformed payload raises ``OptionInvalid``, which the server answers with
    NBD_REP_ERR_INVALID before going on with the handshake.
    """

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    def remaining(self) -> int:
        return len(self._data) - self._pos

    def take(self, n: int) -> bytes:
        if n < 0 or self._pos + n > len(self._data):
            raise OptionInvalid("option payload is shorter than its fields say")
        chunk = self._data[self._pos : self._pos + n]
        self._pos += n
        return chunk

    def u16(self) -> int:
        return int(struct.unpack(">H", self.take(2))[0])

    def u32(self) -> int:
        return int(struct.unpack(">I", self.take(4))[0])

    def string(self, length: int, what: str) -> str:
        if length > MAX_STRING:
            raise OptionInvalid(f"{what} is longer than {MAX_STRING} bytes")
        try:
            return self.take(length).decode("utf-8")
        except UnicodeDecodeError as err:
            raise OptionInvalid(f"{what} is not valid UTF-8") from err

    def end(self) -> None:
        if self.remaining():
            raise OptionInvalid("option payload has trailing bytes")


class OptionInvalid(Exception):
    """An option's payload is malformed: answer NBD_REP_ERR_INVALID and go on."""


class GoRequest(NamedTuple):
    name: str
    infos: list[int]


def decode_go(data: bytes) -> GoRequest:
    """NBD_OPT_INFO/GO data: 32 b name length | name | 16 b count | count x 16 b info."""
    reader = Reader(data)
    name = reader.string(reader.u32(), "export name")
    count = reader.u16()
    infos = [reader.u16() for _ in range(count)]
    reader.end()
    return GoRequest(name, infos)


class MetaRequest(NamedTuple):
    export: str
    queries: list[str]


def decode_meta(data: bytes, *, max_queries: int = 1024) -> MetaRequest:
    """NBD_OPT_LIST/SET_META_CONTEXT data: 32 b export name length | name |
    32 b query count | count x (32 b length | query)."""
    reader = Reader(data)
    export = reader.string(reader.u32(), "export name")
    count = reader.u32()
    if count > max_queries:
        raise OptionInvalid(f"too many meta context queries ({count})")
    queries = [reader.string(reader.u32(), "meta context query") for _ in range(count)]
    reader.end()
    return MetaRequest(export, queries)


def encode_go(name: str, infos: list[int]) -> bytes:
    encoded = name.encode()
    body = struct.pack(">I", len(encoded)) + encoded + struct.pack(">H", len(infos))
    return body + b"".join(struct.pack(">H", i) for i in infos)


def encode_meta(export: str, queries: list[str]) -> bytes:
    encoded = export.encode()
    body = struct.pack(">I", len(encoded)) + encoded + struct.pack(">I", len(queries))
    for query in queries:
        q = query.encode()
        body += struct.pack(">I", len(q)) + q
    return body
