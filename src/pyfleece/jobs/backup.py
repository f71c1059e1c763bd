"""The backup job (``blockdev-backup``): sync=none (fleecing), full and top.

Every backup is point-in-time: it attaches a ``CopyBeforeWrite`` when it starts, so guest
writes copy the units they change first. ``sync=none`` does nothing else: it waits for
``complete`` (the seed's ending: BLOCK_JOB_COMPLETED; QEMU 7.2 refuses that verb) or
``cancel`` (BLOCK_JOB_CANCELLED). ``full`` also copies every unit in the background, ``top``
only the units the source's top layer allocates (``block_status``), honouring ``speed`` and
the ``on-source-error`` / ``on-target-error`` policies. Progress: ``offset`` is the bytes
copied, ``len`` the size (less what ``top`` found unallocated).

The job holds hard references on its target and source with QEMU's reason
("block device is in use by block job: backup"), released before its final event. It also
claims permissions on them (``block/locking.py``) as QEMU's copy-before-write filter node
does, named as that node would be (an auto node name): on the source it takes nothing and
shares only reading (no other writer: QEMU refuses a running backup's source as another
backup's target), on the target it writes and shares all but resize. With file nodes below,
these become QEMU's lock bytes (measured on qsd 7.2: source 201/203, target 101/203).
"""

from __future__ import annotations

from typing import Any

from pyfleece.block import locking
from pyfleece.block.copy_before_write import (
    CopyBeforeWrite,
    CopyFailed,
    cluster_size_of,
    unit_size,
)
from pyfleece.block.locking import Claim, LockConflict, PermissionConflict
from pyfleece.block.node import Node, Ref
from pyfleece.block.registry import auto_node_name
from pyfleece.errors import CommandError
from pyfleece.events import EventBus
from pyfleece.jobs.job import ON_ERROR, Job
from pyfleece.jobs.states import JobStatus, JobVerb

SYNC_MODES = ("none", "full", "top")
#: Why a backup job holds its nodes, in QEMU's words ("Node 'x' is busy: <reason>").
BUSY_REASON = "block device is in use by block job: backup"
#: Background copy step (a multiple of the copy unit is used when the unit is larger).
CHUNK = 1 << 20
#: After a pass in which every copy failed with on-*-error=ignore, wait this long
#: (interruptibly) before the next pass, so a persistent error does not spin.
IGNORE_BACKOFF = 1.0


