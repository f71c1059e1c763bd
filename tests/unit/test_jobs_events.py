"""Job lifecycles and their events, in the order qemu-storage-daemon 7.2 emits them.

Each expected sequence is what QEMU's daemon emitted for the same scenario (docs/jobs.md has
the transcripts), without the paused/running pairs QEMU adds when it drains the graph around
block-graph changes: those come from QEMU's drain mechanism, not from the job.
JOB_STATUS_CHANGE events appear as their status, the others by name.
"""

from __future__ import annotations

import errno

import pytest

from pyfleece.block.fault import FaultNode, Rule
from pyfleece.block.memory import MemoryNode
from pyfleece.block.node import Node
from pyfleece.errors import CommandError
from pyfleece.jobs import JobManager
from tests.jobaids import Recorder, wait_until
from tests.overlay import OverlayNode

MiB = 1 << 20
SIZE = 4 * MiB

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def source() -> MemoryNode:
    node = MemoryNode("src", SIZE)
    node.write(0, b"\x5d" * MiB)
    return node


def fleece_target(source: Node) -> OverlayNode:
    return OverlayNode("tgt", SIZE, backing=source)


def test_sync_none_cancel(jobs: JobManager, rec: Recorder, source: MemoryNode) -> None:
    jobs.start_backup(source, fleece_target(source), sync="none", job_id="j0")
    assert rec.summary() == ["created", "running"]
    jobs.block_job_cancel("j0")
    assert rec.summary() == [
        "created", "running", "aborting", "BLOCK_JOB_CANCELLED", "concluded", "null",
    ]  # fmt: skip
    assert rec.named("BLOCK_JOB_CANCELLED") == [
        {"type": "backup", "device": "j0", "len": SIZE, "offset": 0, "speed": 0}
    ]
    assert jobs.query_jobs() == [] and jobs.query_block_jobs() == []


def test_sync_none_complete_is_the_seeds_ending(
    jobs: JobManager, rec: Recorder, source: MemoryNode
) -> None:
    target = fleece_target(source)
    jobs.start_backup(source, target, sync="none", device="ide0-hd0")
    source.write(0, b"\xab" * 65536)  # one unit copied before the guest's write
    jobs.block_job_complete("ide0-hd0")
    assert rec.summary() == [
        "created", "running", "waiting", "pending", "BLOCK_JOB_COMPLETED", "concluded", "null",
    ]  # fmt: skip
    completed = rec.named("BLOCK_JOB_COMPLETED")[0]
    assert completed == {"type": "backup", "device": "ide0-hd0", "len": SIZE,
                         "offset": 65536, "speed": 0}  # fmt: skip
    assert target.child("backing") is source  # the edge is given back


def test_sync_full_completes_with_offset_equal_len(
    jobs: JobManager, rec: Recorder, source: MemoryNode
) -> None:
    target = MemoryNode("tgt", SIZE)
    jobs.start_backup(source, target, sync="full", job_id="j0")
    rec.wait_for("JOB_STATUS_CHANGE", status="null")
    assert rec.summary() == [
        "created", "running", "waiting", "pending", "BLOCK_JOB_COMPLETED", "concluded", "null",
    ]  # fmt: skip
    assert rec.named("BLOCK_JOB_COMPLETED")[0] == {
        "type": "backup", "device": "j0", "len": SIZE, "offset": SIZE, "speed": 0,
    }  # fmt: skip


def test_no_auto_finalize_no_auto_dismiss(
    jobs: JobManager, rec: Recorder, source: MemoryNode
) -> None:
    target = MemoryNode("tgt", SIZE)
    jobs.start_backup(source, target, sync="full", job_id="j1",
                      auto_finalize=False, auto_dismiss=False)  # fmt: skip
    rec.wait_for("BLOCK_JOB_PENDING")
    assert rec.named("BLOCK_JOB_PENDING") == [{"type": "backup", "id": "j1"}]
    assert jobs.query_jobs() == [{"id": "j1", "type": "backup", "status": "pending",
                                  "current-progress": SIZE, "total-progress": SIZE}]  # fmt: skip
    for verb, call in [("dismiss", jobs.job_dismiss), ("pause", jobs.job_pause)]:
        with pytest.raises(CommandError) as err:
            call("j1")
        assert str(err.value) == f"Job 'j1' in state 'pending' cannot accept command verb '{verb}'"
    with pytest.raises(CommandError, match=r"^Can't resume a job that was not paused$"):
        jobs.job_resume("j1")
    with pytest.raises(CommandError, match="cannot accept command verb 'set-speed'"):
        jobs.block_job_set_speed("j1", 5)
    jobs.job_finalize("j1")
    assert rec.summary()[-4:] == ["pending", "BLOCK_JOB_PENDING", "BLOCK_JOB_COMPLETED",
                                  "concluded"]  # fmt: skip
    info = jobs.query_block_jobs()[0]
    assert (info["status"], info["auto-finalize"], info["auto-dismiss"]) == (
        "concluded", False, False,
    )  # fmt: skip
    with pytest.raises(CommandError, match="'concluded' cannot accept command verb 'cancel'"):
        jobs.job_cancel("j1")
    jobs.job_dismiss("j1")
    assert rec.summary()[-1] == "null" and jobs.query_jobs() == []


