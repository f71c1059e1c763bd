"""The job state machine's tables against QEMU 7.2's, cell by cell.

The matrices below are QEMU's transition and verb tables written out as QEMU lays them out
(rows: from-status or verb; columns: U C R P Y S W D X E N), independently of the dicts in
``pyfleece.jobs.states``; the verb refusals' wording was measured on qemu-storage-daemon.
"""

from __future__ import annotations

import pytest

from pyfleece.errors import CommandError
from pyfleece.jobs.states import TRANSITIONS, VERBS, JobStatus, JobVerb, check_verb

COLUMNS = ["U", "C", "R", "P", "Y", "S", "W", "D", "X", "E", "N"]
LETTER = {
    "U": JobStatus.UNDEFINED, "C": JobStatus.CREATED, "R": JobStatus.RUNNING,
    "P": JobStatus.PAUSED, "Y": JobStatus.READY, "S": JobStatus.STANDBY,
    "W": JobStatus.WAITING, "D": JobStatus.PENDING, "X": JobStatus.ABORTING,
    "E": JobStatus.CONCLUDED, "N": JobStatus.NULL,
}  # fmt: skip

QEMU_TRANSITIONS = """
U 0 1 0 0 0 0 0 0 0 0 0
C 0 0 1 0 0 0 0 0 1 0 1
R 0 0 0 1 1 0 1 0 1 0 0
P 0 0 1 0 0 0 0 0 0 0 0
Y 0 0 0 0 0 1 1 0 1 0 0
S 0 0 0 0 1 0 0 0 0 0 0
W 0 0 0 0 0 0 0 1 1 0 0
D 0 0 0 0 0 0 0 0 1 1 0
X 0 0 0 0 0 0 0 0 1 1 0
E 0 0 0 0 0 0 0 0 0 0 1
N 0 0 0 0 0 0 0 0 0 0 0
"""

QEMU_VERBS = """
cancel    0 1 1 1 1 1 1 1 0 0 0
pause     0 1 1 1 1 1 0 0 0 0 0
resume    0 1 1 1 1 1 0 0 0 0 0
set-speed 0 1 1 1 1 1 0 0 0 0 0
complete  0 0 0 0 1 1 0 0 0 0 0
finalize  0 0 0 0 0 0 0 1 0 0 0
dismiss   0 0 0 0 0 0 0 0 0 1 0
"""


def _matrix(text: str) -> dict[str, dict[JobStatus, bool]]:
    rows = {}
    for line in text.strip().splitlines():
        name, *cells = line.split()
        rows[name] = {LETTER[c]: cell == "1" for c, cell in zip(COLUMNS, cells, strict=True)}
    return rows


TRANSITION_CASES = [
    (LETTER[row], new, allowed)
    for row, cells in _matrix(QEMU_TRANSITIONS).items()
    for new, allowed in cells.items()
]
VERB_CASES = [
    (JobVerb(verb), status, allowed)
    for verb, cells in _matrix(QEMU_VERBS).items()
    for status, allowed in cells.items()
]


@pytest.mark.parametrize(
    ("old", "new", "allowed"),
    TRANSITION_CASES,
    ids=[f"{o.value}->{n.value}" for o, n, _ in TRANSITION_CASES],
)
def test_transition_table_matches_qemu(old: JobStatus, new: JobStatus, allowed: bool) -> None:
    assert (new in TRANSITIONS[old]) is allowed


@pytest.mark.parametrize(
    ("verb", "status", "allowed"),
    VERB_CASES,
    ids=[f"{v.value}@{s.value}" for v, s, _ in VERB_CASES],
)
def test_verb_table_matches_qemu(verb: JobVerb, status: JobStatus, allowed: bool) -> None:
    assert (status in VERBS[verb]) is allowed
    if allowed:
        check_verb("j0", status, verb)
        return
    with pytest.raises(CommandError) as err:
        check_verb("j0", status, verb)
    assert str(err.value) == (
        f"Job 'j0' in state '{status.value}' cannot accept command verb '{verb.value}'"
    )
    assert err.value.error_class == "GenericError"


def test_every_status_and_verb_is_covered() -> None:
    assert set(TRANSITIONS) == set(JobStatus)
    assert set(VERBS) == set(JobVerb)
    assert {s.value for s in JobStatus} == {
        "undefined", "created", "running", "paused", "ready", "standby", "waiting",
        "pending", "aborting", "concluded", "null",
    }  # fmt: skip


def test_extra_verbs_widen_only_what_they_name() -> None:
    extra = {JobVerb.COMPLETE: frozenset({JobStatus.RUNNING})}
    check_verb("j0", JobStatus.RUNNING, JobVerb.COMPLETE, extra)
    with pytest.raises(CommandError, match="in state 'paused' cannot accept command verb"):
        check_verb("j0", JobStatus.PAUSED, JobVerb.COMPLETE, extra)
    with pytest.raises(CommandError, match="cannot accept command verb 'dismiss'"):
        check_verb("j0", JobStatus.RUNNING, JobVerb.DISMISS, extra)
