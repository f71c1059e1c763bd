"""The job table: jobs by id, the QMP job commands as methods, queries and shutdown.

Each ``job-*`` / ``block-job-*`` QMP command maps to one method here, with QEMU 7.2's lookup
errors: ``job-*`` says "Job not found" (GenericError), ``block-job-*`` says
"Block job 'x' not found" (DeviceNotActive). A job leaves the table when it reaches
``null`` (auto-dismiss, or ``job-dismiss``).

Lock order: a job's lock, then the manager's (a job reaching ``null`` removes itself); the
manager never calls into a job while holding its own lock.
"""

from __future__ import annotations

import re
import threading
from typing import Any

from pyfleece.block.node import Node
from pyfleece.errors import CommandError
from pyfleece.events import EventBus
from pyfleece.jobs.backup import BUSY_REASON, BackupJob
from pyfleece.jobs.job import Job
from pyfleece.jobs.states import JobStatus

#: QEMU's id_wellformed(): a letter, then letters, digits, '-', '.', '_'.
_ID = re.compile(r"[A-Za-z][A-Za-z0-9_.\-]*")
_FINISHED = (JobStatus.CONCLUDED, JobStatus.NULL)


class JobManager:
    """All jobs of one daemon; events go to ``bus``.

    Args:
        verb_timeout: how long a verb waits for the job to act before returning anyway.
    """

    def __init__(self, bus: EventBus, *, verb_timeout: float = 30.0) -> None:
        self.bus = bus
        self.verb_timeout = verb_timeout
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()

    # -- creating ---------------------------------------------------------------------------

    def start_backup(self, source: Node, target: Node, **kwargs: Any) -> BackupJob:
        """blockdev-backup / drive-backup: ``create_backup`` (same arguments), then runs the
        job at once (created and running emitted when this returns).

        Raises:
            CommandError: see ``create_backup``.
        """
        job = self.create_backup(source, target, **kwargs)
        job.start()
        return job

    def create_backup(
        self,
        source: Node,
        target: Node,
        *,
        sync: str,
        job_id: str | None = None,
        device: str = "",
        speed: int = 0,
        on_source_error: str = "report",
        on_target_error: str = "report",
        auto_finalize: bool = True,
        auto_dismiss: bool = True,
        cluster_size: int | None = None,
    ) -> BackupJob:
        """Creates a backup job without running it: the snapshot is taken and ``created``
        emitted when this returns. ``job.start()`` runs it; ``job.abort_unstarted()`` ends
        it (a transaction creates every job first, then starts them or aborts them all).

        Args:
            device: the source's device name: the default job id, and BLOCK_IO_ERROR's
                ``device``.
            cluster_size: the target's cluster size, when it has no ``cluster_size``
                attribute to read it from.

        Raises:
            CommandError: QEMU's messages for a busy target, a bad id, a duplicate id, a
                permission conflict (a running backup's source as this one's target), or
                arguments the backup job refuses.
        """
        ident = device if job_id is None else job_id
        for node in (source, target):
            self._check_not_target(node)
        job = BackupJob(
            ident,
            self.bus,
            source,
            target,
            sync=sync,
            device=device,
            speed=speed,
            on_source_error=on_source_error,
            on_target_error=on_target_error,
            auto_finalize=auto_finalize,
            auto_dismiss=auto_dismiss,
            verb_timeout=self.verb_timeout,
            cluster_size=cluster_size,
        )
        self._reserve(job)
        try:
            job.prepare()
        except BaseException:
            self._forget(job)
            raise
        job.on_null = self._forget
        job.create()
        return job

    def _check_not_target(self, node: Node) -> None:
        with self._lock:
            self._check_not_target_locked(node)

    def _check_not_target_locked(self, node: Node) -> None:
        # Reads job.status without the job's lock (an attribute read), keeping lock order.
        for job in self._jobs.values():
            if isinstance(job, BackupJob) and job.target is node and job.status not in _FINISHED:
                raise CommandError(f"Node '{node.node_name}' is busy: {BUSY_REASON}")

    def _reserve(self, job: BackupJob) -> None:
        """Checks the id and the nodes again and takes the id, atomically."""
        if not _ID.fullmatch(job.id):
            raise CommandError(f"Invalid job ID '{job.id}'")
        with self._lock:
            for node in (job.source, job.target):
                self._check_not_target_locked(node)
            if job.id in self._jobs:
                raise CommandError(f"Job ID '{job.id}' already in use")
            self._jobs[job.id] = job

    def _forget(self, job: Job) -> None:
        with self._lock:
            if self._jobs.get(job.id) is job:
                del self._jobs[job.id]

    # -- lookups and queries ----------------------------------------------------------------

    def jobs(self) -> list[Job]:
        with self._lock:
            return list(self._jobs.values())

    def find_job(self, job_id: str) -> Job:
        """The job for a ``job-*`` command.

        Raises:
            CommandError: "Job not found" (GenericError).
        """
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None:
            raise CommandError("Job not found")
        return job

    def find_block_job(self, device: str) -> Job:
        """The job for a ``block-job-*`` command.

        Raises:
            CommandError: "Block job 'x' not found" (DeviceNotActive).
        """
        with self._lock:
            job = self._jobs.get(device)
        if job is None:
            raise CommandError(f"Block job '{device}' not found", "DeviceNotActive")
        return job

    def query_jobs(self) -> list[dict[str, Any]]:
        """query-jobs' return value."""
        return [job.info() for job in self.jobs()]

    def query_block_jobs(self) -> list[dict[str, Any]]:
        """query-block-jobs' return value."""
        return [job.block_info() for job in self.jobs()]

    # -- block-job-* commands ---------------------------------------------------------------

    def block_job_cancel(self, device: str, *, force: bool = False) -> None:
        job = self.find_block_job(device)
        if job.user_paused and not force:
            raise CommandError(f"The block job for device '{device}' is currently paused")
        job.user_cancel(force=force)

    def block_job_pause(self, device: str) -> None:
        self.find_block_job(device).user_pause()

    def block_job_resume(self, device: str) -> None:
        self.find_block_job(device).user_resume()

    def block_job_complete(self, device: str) -> None:
        self.find_block_job(device).user_complete()

    def block_job_set_speed(self, device: str, speed: int) -> None:
        self.find_block_job(device).set_speed(speed)

    def block_job_finalize(self, job_id: str) -> None:
        self.find_block_job(job_id).user_finalize()

    def block_job_dismiss(self, job_id: str) -> None:
        self.find_block_job(job_id).user_dismiss()

    # -- job-* commands ---------------------------------------------------------------------

    def job_cancel(self, job_id: str) -> None:
        self.find_job(job_id).user_cancel(force=True)

    def job_pause(self, job_id: str) -> None:
        self.find_job(job_id).user_pause()

    def job_resume(self, job_id: str) -> None:
        self.find_job(job_id).user_resume()

    def job_complete(self, job_id: str) -> None:
        self.find_job(job_id).user_complete()

    def job_finalize(self, job_id: str) -> None:
        self.find_job(job_id).user_finalize()

    def job_dismiss(self, job_id: str) -> None:
        self.find_job(job_id).user_dismiss()

    # -- shutdown ---------------------------------------------------------------------------

    def shutdown(self, timeout: float = 30.0) -> None:
        """Cancels every job, waits for their threads, and dismisses what remains."""
        for job in self.jobs():
            job.shutdown_cancel()
        for job in self.jobs():
            job.join(timeout)
        for job in self.jobs():
            job.shutdown_dismiss()
