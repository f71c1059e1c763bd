"""QEMU's job state machine, as data: statuses, verbs, which transitions and verbs are legal.

Facts from QEMU's ``job.json`` (JobStatus, JobVerb) and from running qemu-storage-daemon 7.2
(see docs/jobs.md for the measured transcripts). The tables are QEMU 7.2's: a transition or
verb missing from them is refused, with QEMU's wording:
``Job 'j0' in state 'running' cannot accept command verb 'complete'``.

Invariant kept here: a job's status only ever changes along ``TRANSITIONS``; a verb only
reaches a job in a status ``VERBS`` allows for it (plus what a job type declares in
``Job.extra_verbs``, which only the sync=none backup uses, for the seed's
``block-job-complete``).
"""

from __future__ import annotations

from enum import Enum

from pyfleece.errors import CommandError


class JobStatus(Enum):
    """JobStatus (job.json)."""

    UNDEFINED = "undefined"
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    READY = "ready"
    STANDBY = "standby"
    WAITING = "waiting"
    PENDING = "pending"
    ABORTING = "aborting"
    CONCLUDED = "concluded"
    NULL = "null"


class JobVerb(Enum):
    """JobVerb (job.json), without 8.2's ``change``."""

    CANCEL = "cancel"
    PAUSE = "pause"
    RESUME = "resume"
    SET_SPEED = "set-speed"
    COMPLETE = "complete"
    FINALIZE = "finalize"
    DISMISS = "dismiss"


S = JobStatus

#: Which status may follow which (QEMU 7.2's transition table).
TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    S.UNDEFINED: frozenset({S.CREATED}),
    S.CREATED: frozenset({S.RUNNING, S.ABORTING, S.NULL}),
    S.RUNNING: frozenset({S.PAUSED, S.READY, S.WAITING, S.ABORTING}),
    S.PAUSED: frozenset({S.RUNNING}),
    S.READY: frozenset({S.STANDBY, S.WAITING, S.ABORTING}),
    S.STANDBY: frozenset({S.READY}),
    S.WAITING: frozenset({S.PENDING, S.ABORTING}),
    S.PENDING: frozenset({S.ABORTING, S.CONCLUDED}),
    S.ABORTING: frozenset({S.ABORTING, S.CONCLUDED}),
    S.CONCLUDED: frozenset({S.NULL}),
    S.NULL: frozenset(),
}

_ACTIVE = frozenset({S.CREATED, S.RUNNING, S.PAUSED, S.READY, S.STANDBY})

#: In which statuses each verb is accepted (QEMU 7.2's verb table).
VERBS: dict[JobVerb, frozenset[JobStatus]] = {
    JobVerb.CANCEL: _ACTIVE | {S.WAITING, S.PENDING},
    JobVerb.PAUSE: _ACTIVE,
    JobVerb.RESUME: _ACTIVE,
    JobVerb.SET_SPEED: _ACTIVE,
    JobVerb.COMPLETE: frozenset({S.READY, S.STANDBY}),
    JobVerb.FINALIZE: frozenset({S.PENDING}),
    JobVerb.DISMISS: frozenset({S.CONCLUDED}),
}


def can_transition(old: JobStatus, new: JobStatus) -> bool:
    return new in TRANSITIONS[old]


def check_verb(
    job_id: str,
    status: JobStatus,
    verb: JobVerb,
    extra: dict[JobVerb, frozenset[JobStatus]] | None = None,
) -> None:
    """Refuses a verb the job cannot take in its status, as QEMU words it.

    Raises:
        CommandError: GenericError "Job 'j0' in state 'running' cannot accept command verb
            'complete'".
    """
    allowed = VERBS[verb]
    if extra and verb in extra:
        allowed = allowed | extra[verb]
    if status not in allowed:
        raise CommandError(
            f"Job '{job_id}' in state '{status.value}' cannot accept command verb '{verb.value}'"
        )
