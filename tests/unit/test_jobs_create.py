"""Creating jobs before starting them (transactions), and the permissions a backup claims.

qsd 7.2, measured: a transaction creates every job (created) before it starts any
(running); when it fails, the jobs created so far end newest first with aborting, concluded,
null, and no BLOCK_JOB_CANCELLED, even with auto-dismiss off. A running backup's source
cannot become another backup's target: "Could not create node: Permission conflict on node
'r0': permissions 'write' are both required by node '#blockN' (uses node 'r0' as 'target'
child) and unshared by node '#blockM' (uses node 'r0' as 'file' child)."
"""

from __future__ import annotations

import re

import pytest

from pyfleece.block import locking
from pyfleece.block.memory import MemoryNode
from pyfleece.errors import CommandError
from pyfleece.jobs import JobManager
from tests.jobaids import Recorder
from tests.overlay import OverlayNode

SIZE = 1 << 20

pytestmark = pytest.mark.timeout(30)


def test_created_jobs_run_only_when_started(jobs: JobManager, rec: Recorder) -> None:
    a, b = MemoryNode("a", SIZE), MemoryNode("b", SIZE)
    first = jobs.create_backup(a, OverlayNode("ta", SIZE, backing=a), sync="none", job_id="y1")
    second = jobs.create_backup(b, OverlayNode("tb", SIZE, backing=b), sync="none", job_id="y2")
    assert rec.summary() == ["created", "created"]
    a.write(0, b"\x01" * 512)  # the snapshot is taken at creation: this write copies first
    assert first.cbw.is_copied(0) and not second.cbw.is_copied(0)
    first.start()
    second.start()
    assert rec.summary() == ["created", "created", "running", "running"]
    assert [j["status"] for j in jobs.query_jobs()] == ["running", "running"]


@pytest.mark.parametrize("auto_dismiss", [True, False])
def test_an_unstarted_job_aborts_without_cancelled_event(
    jobs: JobManager, rec: Recorder, auto_dismiss: bool
) -> None:
    disk = MemoryNode("d", SIZE)
    target = OverlayNode("t", SIZE, backing=disk)
    job = jobs.create_backup(disk, target, sync="none", job_id="x1", auto_dismiss=auto_dismiss)
    job.abort_unstarted()
    assert rec.summary() == ["created", "aborting", "concluded", "null"]
    assert jobs.query_jobs() == []
    assert target.child("backing") is disk and disk.write_hooks == []
    assert target.refs() == [] and locking.claims(disk) == locking.claims(target) == []
    disk.write(0, b"\x02")  # no job, no copy
    assert target.writes == {}


def test_a_running_backups_source_cannot_be_another_target(jobs: JobManager) -> None:
    q, r0, copy = MemoryNode("q", SIZE), MemoryNode("r0", SIZE), MemoryNode("copy", SIZE)
    jobs.start_backup(r0, copy, sync="none", job_id="j0")
    with pytest.raises(CommandError) as refused:
        jobs.start_backup(q, r0, sync="none", job_id="j1")
    text = re.sub(r"#block\d+", "#auto", str(refused.value))
    assert text == (
        "Could not create node: Permission conflict on node 'r0': permissions 'write' are "
        "both required by node '#auto' (uses node 'r0' as 'target' child) and unshared by "
        "node '#auto' (uses node 'r0' as 'file' child)."
    )
    assert [j["id"] for j in jobs.query_jobs()] == ["j0"]
    assert locking.claims(q) == []  # the refused job let go of what it had claimed
    jobs.start_backup(r0, MemoryNode("other", SIZE), sync="none", job_id="j2")  # sources share
    jobs.job_cancel("j0")
    jobs.job_cancel("j2")
    assert locking.claims(r0) == []
    jobs.start_backup(q, r0, sync="none", job_id="j3")  # no backup reads r0 any more
