"""batchrun: run prompt datasets through a multi-prompt LLM endpoint into Parquet, exactly once."""

from .config import JobSpec, load_job
from .errors import BatchrunError
from .runner import Progress, RunSummary, run_job

__all__ = ["BatchrunError", "JobSpec", "Progress", "RunSummary", "load_job", "run_job"]
