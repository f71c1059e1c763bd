"""``BlockdevOptions``: what ``blockdev-add`` (and every ``BlockdevRef``) accepts.

Drivers described: QEMU's ``file``, ``host_device``, ``raw``, ``qcow2``, ``null-co`` and
``nbd`` (members as in QEMU 7.2's block-core.json), plus our own ``memory`` (a sparse RAM disk)
and ``fault`` (a fault-injecting filter, see block/fault.py). Any other driver name gets QEMU's
"Parameter 'driver' does not accept value 'x'", as an unknown one does in QEMU.
"""

from __future__ import annotations

from pyfleece.monitor.qapi.common import ON_OFF_AUTO, SOCKET_ADDRESS
from pyfleece.monitor.schema import (
    BOOL,
    INT,
    NULL,
    SIZE,
    STR,
    UINT32,
    UINT64,
    Alternate,
    Array,
    Deferred,
    Enum,
    FlatUnion,
    QType,
    struct,
)

BLOCKDEV_DRIVER = Enum(
    "BlockdevDriver",
    ("fault", "file", "host_device", "memory", "nbd", "null-co", "qcow2", "raw"),
)
BLOCKDEV_DISCARD = Enum("BlockdevDiscardOptions", ("ignore", "unmap"))
BLOCKDEV_DETECT_ZEROES = Enum("BlockdevDetectZeroesOptions", ("off", "on", "unmap"))
BLOCKDEV_AIO = Enum("BlockdevAioOptions", ("threads", "native", "io_uring"))
BLOCKDEV_CACHE = struct("BlockdevCacheOptions", {"*direct": BOOL, "*no-flush": BOOL})


def _options() -> QType:
    return BLOCKDEV_OPTIONS


_DEFINITION = Deferred("BlockdevOptions", _options)

#: A child given inline (options) or by node name.
BLOCKDEV_REF = Alternate("BlockdevRef", (_DEFINITION, STR))
#: ... or explicitly none (``"backing": null``: no backing file).
BLOCKDEV_REF_OR_NULL = Alternate("BlockdevRefOrNull", (_DEFINITION, STR, NULL))

FILE = struct(
    "BlockdevOptionsFile",
    {
        "filename": STR,
        "*pr-manager": STR,
        "*locking": ON_OFF_AUTO,
        "*aio": BLOCKDEV_AIO,
        "*aio-max-batch": INT,
        "*drop-cache": BOOL,
        "*x-check-cache-dropped": BOOL,
    },
)
NULL_CO = struct("BlockdevOptionsNull", {"*size": INT, "*latency-ns": UINT64, "*read-zeroes": BOOL})
GENERIC_FORMAT = struct("BlockdevOptionsGenericFormat", {"file": BLOCKDEV_REF})
GENERIC_COW_FORMAT = struct(
    "BlockdevOptionsGenericCOWFormat", {"*backing": BLOCKDEV_REF_OR_NULL}, base=GENERIC_FORMAT
)
RAW = struct("BlockdevOptionsRaw", {"*offset": INT, "*size": INT}, base=GENERIC_FORMAT)

QCOW2_OVERLAP_CHECK_MODE = Enum("Qcow2OverlapCheckMode", ("none", "constant", "cached", "all"))
QCOW2_OVERLAP_CHECK_FLAGS = struct(
    "Qcow2OverlapCheckFlags",
    {
        "*template": QCOW2_OVERLAP_CHECK_MODE,
        "*main-header": BOOL,
        "*active-l1": BOOL,
        "*active-l2": BOOL,
        "*refcount-table": BOOL,
        "*refcount-block": BOOL,
        "*snapshot-table": BOOL,
        "*inactive-l1": BOOL,
        "*inactive-l2": BOOL,
        "*bitmap-directory": BOOL,
    },
)
QCOW2_OVERLAP_CHECKS = Alternate(
    "Qcow2OverlapChecks", (QCOW2_OVERLAP_CHECK_FLAGS, QCOW2_OVERLAP_CHECK_MODE)
)
QCOW2_ENCRYPTION = FlatUnion(
    "BlockdevQcow2Encryption",
    base=struct(
        "BlockdevQcow2EncryptionBase",
        {"format": Enum("BlockdevQcow2EncryptionFormat", ("aes", "luks"))},
    ),
    discriminator="format",
    variants={
        "aes": struct("QCryptoBlockOptionsQCow", {"*key-secret": STR}),
        "luks": struct("QCryptoBlockOptionsLUKS", {"*key-secret": STR}),
    },
)
QCOW2 = struct(
    "BlockdevOptionsQcow2",
    {
        "*lazy-refcounts": BOOL,
        "*pass-discard-request": BOOL,
        "*pass-discard-snapshot": BOOL,
        "*pass-discard-other": BOOL,
        "*overlap-check": QCOW2_OVERLAP_CHECKS,
        "*cache-size": INT,
        "*l2-cache-size": INT,
        "*l2-cache-entry-size": INT,
        "*refcount-cache-size": INT,
        "*cache-clean-interval": INT,
        "*encrypt": QCOW2_ENCRYPTION,
        "*data-file": BLOCKDEV_REF,
    },
    base=GENERIC_COW_FORMAT,
)
NBD = struct(
    "BlockdevOptionsNbd",
    {
        "server": SOCKET_ADDRESS,
        "*export": STR,
        "*tls-creds": STR,
        "*tls-hostname": STR,
        "*x-dirty-bitmap": STR,
        "*reconnect-delay": UINT32,
        "*open-timeout": UINT32,
    },
)

#: pyfleece's own drivers
MEMORY = struct("BlockdevOptionsMemory", {"*size": SIZE})
FAULT_RULE = struct(
    "FaultRule",
    {
        "op": Enum("FaultOp", ("read", "write", "write-zeroes", "discard", "flush")),
        "*errno": INT,
        "*nth": INT,
        "*once": BOOL,
        "*offset": SIZE,
        "*length": SIZE,
    },
)
FAULT = struct("BlockdevOptionsFault", {"image": BLOCKDEV_REF, "*rules": Array(FAULT_RULE)})

BLOCKDEV_OPTIONS_BASE = struct(
    "BlockdevOptionsBase",
    {
        "driver": BLOCKDEV_DRIVER,
        "*node-name": STR,
        "*discard": BLOCKDEV_DISCARD,
        "*cache": BLOCKDEV_CACHE,
        "*read-only": BOOL,
        "*auto-read-only": BOOL,
        "*force-share": BOOL,
        "*detect-zeroes": BLOCKDEV_DETECT_ZEROES,
    },
)

BLOCKDEV_OPTIONS = FlatUnion(
    "BlockdevOptions",
    base=BLOCKDEV_OPTIONS_BASE,
    discriminator="driver",
    variants={
        "fault": FAULT,
        "file": FILE,
        "host_device": FILE,
        "memory": MEMORY,
        "nbd": NBD,
        "null-co": NULL_CO,
        "qcow2": QCOW2,
        "raw": RAW,
    },
)