class BackupJob(Job):
    """One backup from ``source`` to ``target``; see the module docstring.

    Raises (from the constructor):
        CommandError: invalid sync mode, policy, speed, or nodes that cannot be paired.
    """

    job_type = "backup"

    def __init__(
        self,
        job_id: str,
        bus: EventBus,
        source: Node,
        target: Node,
        *,
        sync: str,
        device: str = "",
        speed: int = 0,
        on_source_error: str = "report",
        on_target_error: str = "report",
        auto_finalize: bool = True,
        auto_dismiss: bool = True,
        verb_timeout: float = 30.0,
        cluster_size: int | None = None,
    ) -> None:
        super().__init__(
            job_id,
            bus,
            auto_finalize=auto_finalize,
            auto_dismiss=auto_dismiss,
            speed=speed,
            verb_timeout=verb_timeout,
        )
        _check_choice("sync", sync, SYNC_MODES)
        _check_choice("on-source-error", on_source_error, ON_ERROR)
        _check_choice("on-target-error", on_target_error, ON_ERROR)
        if source is target:
            raise CommandError("Source and target cannot be the same")
        if target.read_only:
            raise CommandError(f"Block node is read-only: '{target.node_name}'")
        if source.size != target.size:
            raise CommandError("Source and target image have different sizes")
        self.source = source
        self.target = target
        self.sync = sync
        self.on_source_error = on_source_error
        self.on_target_error = on_target_error
        if cluster_size is None:
            cluster_size = cluster_size_of(target)
        self.cbw = CopyBeforeWrite(
            source,
            target,
            unit=unit_size(cluster_size),
            device=device,
            bus=bus,
            skip_unallocated=sync == "top",
        )
        self._refs: list[Ref] = []
        #: The claims' holder: QEMU's copy-before-write filter node, by its auto name.
        self.filter_holder = f"node '{auto_node_name()}'"
        if sync == "none":
            self.supports_complete = True
            self.extra_verbs = {JobVerb.COMPLETE: frozenset({JobStatus.RUNNING, JobStatus.PAUSED})}

    # -- lifecycle --------------------------------------------------------------------------

    def prepare(self) -> None:
        """Takes the references and the snapshot (before ``start``).

        The source's reference is taken after the guard's, so that deleting a fleeced
        source names the target's backing edge first, as QEMU does.
        """
        holder = f"block job '{self.id}'"
        self._refs = [self.target.add_ref(holder, BUSY_REASON, hard=True)]
        try:
            self._claim()
            self.cbw.attach()
            self._refs.append(self.source.add_ref(holder, BUSY_REASON, hard=True))
        except BaseException:
            self.cbw.detach()
            self._release_refs()
            raise

    def _claim(self) -> None:
        """The copy-before-write filter's permissions (see the module docstring).

        Raises:
            CommandError: "Could not create node: <conflict>", QEMU's text.
        """
        holder = self.filter_holder
        try:
            locking.claim(
                self.source,
                Claim(holder, "file", locking.NONE, locking.SHARED_READ, interposed=True),
            )
            shared = locking.ALL & ~locking.Perm.RESIZE
            locking.claim(self.target, Claim(holder, "target", locking.Perm.WRITE, shared))
        except (PermissionConflict, LockConflict) as err:
            raise CommandError(f"Could not create node: {err}") from err

    def run(self) -> None:
        if self.sync == "none":
            self.wait_for_request()
        else:
            self._copy_all()

    def clean(self) -> None:
        try:
            self.cbw.detach()
        finally:
            self._release_refs()

    def _release_refs(self) -> None:
        for ref in self._refs:
            ref.release()
        self._refs = []
        locking.release(self.source, self.filter_holder, "file")
        locking.release(self.target, self.filter_holder, "target")

    def progress(self) -> tuple[int, int]:
        return (self.cbw.bytes_copied, self.cbw.bytes_needed)

    def uses(self, node: Node) -> bool:
        """Whether this job holds ``node`` as its source or target."""
        return node is self.source or node is self.target

    # -- the background copy ----------------------------------------------------------------

    def _copy_all(self) -> None:
        step = max(CHUNK, self.cbw.unit)
        size = self.cbw.size
        offset = failures = successes = 0
        self.busy = True
        while True:
            self.pause_point()
            pos = self.cbw.next_uncopied(offset)
            if pos is None:  # end of a pass: retry what an ignored error left behind
                if self.cbw.next_uncopied(0) is None:
                    return
                if failures and not successes:
                    self.backoff(IGNORE_BACKOFF)
                offset = failures = successes = 0
                continue
            length = min(step - pos % step, size - pos)
            try:
                copied = self.cbw.copy(pos, length)
            except CopyFailed as err:
                action = self.handle_error(err, self._policy(err), err.operation)
                if action == "report":
                    raise
                failures += 1
                offset = pos if action == "stop" else pos + length
                continue
            successes += 1
            offset = pos + length
            self.throttle(copied)

    def _policy(self, err: CopyFailed) -> str:
        return self.on_source_error if err.operation == "read" else self.on_target_error

    def describe(self) -> dict[str, Any]:
        """What the job does, for logs and debugging."""
        return {
            "id": self.id,
            "sync": self.sync,
            "source": self.source.node_name,
            "target": self.target.node_name,
            "unit": self.cbw.unit,
            "guarded": self.cbw.guard is not None,
        }


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise CommandError(f"Parameter '{name}' does not accept value '{value}'")
