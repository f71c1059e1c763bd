"""Backup and job commands: blockdev-backup, drive-backup, transaction, block-job-*, job-*.

The job library (``jobs/``) carries QEMU's state machine, verbs and error texts; this module
only resolves names to nodes and maps arguments. HMP: ``block_job_cancel [-f]``,
``block_job_complete``, ``info block-jobs``, ``info jobs``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pyfleece.daemon import backup_target
from pyfleece.errors import CommandError, PyfleeceError
from pyfleece.monitor.dispatch import Dispatcher

if TYPE_CHECKING:
    from pyfleece.block.node import Node
    from pyfleece.daemon.core import Daemon
    from pyfleece.jobs.backup import BackupJob

#: block-job-* commands taking ``device`` -> JobManager method.
_BLOCK_JOB_VERBS = {
    "block-job-pause": "block_job_pause",
    "block-job-resume": "block_job_resume",
    "block-job-complete": "block_job_complete",
}
#: block-job-* / job-* commands taking ``id`` -> JobManager method.
_ID_VERBS = {
    "block-job-finalize": "block_job_finalize",
    "block-job-dismiss": "block_job_dismiss",
    "job-cancel": "job_cancel",
    "job-pause": "job_pause",
    "job-resume": "job_resume",
    "job-complete": "job_complete",
    "job-finalize": "job_finalize",
    "job-dismiss": "job_dismiss",
}


def register(dispatcher: Dispatcher) -> None:
    qmp, hmp = dispatcher.qmp, dispatcher.hmp
    qmp.register("blockdev-backup", blockdev_backup)
    qmp.register("drive-backup", drive_backup)
    qmp.register("transaction", transaction)
    qmp.register("block-job-cancel", block_job_cancel)
    qmp.register("block-job-set-speed", block_job_set_speed)
    for name, method in _BLOCK_JOB_VERBS.items():
        qmp.register(name, _verb(method, "device"))
    for name, method in _ID_VERBS.items():
        qmp.register(name, _verb(method, "id"))
    qmp.register("query-block-jobs", lambda ctx, args: ctx.jobs.query_block_jobs())
    qmp.register("query-jobs", lambda ctx, args: ctx.jobs.query_jobs())
    hmp.register(
        "block_job_cancel", "force:-f,device:B", "[-f] device",
        "stop an active background block operation (use -f if the operation is "
        "currently paused)", hmp_block_job_cancel,
    )  # fmt: skip
    hmp.register(
        "block_job_complete", "device:B", "device",
        "stop an active background block operation", hmp_block_job_complete,
    )  # fmt: skip
    hmp.info.register("block-jobs", "", "", "show progress of ongoing block device operations",
                      hmp_info_block_jobs)  # fmt: skip
    hmp.info.register("jobs", "", "", "show progress of all jobs", hmp_info_jobs)


def _verb(method: str, key: str) -> Callable[[Daemon, dict[str, Any]], None]:
    def handler(ctx: Daemon, args: dict[str, Any]) -> None:
        getattr(ctx.jobs, method)(args[key])

    return handler


# -- starting backups -------------------------------------------------------------------------


def lookup(ctx: Daemon, name: str) -> Node:
    """A drive id or node name, as QEMU's bdrv_lookup_bs finds it."""
    node = ctx.drives.node_of(name)
    if node is None:
        raise CommandError(f"Cannot find device='{name}' nor node-name='{name}'")
    return node


def _unsupported(args: dict[str, Any]) -> None:
    """Refuses what pyfleece cannot do, with QEMU's texts where QEMU would refuse too:
    nodes here carry no dirty bitmaps, so any bitmap named is not found."""
    if args["sync"] in ("bitmap", "incremental") and "bitmap" not in args:
        raise CommandError(f"must provide a valid bitmap name for '{args['sync']}' sync mode")
    if "bitmap" in args:
        raise CommandError(f"Bitmap '{args['bitmap']}' could not be found")
    if "bitmap-mode" in args:
        raise CommandError("Cannot specify bitmap sync mode without a bitmap")
    if args.get("compress"):
        raise CommandError("Compressed backup is not supported")


