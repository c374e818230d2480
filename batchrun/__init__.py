"""batchrun: run prompt datasets through a multi-prompt LLM endpoint into Parquet, exactly once."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

# Names are imported on first use (PEP 562), so that `import batchrun.cli` does not import
# pyarrow before the CLI has chosen Arrow's allocator (batchrun.memory).
_EXPORTS = {
    "BatchrunError": "errors",
    "BusyError": "errors",
    "EndpointError": "errors",
    "InterruptedRun": "errors",
    "JobError": "errors",
    "StorageError": "errors",
    "JobSpec": "config",
    "load_job": "config",
    "Progress": "engine",
    "RunSummary": "report",
    "Shard": "report",
    "arun_job": "runner",
    "job_status": "report",
    "merge_job": "runner",
    "run_job": "runner",
}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from .config import JobSpec, load_job
    from .engine import Progress
    from .errors import BatchrunError, BusyError, EndpointError, InterruptedRun, JobError, StorageError
    from .report import RunSummary, Shard, job_status
    from .runner import arun_job, merge_job, run_job


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'batchrun' has no attribute {name!r}")
    from importlib import import_module

    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
