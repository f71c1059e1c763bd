"""Shared QAPI types: socket addresses, bitmaps, and small enums used across block commands.

Written from the facts of QEMU 7.2's schemas (``sockets.json``, ``common.json``,
``block-core.json``); members appear in schema order, because QEMU reports the first problem in
that order.
"""

from __future__ import annotations

from pyfleece.monitor.schema import (
    BOOL,
    STR,
    UINT16,
    Alternate,
    Enum,
    FlatUnion,
    struct,
)

ON_OFF_AUTO = Enum("OnOffAuto", ("auto", "on", "off"))

SOCKET_ADDRESS_TYPE = Enum("SocketAddressType", ("inet", "unix", "vsock", "fd"))

INET_SOCKET_ADDRESS = struct(
    "InetSocketAddress",
    {
        "*numeric": BOOL,
        "*to": UINT16,
        "*ipv4": BOOL,
        "*ipv6": BOOL,
        "*keep-alive": BOOL,
        "*mptcp": BOOL,
    },
    base=struct("InetSocketAddressBase", {"host": STR, "port": STR}),
)
UNIX_SOCKET_ADDRESS = struct("UnixSocketAddress", {"path": STR, "*abstract": BOOL, "*tight": BOOL})
VSOCK_SOCKET_ADDRESS = struct("VsockSocketAddress", {"cid": STR, "port": STR})
STRING = struct("String", {"str": STR})

#: The modern address: the variant's members sit beside ``type``.
SOCKET_ADDRESS = FlatUnion(
    "SocketAddress",
    base=struct("SocketAddressBase", {"type": SOCKET_ADDRESS_TYPE}),
    discriminator="type",
    variants={
        "inet": INET_SOCKET_ADDRESS,
        "unix": UNIX_SOCKET_ADDRESS,
        "vsock": VSOCK_SOCKET_ADDRESS,
        "fd": STRING,
    },
)

#: The legacy address (``nbd-server-start``): the variant is wrapped in ``data``.
SOCKET_ADDRESS_LEGACY = FlatUnion(
    "SocketAddressLegacy",
    base=struct("SocketAddressLegacyBase", {"type": SOCKET_ADDRESS_TYPE}),
    discriminator="type",
    variants={
        "inet": struct("InetSocketAddressWrapper", {"data": INET_SOCKET_ADDRESS}),
        "unix": struct("UnixSocketAddressWrapper", {"data": UNIX_SOCKET_ADDRESS}),
        "vsock": struct("VsockSocketAddressWrapper", {"data": VSOCK_SOCKET_ADDRESS}),
        "fd": struct("StringWrapper", {"data": STRING}),
    },
)

BLOCK_DIRTY_BITMAP = struct("BlockDirtyBitmap", {"node": STR, "name": STR})
BLOCK_DIRTY_BITMAP_OR_STR = Alternate("BlockDirtyBitmapOrStr", (STR, BLOCK_DIRTY_BITMAP))
