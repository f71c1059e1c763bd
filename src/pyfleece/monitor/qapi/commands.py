"""The argument schemas of every QMP command pyfleece knows, and the shapes they return.

Describing a command is not registering it: the dispatcher answers a described but unregistered
command exactly as QEMU answers an unknown one (``CommandNotFound``, "The command X has not
been found"), until the daemon registers a handler for it (see ``monitor/dispatch.py``).

Members follow QEMU 7.2 (the peer our differential tests run against), in schema order.

Return shapes, for the handlers the daemon writes (``?`` marks optional members):

- ``VersionInfo``: ``{"qemu": {"major", "minor", "micro"}, "package": str}``
- ``CommandInfo``: ``{"name": str}``
- ``BlockDeviceInfo`` (query-named-block-nodes, and ``inserted`` below): ``{"file", "node-name",
  "ro", "drv", "backing_file"?, "backing_file_depth", "encrypted", "detect_zeroes", "bps",
  "bps_rd", "bps_wr", "iops", "iops_rd", "iops_wr", "write_threshold", "cache": {"writeback",
  "direct", "no-flush"}, "image": ImageInfo}``; ``ImageInfo``: ``{"filename", "format",
  "virtual-size", "actual-size"?, "cluster-size"?, "dirty-flag"?, "backing-filename"?,
  "full-backing-filename"?, "backing-filename-format"?, "backing-image"?: ImageInfo,
  "format-specific"?}``
- ``BlockInfo`` (query-block): ``{"device", "qdev"?, "type": "unknown", "removable", "locked",
  "inserted"?: BlockDeviceInfo, "io-status"?}``
- ``BlockJobInfo`` (query-block-jobs): ``{"type", "device", "len", "offset", "busy", "paused",
  "speed", "io-status", "ready", "status", "auto-finalize", "auto-dismiss", "error"?}``
- ``JobInfo`` (query-jobs): ``{"id", "type", "status", "current-progress", "total-progress",
  "error"?}``
- ``BlockExportInfo`` (query-block-exports): ``{"id", "type", "node-name", "shutting-down"}``
- everything else returns ``{}``; human-monitor-command returns the output text (CRLF lines).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from pyfleece.monitor.qapi.blockdev import BLOCKDEV_OPTIONS
from pyfleece.monitor.qapi.common import (
    BLOCK_DIRTY_BITMAP_OR_STR,
    SOCKET_ADDRESS_LEGACY,
)
from pyfleece.monitor.schema import (
    BOOL,
    INT,
    INT64,
    STR,
    UINT32,
    Array,
    Enum,
    FlatUnion,
    ObjectType,
    QType,
    struct,
)


@dataclass(frozen=True)
class CommandSpec:
    """What a command accepts and returns.

    Attributes:
        name: the QMP command name.
        args: the arguments' type (a struct or flat union), or None for no arguments.
        boxed: QAPI's ``boxed``: the arguments are one named type passed whole (a union such
            as ``BlockdevOptions``). The handler receives the validated dict either way.
        returns: the shape of the return value (see the module docstring).
    """

    name: str
    args: ObjectType | None = None
    boxed: bool = False
    returns: str = "{}"


MIRROR_SYNC_MODE = Enum("MirrorSyncMode", ("top", "full", "none", "incremental", "bitmap"))
BITMAP_SYNC_MODE = Enum("BitmapSyncMode", ("on-success", "never", "always"))
BLOCKDEV_ON_ERROR = Enum("BlockdevOnError", ("report", "ignore", "enospc", "stop", "auto"))
NEW_IMAGE_MODE = Enum("NewImageMode", ("existing", "absolute-paths"))
BLOCK_EXPORT_REMOVE_MODE = Enum("BlockExportRemoveMode", ("safe", "hard"))

BACKUP_PERF = struct(
    "BackupPerf", {"*use-copy-range": BOOL, "*max-workers": INT, "*max-chunk": INT64}
)
BACKUP_COMMON = struct(
    "BackupCommon",
    {
        "*job-id": STR,
        "device": STR,
        "sync": MIRROR_SYNC_MODE,
        "*speed": INT,
        "*bitmap": STR,
        "*bitmap-mode": BITMAP_SYNC_MODE,
        "*compress": BOOL,
        "*on-source-error": BLOCKDEV_ON_ERROR,
        "*on-target-error": BLOCKDEV_ON_ERROR,
        "*auto-finalize": BOOL,
        "*auto-dismiss": BOOL,
        "*filter-node-name": STR,
        "*x-perf": BACKUP_PERF,
    },
)
BLOCKDEV_BACKUP = struct("BlockdevBackup", {"target": STR}, base=BACKUP_COMMON)
DRIVE_BACKUP = struct(
    "DriveBackup",
    {"target": STR, "*format": STR, "*mode": NEW_IMAGE_MODE},
    base=BACKUP_COMMON,
)

TRANSACTION_ACTION = FlatUnion(
    "TransactionAction",
    base=struct(
        "TransactionActionBase",
        {"type": Enum("TransactionActionKind", ("abort", "blockdev-backup", "drive-backup"))},
    ),
    discriminator="type",
    variants={
        "abort": struct("AbortWrapper", {"data": struct("Abort", {})}),
        "blockdev-backup": struct("BlockdevBackupWrapper", {"data": BLOCKDEV_BACKUP}),
        "drive-backup": struct("DriveBackupWrapper", {"data": DRIVE_BACKUP}),
    },
)
TRANSACTION_PROPERTIES = struct(
    "TransactionProperties",
    {"*completion-mode": Enum("ActionCompletionMode", ("individual", "grouped"))},
)

NBD_EXPORT_BASE = struct("BlockExportOptionsNbdBase", {"*name": STR, "*description": STR})
BLOCK_EXPORT_OPTIONS = FlatUnion(
    "BlockExportOptions",
    base=struct(
        "BlockExportOptionsBase",
        {
            "type": Enum("BlockExportType", ("nbd",)),
            "id": STR,
            "*fixed-iothread": BOOL,
            "*iothread": STR,
            "node-name": STR,
            "*writable": BOOL,
            "*writethrough": BOOL,
        },
    ),
    discriminator="type",
    variants={
        "nbd": struct(
            "BlockExportOptionsNbd",
            {"*bitmaps": Array(BLOCK_DIRTY_BITMAP_OR_STR), "*allocation-depth": BOOL},
            base=NBD_EXPORT_BASE,
        )
    },
)


def _args(name: str, spec: Mapping[str, QType]) -> ObjectType:
    return struct(f"q_obj_{name}-arg", spec)


_DEVICE: dict[str, QType] = {"device": STR}
_ID: dict[str, QType] = {"id": STR}


def _specs() -> list[CommandSpec]:
    cap = Enum("QMPCapability", ("oob",))
    return [
        # -- the monitor itself ------------------------------------------------------------
        CommandSpec("qmp_capabilities", _args("qmp_capabilities", {"*enable": Array(cap)})),
        CommandSpec("query-version", returns="VersionInfo"),
        CommandSpec("query-commands", returns="[CommandInfo]"),
        CommandSpec("quit"),
        CommandSpec(
            "human-monitor-command",
            _args("human-monitor-command", {"command-line": STR, "*cpu-index": INT}),
            returns="str",
        ),
        # -- block nodes -------------------------------------------------------------------
        CommandSpec("blockdev-add", BLOCKDEV_OPTIONS, boxed=True),
        CommandSpec("blockdev-del", _args("blockdev-del", {"node-name": STR})),
        CommandSpec(
            "query-named-block-nodes",
            _args("query-named-block-nodes", {"*flat": BOOL}),
            returns="[BlockDeviceInfo]",
        ),
        CommandSpec("query-block", returns="[BlockInfo]"),
        # -- backup --------------------------------------------------------------------------
        CommandSpec("blockdev-backup", BLOCKDEV_BACKUP, boxed=True),
        CommandSpec("drive-backup", DRIVE_BACKUP, boxed=True),
        CommandSpec(
            "transaction",
            _args(
                "transaction",
                {"actions": Array(TRANSACTION_ACTION), "*properties": TRANSACTION_PROPERTIES},
            ),
        ),
        # -- block jobs (by device) and jobs (by id) ------------------------------------------
        CommandSpec(
            "block-job-set-speed", _args("block-job-set-speed", {"device": STR, "speed": INT})
        ),
        CommandSpec("block-job-cancel", _args("block-job-cancel", {"device": STR, "*force": BOOL})),
        *(
            CommandSpec(f"block-job-{verb}", _args(f"block-job-{verb}", _DEVICE))
            for verb in ("pause", "resume", "complete")
        ),
        *(
            CommandSpec(f"block-job-{verb}", _args(f"block-job-{verb}", _ID))
            for verb in ("dismiss", "finalize")
        ),
        CommandSpec("query-block-jobs", returns="[BlockJobInfo]"),
        *(
            CommandSpec(f"job-{verb}", _args(f"job-{verb}", _ID))
            for verb in ("cancel", "pause", "resume", "complete", "dismiss", "finalize")
        ),
        CommandSpec("query-jobs", returns="[JobInfo]"),
        # -- NBD server and exports ----------------------------------------------------------
        CommandSpec(
            "nbd-server-start",
            _args(
                "nbd-server-start",
                {
                    "addr": SOCKET_ADDRESS_LEGACY,
                    "*tls-creds": STR,
                    "*tls-authz": STR,
                    "*max-connections": UINT32,
                },
            ),
        ),
        CommandSpec("nbd-server-stop"),
        CommandSpec(
            "nbd-server-add",
            struct(
                "NbdServerAddOptions",
                {"device": STR, "*writable": BOOL, "*bitmap": STR},
                base=NBD_EXPORT_BASE,
            ),
            boxed=True,
        ),
        CommandSpec(
            "nbd-server-remove",
            _args("nbd-server-remove", {"name": STR, "*mode": BLOCK_EXPORT_REMOVE_MODE}),
        ),
        CommandSpec("block-export-add", BLOCK_EXPORT_OPTIONS, boxed=True),
        CommandSpec(
            "block-export-del",
            _args("block-export-del", {"id": STR, "*mode": BLOCK_EXPORT_REMOVE_MODE}),
        ),
        CommandSpec("query-block-exports", returns="[BlockExportInfo]"),
    ]


#: Every described command, by name.
DESCRIBED: dict[str, CommandSpec] = {spec.name: spec for spec in _specs()}
