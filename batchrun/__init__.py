"""batchrun: run prompt datasets through a multi-prompt LLM endpoint into Parquet, exactly once."""

from .config import JobSpec, load_job
from .errors import BatchrunError
from .engine import Progress
from .runner import RunSummary, Shard, job_status, merge_job, run_job

__all__ = [
    "BatchrunError", "JobSpec", "Progress", "RunSummary", "Shard",
    "job_status", "load_job", "merge_job", "run_job",
]
