"""A job: QEMU's job lifecycle, verbs and events around work done in its own thread.

Implements the behaviour of QEMU's job core as measured on qemu-storage-daemon 7.2 (see
docs/jobs.md): ``JOB_STATUS_CHANGE`` for every status change; on success
waiting -> pending [-> BLOCK_JOB_PENDING, wait for finalize when auto-finalize is off] ->
BLOCK_JOB_COMPLETED -> concluded [-> null when auto-dismiss]; on cancel or failure
aborting -> BLOCK_JOB_CANCELLED (or BLOCK_JOB_COMPLETED with ``error``) -> concluded
[-> null]. The job's graph changes are undone (``clean``) before that final event, so a
client that sees it may delete the target at once.

Threads: the work (``run``) happens in the job's own thread, which calls ``pause_point``
between steps and ``throttle`` after each; verbs arrive from monitor threads. Everything is
guarded by one condition (``_cond``); verbs set a request, wake the job, and wait (bounded by
``verb_timeout``) until the job has acted, so that a verb's effect is visible when it returns,
as on QEMU. Nothing sleeps: waits are on ``_cond``, and rate limiting waits on it with a
timeout that any verb interrupts.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any, ClassVar

from pyfleece.errors import BlockError, CommandError
from pyfleece.events import EventBus
from pyfleece.jobs.states import JobStatus, JobVerb, can_transition, check_verb

log = logging.getLogger(__name__)

S = JobStatus

#: BlockdevOnError values, and what each does with an errno (QEMU's block_job_error_action).
ON_ERROR = ("report", "ignore", "enospc", "stop", "auto")


def error_action(policy: str, err: int) -> str:
    """The BlockErrorAction ("report", "ignore", "stop") a policy takes for an errno."""
    if policy == "enospc":
        return "stop" if err == errno.ENOSPC else "report"
    if policy in ("stop", "ignore"):
        return policy
    return "report"


class JobCancelled(Exception):
    """Raised inside ``run`` at a pause point once the job is cancelled (control flow)."""


class Job:
    """Base of every job; subclasses implement ``run`` and may override the hooks.

    Attributes:
        id: the job id.
        status: the current JobStatus.
        speed: the rate limit in bytes per second (0: none).
        error: why the job failed ("Operation canceled" when cancelled), once it has.
        iostatus: "ok", "failed" or "nospace" (query-block-jobs' io-status).
    """

    job_type: ClassVar[str] = ""

    def __init__(
        self,
        job_id: str,
        bus: EventBus,
        *,
        auto_finalize: bool = True,
        auto_dismiss: bool = True,
        speed: int = 0,
        verb_timeout: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if speed < 0:
            raise CommandError("Parameter 'speed' expects a non-negative value")
        self.id = job_id
        self.bus = bus
        self.auto_finalize = auto_finalize
        self.auto_dismiss = auto_dismiss
        self.speed = speed
        self.verb_timeout = verb_timeout
        self.clock = clock
        self.status = S.UNDEFINED
        self.error: str | None = None
        self.iostatus = "ok"
        self.busy = False
        #: Verbs a job type accepts beyond QEMU's table, and in which statuses.
        self.extra_verbs: dict[JobVerb, frozenset[JobStatus]] = {}
        self.supports_complete = False
        self.pause_count = 0
        self.user_paused = False
        self.cancelled = False
        self.force_cancel = False
        self.complete_requested = False
        self.finalize_requested = False
        self._failure: BlockError | None = None
        self._throttle_until = 0.0
        self._cond = threading.Condition(threading.RLock())
        self._thread: threading.Thread | None = None
        self.on_null: Callable[[Job], None] | None = None
        #: Called once the job's graph changes are undone (drive-backup drops its target).
        self.on_cleaned: Callable[[], None] | None = None

    # -- what subclasses provide ------------------------------------------------------------

    def run(self) -> None:
        """The work; returns on success, raises JobCancelled or BlockError otherwise."""
        raise NotImplementedError

    def progress(self) -> tuple[int, int]:
        """(current, total) progress: for block jobs, bytes done and bytes to do."""
        return (0, 0)

    def commit(self) -> None:
        """Finalises a successful job (before ``clean``)."""

    def abort(self) -> None:
        """Undoes a cancelled or failed job's work (before ``clean``)."""

    def clean(self) -> None:
        """Releases graph changes and references; runs before the final event."""

    # -- lifecycle --------------------------------------------------------------------------

    def create(self) -> None:
        """Emits created: the job exists but does not run yet (a transaction creates all
        its jobs before it starts any)."""
        with self._cond:
            self._transition(S.CREATED)

    def start(self) -> None:
        """Emits created (unless ``create`` did) and running, and starts the job's thread."""
        with self._cond:
            if self.status is S.UNDEFINED:
                self._transition(S.CREATED)
            self._transition(S.RUNNING)
            self._thread = threading.Thread(target=self._main, name=f"job-{self.id}", daemon=True)
            self._thread.start()

    def _main(self) -> None:
        failure: BlockError | None = None
        try:
            self.run()
        except JobCancelled:
            pass
        except BlockError as err:
            failure = err
        except Exception as err:  # a bug in a job must still conclude it, loudly
            log.exception("job %s failed", self.id)
            failure = BlockError(errno.EIO, f"internal error: {err}")
        self._finish(failure)

    def _finish(self, failure: BlockError | None) -> None:
        with self._cond:
            self.busy = False
            failure = failure or self._failure
            if failure is None and not self.cancelled:
                self._transition(S.WAITING)
                self._transition(S.PENDING)
                if not self.auto_finalize:
                    self.bus.emit("BLOCK_JOB_PENDING", {"type": self.job_type, "id": self.id})
                    self._cond.wait_for(
                        lambda: self.finalize_requested or self.cancelled or bool(self._failure)
                    )
                    failure = self._failure
            success = failure is None and not self.cancelled
            event = "BLOCK_JOB_COMPLETED"
            if not success:
                cancelled = self.cancelled or failure is None
                code = errno.ECANCELED if failure is None or cancelled else failure.errno
                self.error = os.strerror(code)
                event = "BLOCK_JOB_CANCELLED" if cancelled else event
                self._transition(S.ABORTING)
        # Outside the lock: undoing graph changes may wait for I/O in flight, and queries
        # must still answer meanwhile. No verb applies in aborting; in pending, finalize won.
        self._call(self.commit if success else self.abort)
        self._call(self.clean)
        if self.on_cleaned is not None:
            self._call(self.on_cleaned)
        with self._cond:
            data = self.event_data()
            if event == "BLOCK_JOB_COMPLETED" and not success:
                data["error"] = self.error
            self.bus.emit(event, data)
            self._transition(S.CONCLUDED)
            if self.auto_dismiss:
                self._dismiss()
            self._cond.notify_all()

    def abort_unstarted(self) -> None:
        """Ends a created job that never ran (its transaction failed): aborting, concluded,
        null, undoing its graph changes; no BLOCK_JOB_CANCELLED, and dismissed even with
        auto-dismiss off, as qsd 7.2 does."""
        with self._cond:
            self.cancelled = True
            self.error = os.strerror(errno.ECANCELED)
            self._transition(S.ABORTING)
        self._call(self.abort)
        self._call(self.clean)
        if self.on_cleaned is not None:
            self._call(self.on_cleaned)
        with self._cond:
            self._transition(S.CONCLUDED)
            self._dismiss()
            self._cond.notify_all()

    def _call(self, step: Callable[[], None]) -> None:
        try:
            step()
        except Exception:  # cleanup must go on; the job's outcome is already decided
            log.exception("job %s: %s failed", self.id, step.__name__)

    def _dismiss(self) -> None:
        self._transition(S.NULL)
        if self.on_null is not None:
            self.on_null(self)

    def _transition(self, new: JobStatus) -> None:
        old = self.status
        if not can_transition(old, new):
            raise RuntimeError(f"job {self.id}: illegal transition {old.value} -> {new.value}")
        self.status = new
        if new is not old:
            self.bus.emit("JOB_STATUS_CHANGE", {"id": self.id, "status": new.value})
        self._cond.notify_all()

    # -- what ``run`` calls -----------------------------------------------------------------

    def pause_point(self) -> None:
        """Pauses here while paused; raises JobCancelled (or the pending failure) when the
        job must stop. Call between units of work."""
        with self._cond:
            self._check_stop()
            if self.pause_count > 0 and not self._resume_wanted():
                resume_to, busy = self.status, self.busy
                self._transition(S.STANDBY if resume_to is S.READY else S.PAUSED)
                self.busy = False
                self._cond.wait_for(self._resume_wanted)
                self._transition(resume_to)
                self.busy = busy
            self._check_stop()

    def _resume_wanted(self) -> bool:
        return (
            self.pause_count == 0
            or self.cancelled
            or self.complete_requested
            or self._failure is not None
        )

    def _check_stop(self) -> None:
        if self.cancelled:
            raise JobCancelled()
        if self._failure is not None:
            raise self._failure

    def wait_for_request(self) -> None:
        """Idles until a verb needs the job: returns once complete is requested."""
        with self._cond:
            while True:
                self.pause_point()
                if self.complete_requested:
                    return
                self._cond.wait()

    def throttle(self, nbytes: int) -> None:
        """Accounts ``nbytes`` against the speed limit, waiting (interruptibly) if over it."""
        with self._cond:
            if self.speed <= 0 or nbytes <= 0:
                return
            now = self.clock()
            self._throttle_until = max(self._throttle_until, now) + nbytes / self.speed
            self._wait_until(lambda: self._throttle_until, limited=True)

    def backoff(self, seconds: float) -> None:
        """Waits ``seconds`` unless a verb (or a failure) needs the job first."""
        with self._cond:
            deadline = self.clock() + seconds
            self._wait_until(lambda: deadline, limited=False)

    def _wait_until(self, deadline: Callable[[], float], *, limited: bool) -> None:
        while not self._interrupted() and not (limited and self.speed <= 0):
            delay = deadline() - self.clock()
            if delay <= 0:
                break
            self.busy = False
            self._cond.wait(delay)
        self.busy = True

    def _interrupted(self) -> bool:
        return (
            self.cancelled
            or self.pause_count > 0
            or self.complete_requested
            or self._failure is not None
        )

    def fail(self, err: BlockError) -> None:
        """Makes the job fail with ``err`` at its next pause point (from any thread)."""
        with self._cond:
            if self._failure is None:
                self._failure = err
            self._cond.notify_all()

    def handle_error(self, err: BlockError, policy: str, operation: str) -> str:
        """Applies an on-*-error policy: emits BLOCK_JOB_ERROR and returns the action taken
        ("report", "ignore" or "stop"); "stop" pauses the job as a user pause would."""
        action = error_action(policy, err.errno)
        with self._cond:
            if action == "stop" and not self.user_paused:
                self.user_paused = True
                self.pause_count += 1
            if action == "stop":
                self.iostatus = "nospace" if err.errno == errno.ENOSPC else "failed"
            self.bus.emit(
                "BLOCK_JOB_ERROR", {"device": self.id, "operation": operation, "action": action}
            )
            self._cond.notify_all()
        return action

    # -- verbs ------------------------------------------------------------------------------

    def _check(self, verb: JobVerb) -> None:
        check_verb(self.id, self.status, verb, self.extra_verbs)

    def _wait(self, done: Callable[[], bool]) -> None:
        """Waits (bounded) until the job has acted on a verb; never from the job's thread."""
        if threading.current_thread() is self._thread:
            return
        self._cond.wait_for(done, self.verb_timeout)

    def _settled(self) -> bool:
        return self.status in (S.CONCLUDED, S.NULL) or (
            self.status is S.PENDING and not self.finalize_requested and not self.cancelled
        )

    def user_pause(self) -> None:
        """job-pause / block-job-pause."""
        with self._cond:
            self._check(JobVerb.PAUSE)
            if self.user_paused:
                raise CommandError("Job is already paused")
            self.user_paused = True
            self.pause_count += 1
            self._cond.notify_all()
            self._wait(lambda: self.status in (S.PAUSED, S.STANDBY) or self._settled())

    def user_resume(self) -> None:
        """job-resume / block-job-resume; also clears the io-status."""
        with self._cond:
            if not self.user_paused:
                raise CommandError("Can't resume a job that was not paused")
            self._check(JobVerb.RESUME)
            self._unpause()
            self.iostatus = "ok"
            self._wait(lambda: self.status not in (S.PAUSED, S.STANDBY) or self.pause_count > 0)

    def _unpause(self) -> None:
        if self.user_paused:
            self.user_paused = False
            self.pause_count -= 1
        self._cond.notify_all()

    def user_cancel(self, *, force: bool = True) -> None:
        """job-cancel / block-job-cancel: resumes a paused job and stops it."""
        with self._cond:
            self._check(JobVerb.CANCEL)
            self.cancelled = True
            self.force_cancel = self.force_cancel or force
            self._unpause()
            self._wait(self._settled)

    def user_complete(self) -> None:
        """job-complete / block-job-complete."""
        with self._cond:
            self._check(JobVerb.COMPLETE)
            if self.cancelled or not self.supports_complete:
                raise CommandError(f"The active block job '{self.id}' cannot be completed")
            self.complete_requested = True
            self._unpause()
            self._wait(self._settled)

    def user_finalize(self) -> None:
        """job-finalize / block-job-finalize."""
        with self._cond:
            self._check(JobVerb.FINALIZE)
            self.finalize_requested = True
            self._cond.notify_all()
            self._wait(lambda: self.status in (S.CONCLUDED, S.NULL))

    def user_dismiss(self) -> None:
        """job-dismiss / block-job-dismiss."""
        with self._cond:
            self._check(JobVerb.DISMISS)
            self._dismiss()

    def set_speed(self, speed: int) -> None:
        """block-job-set-speed: a new rate limit (0: none), effective at once."""
        with self._cond:
            self._check(JobVerb.SET_SPEED)
            if speed < 0:
                raise CommandError("Parameter 'speed' expects a non-negative value")
            self.speed = speed
            self._throttle_until = self.clock()
            self._cond.notify_all()

    def shutdown_cancel(self) -> None:
        """Cancels the job if it has not concluded (daemon shutdown); does not wait."""
        with self._cond:
            if self.status not in (S.CONCLUDED, S.NULL):
                self.cancelled = True
                self.force_cancel = True
                self._unpause()

    def shutdown_dismiss(self) -> None:
        """Dismisses a concluded job (daemon shutdown)."""
        with self._cond:
            if self.status is S.CONCLUDED:
                self._dismiss()

    def join(self, timeout: float | None = None) -> bool:
        """Waits until the job's thread has ended; True if it has."""
        thread = self._thread
        if thread is None:
            return True
        thread.join(timeout)
        return not thread.is_alive()

    # -- queries and event data -------------------------------------------------------------

    def event_data(self) -> dict[str, Any]:
        """The members BLOCK_JOB_COMPLETED / _CANCELLED carry (block-core.json)."""
        offset, length = self.progress()
        return {
            "type": self.job_type,
            "device": self.id,
            "len": length,
            "offset": offset,
            "speed": self.speed,
        }

    def info(self) -> dict[str, Any]:
        """JobInfo, as query-jobs returns it."""
        with self._cond:
            current, total = self.progress()
            info: dict[str, Any] = {
                "id": self.id,
                "type": self.job_type,
                "status": self.status.value,
                "current-progress": current,
                "total-progress": total,
            }
            if self.error is not None:
                info["error"] = self.error
            return info

    def block_info(self) -> dict[str, Any]:
        """BlockJobInfo, as query-block-jobs returns it."""
        with self._cond:
            offset, length = self.progress()
            info: dict[str, Any] = {
                "type": self.job_type,
                "device": self.id,
                "len": length,
                "offset": offset,
                "busy": self.busy,
                "paused": self.pause_count > 0,
                "speed": self.speed,
                "io-status": self.iostatus,
                "ready": self.status in (S.READY, S.STANDBY),
                "status": self.status.value,
                "auto-finalize": self.auto_finalize,
                "auto-dismiss": self.auto_dismiss,
            }
            if self.error is not None:
                info["error"] = self.error
            return info