def create_backup(ctx: Daemon, args: dict[str, Any], target: Node) -> BackupJob:
    """A backup job, created (snapshot taken, ``created`` emitted) but not running."""
    source = lookup(ctx, args["device"])
    drive = ctx.drives.find(args["device"])
    return ctx.jobs.create_backup(
        source,
        target,
        sync=args["sync"],
        job_id=args.get("job-id"),
        device=drive.id if drive is not None else "",
        speed=args.get("speed", 0),
        on_source_error=args.get("on-source-error", "report"),
        on_target_error=args.get("on-target-error", "report"),
        auto_finalize=args.get("auto-finalize", True),
        auto_dismiss=args.get("auto-dismiss", True),
    )


def blockdev_backup(ctx: Daemon, args: dict[str, Any]) -> None:
    _unsupported(args)
    create_backup(ctx, args, lookup(ctx, args["target"])).start()


def drive_backup(ctx: Daemon, args: dict[str, Any]) -> None:
    _unsupported(args)
    _create_drive_backup(ctx, args).start()


def _create_drive_backup(ctx: Daemon, args: dict[str, Any]) -> BackupJob:
    """drive-backup's job, created; its target file is dropped when the job ends."""
    source = lookup(ctx, args["device"])
    target = backup_target.open_target(ctx, source, args)
    try:
        job = create_backup(ctx, args, target)
    except BaseException:
        backup_target.discard(ctx, target)
        raise
    job.on_cleaned = lambda: backup_target.discard(ctx, target)
    return job


def transaction(ctx: Daemon, args: dict[str, Any]) -> None:
    """All actions or none, as QEMU: every job is created (its snapshot taken) before any
    starts; on a failure the jobs created so far end, newest first, without ever running
    (created, aborting, concluded, null: no BLOCK_JOB_CANCELLED)."""
    created: list[BackupJob] = []
    try:
        for action in args["actions"]:
            kind, data = action["type"], action.get("data", {})
            if kind == "abort":
                raise CommandError("Transaction aborted using Abort action")
            _unsupported(data)
            if kind == "blockdev-backup":
                created.append(create_backup(ctx, data, lookup(ctx, data["target"])))
            else:
                created.append(_create_drive_backup(ctx, data))
    except PyfleeceError:
        for job in reversed(created):
            job.abort_unstarted()
        raise
    for job in created:
        job.start()


def block_job_cancel(ctx: Daemon, args: dict[str, Any]) -> None:
    ctx.jobs.block_job_cancel(args["device"], force=args.get("force", False))


def block_job_set_speed(ctx: Daemon, args: dict[str, Any]) -> None:
    ctx.jobs.block_job_set_speed(args["device"], args["speed"])


# -- HMP --------------------------------------------------------------------------------------


def hmp_block_job_cancel(ctx: Daemon, args: dict[str, Any]) -> str:
    ctx.jobs.block_job_cancel(args["device"], force=bool(args.get("force")))
    return ""


def hmp_block_job_complete(ctx: Daemon, args: dict[str, Any]) -> str:
    ctx.jobs.block_job_complete(args["device"])
    return ""


def hmp_info_block_jobs(ctx: Daemon, args: dict[str, Any]) -> str:
    jobs = ctx.jobs.query_block_jobs()
    if not jobs:
        return "No active jobs\n"
    return "".join(
        f"Type {j['type']}, device {j['device']}: Completed {j['offset']} of {j['len']} "
        f"bytes, speed limit {j['speed']} bytes/s\n"
        for j in jobs
    )


def hmp_info_jobs(ctx: Daemon, args: dict[str, Any]) -> str:
    jobs = ctx.jobs.query_jobs()
    if not jobs:
        return "No jobs\n"
    return "".join(
        f"{j['type']} job {j['id']}: {j['status']}, "
        f"{j['current-progress']} of {j['total-progress']} bytes\n"
        for j in jobs
    )
