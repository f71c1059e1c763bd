"""Jobs: QEMU's job state machine and events (``states``, ``job``), the backup job
(``backup``), and the job table the monitors drive (``manager``). See docs/jobs.md."""

from pyfleece.jobs.backup import BackupJob
from pyfleece.jobs.job import Job, JobCancelled
from pyfleece.jobs.manager import JobManager
from pyfleece.jobs.states import JobStatus, JobVerb

__all__ = ["BackupJob", "Job", "JobCancelled", "JobManager", "JobStatus", "JobVerb"]