def test_cancel_while_pending(jobs: JobManager, rec: Recorder, source: MemoryNode) -> None:
    jobs.start_backup(source, MemoryNode("tgt", SIZE), sync="full", job_id="j3",
                      auto_finalize=False, auto_dismiss=False)  # fmt: skip
    rec.wait_for("BLOCK_JOB_PENDING")
    jobs.job_cancel("j3")
    assert rec.summary() == [
        "created", "running", "waiting", "pending", "BLOCK_JOB_PENDING", "aborting",
        "BLOCK_JOB_CANCELLED", "concluded",
    ]  # fmt: skip
    assert jobs.query_jobs()[0]["error"] == "Operation canceled"
    assert jobs.query_block_jobs()[0]["error"] == "Operation canceled"
    jobs.block_job_dismiss("j3")
    assert rec.summary()[-1] == "null"


def test_pause_resume_and_cancel_of_a_paused_job(
    jobs: JobManager, rec: Recorder, source: MemoryNode
) -> None:
    jobs.start_backup(source, fleece_target(source), sync="none", job_id="j0")
    jobs.block_job_pause("j0")
    assert rec.summary()[-1] == "paused"
    with pytest.raises(CommandError, match=r"^Job is already paused$"):
        jobs.job_pause("j0")
    info = jobs.query_block_jobs()[0]
    assert (info["status"], info["paused"], info["busy"]) == ("paused", True, False)
    with pytest.raises(CommandError, match="'paused' cannot accept command verb 'finalize'"):
        jobs.job_finalize("j0")
    jobs.block_job_resume("j0")
    assert rec.summary()[-1] == "running"
    with pytest.raises(CommandError, match=r"^Can't resume a job that was not paused$"):
        jobs.block_job_resume("j0")
    jobs.job_pause("j0")
    with pytest.raises(CommandError) as err:
        jobs.block_job_cancel("j0")
    assert str(err.value) == "The block job for device 'j0' is currently paused"
    jobs.block_job_cancel("j0", force=True)
    assert rec.summary() == [
        "created", "running", "paused", "running", "paused", "running", "aborting",
        "BLOCK_JOB_CANCELLED", "concluded", "null",
    ]  # fmt: skip


def test_set_speed(jobs: JobManager, source: MemoryNode) -> None:
    jobs.start_backup(source, fleece_target(source), sync="none", job_id="j0")
    with pytest.raises(CommandError, match=r"^Parameter 'speed' expects a non-negative value$"):
        jobs.block_job_set_speed("j0", -1)
    jobs.block_job_set_speed("j0", 1000)
    assert jobs.query_block_jobs()[0]["speed"] == 1000


def test_lookup_errors_use_qemus_words(jobs: JobManager, source: MemoryNode) -> None:
    with pytest.raises(CommandError) as err:
        jobs.block_job_complete("nosuch")
    assert (str(err.value), err.value.error_class) == (
        "Block job 'nosuch' not found", "DeviceNotActive",
    )  # fmt: skip
    with pytest.raises(CommandError) as err:
        jobs.job_complete("nosuch")
    assert (str(err.value), err.value.error_class) == ("Job not found", "GenericError")
    with pytest.raises(CommandError, match=r"^Invalid job ID ''$"):
        jobs.start_backup(source, fleece_target(source), sync="none")
    assert source.refs() == [] or all("block job" not in r.reason for r in source.refs())


def test_complete_refused_where_qemu_refuses_it(
    jobs: JobManager, rec: Recorder, source: MemoryNode
) -> None:
    target = MemoryNode("tgt", SIZE)
    jobs.start_backup(source, target, sync="full", job_id="j0", speed=1)
    wait_until(lambda: not jobs.find_job("j0").busy, what="the job to throttle")
    with pytest.raises(CommandError) as err:
        jobs.job_complete("j0")
    assert str(err.value) == "Job 'j0' in state 'running' cannot accept command verb 'complete'"


def test_query_members_match_qsd(jobs: JobManager, source: MemoryNode) -> None:
    jobs.start_backup(source, fleece_target(source), sync="none", job_id="j0")
    assert jobs.query_block_jobs() == [{
        "auto-finalize": True, "io-status": "ok", "device": "j0", "auto-dismiss": True,
        "busy": False, "len": SIZE, "offset": 0, "status": "running", "paused": False,
        "speed": 0, "ready": False, "type": "backup",
    }]  # fmt: skip
    assert jobs.query_jobs() == [{
        "current-progress": 0, "status": "running", "total-progress": SIZE, "type": "backup",
        "id": "j0",
    }]  # fmt: skip


def _faulty(inner: Node, op: str, err: int) -> FaultNode:
    return FaultNode(f"{inner.node_name}-f", inner, owned=True, rules=[Rule(op, err)])


def test_target_error_report(jobs: JobManager, rec: Recorder, source: MemoryNode) -> None:
    target = _faulty(MemoryNode("tgt", SIZE), "write", errno.EIO)
    jobs.start_backup(source, target, sync="full", job_id="j0", auto_dismiss=False)
    rec.wait_for("JOB_STATUS_CHANGE", status="concluded")
    assert rec.summary() == [
        "created", "running", "BLOCK_JOB_ERROR", "aborting", "BLOCK_JOB_COMPLETED", "concluded",
    ]  # fmt: skip
    assert rec.named("BLOCK_JOB_ERROR") == [
        {"device": "j0", "operation": "write", "action": "report"}
    ]
    completed = rec.named("BLOCK_JOB_COMPLETED")[0]
    assert completed["error"] == "Input/output error" and completed["offset"] < SIZE
    assert jobs.query_jobs()[0]["error"] == "Input/output error"


@pytest.mark.parametrize(
    ("policy", "err", "iostatus"),
    [("stop", errno.EIO, "failed"), ("enospc", errno.ENOSPC, "nospace")],
)
def test_target_error_stop_pauses_then_resume_retries(
    jobs: JobManager, rec: Recorder, source: MemoryNode, policy: str, err: int, iostatus: str
) -> None:
    target = _faulty(MemoryNode("tgt", SIZE), "write", err)
    jobs.start_backup(source, target, sync="full", job_id="j0", on_target_error=policy)
    rec.wait_for("JOB_STATUS_CHANGE", status="paused")
    assert rec.named("BLOCK_JOB_ERROR") == [{"device": "j0", "operation": "write",
                                             "action": "stop"}]  # fmt: skip
    info = jobs.query_block_jobs()[0]
    assert (info["io-status"], info["paused"], info["status"]) == (iostatus, True, "paused")
    with pytest.raises(CommandError, match=r"^Job is already paused$"):
        jobs.job_pause("j0")
    jobs.job_resume("j0")
    rec.wait_for("JOB_STATUS_CHANGE", status="null")
    assert rec.summary() == [
        "created", "running", "BLOCK_JOB_ERROR", "paused", "running", "waiting", "pending",
        "BLOCK_JOB_COMPLETED", "concluded", "null",
    ]  # fmt: skip
    assert target.read(0, SIZE) == source.read(0, SIZE)


def test_enospc_policy_reports_other_errors(
    jobs: JobManager, rec: Recorder, source: MemoryNode
) -> None:
    target = _faulty(MemoryNode("tgt", SIZE), "write", errno.EIO)
    jobs.start_backup(source, target, sync="full", job_id="j0", on_target_error="enospc")
    rec.wait_for("JOB_STATUS_CHANGE", status="null")
    assert rec.named("BLOCK_JOB_ERROR")[0]["action"] == "report"
    assert rec.named("BLOCK_JOB_COMPLETED")[0]["error"] == "Input/output error"


def test_error_ignore_retries_and_succeeds(
    jobs: JobManager, rec: Recorder, source: MemoryNode
) -> None:
    target = _faulty(MemoryNode("tgt", SIZE), "write", errno.EIO)
    jobs.start_backup(source, target, sync="full", job_id="j0", on_target_error="ignore")
    rec.wait_for("JOB_STATUS_CHANGE", status="null")
    assert rec.summary() == [
        "created", "running", "BLOCK_JOB_ERROR", "waiting", "pending", "BLOCK_JOB_COMPLETED",
        "concluded", "null",
    ]  # fmt: skip
    assert rec.named("BLOCK_JOB_ERROR")[0]["action"] == "ignore"
    assert rec.named("BLOCK_JOB_COMPLETED")[0]["offset"] == SIZE
    assert target.read(0, SIZE) == source.read(0, SIZE)


def test_source_error_stop(jobs: JobManager, rec: Recorder) -> None:
    inner = MemoryNode("src", SIZE)
    inner.write(0, b"\x11" * SIZE)
    source = _faulty(inner, "read", errno.EIO)
    jobs.start_backup(source, MemoryNode("tgt", SIZE), sync="full", job_id="j0",
                      on_source_error="stop")  # fmt: skip
    rec.wait_for("JOB_STATUS_CHANGE", status="paused")
    assert rec.named("BLOCK_JOB_ERROR") == [{"device": "j0", "operation": "read",
                                             "action": "stop"}]  # fmt: skip
    jobs.job_cancel("j0")
    assert rec.summary()[-5:] == ["running", "aborting", "BLOCK_JOB_CANCELLED", "concluded",
                                  "null"]  # fmt: skip


def test_shutdown_cancels_every_job(jobs: JobManager, rec: Recorder, source: MemoryNode) -> None:
    other = MemoryNode("src2", SIZE)
    jobs.start_backup(source, fleece_target(source), sync="none", job_id="a")
    jobs.start_backup(other, MemoryNode("t2", SIZE), sync="full", job_id="b", speed=1)
    jobs.job_pause("a")
    jobs.shutdown(timeout=10)
    assert sorted(e["device"] for e in rec.named("BLOCK_JOB_CANCELLED")) == ["a", "b"]
    assert jobs.query_jobs() == []
