"""The Python API: the names a user imports, and run_job from inside an event loop."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from conftest import MakeJob, assert_exact, prompt_rows
from endpoint import LiveEndpoint

import batchrun


def test_the_error_classes_and_both_entry_points_import_from_the_package() -> None:
    from batchrun import BusyError, EndpointError, InterruptedRun, JobError, StorageError, arun_job, run_job

    codes = {cls.__name__: cls.exit_code for cls in (JobError, EndpointError, StorageError, BusyError, InterruptedRun)}
    assert codes == {"JobError": 2, "EndpointError": 4, "StorageError": 74, "BusyError": 75, "InterruptedRun": 130}
    assert all(issubclass(cls, batchrun.BatchrunError) for cls in (JobError, EndpointError, StorageError))
    assert asyncio.iscoroutinefunction(arun_job) and callable(run_job)


def test_run_job_inside_a_running_loop_refuses_at_once_naming_arun_job(tmp_path: Path, endpoint: LiveEndpoint, make_job: MakeJob) -> None:
    job = make_job(8, url=endpoint.url)

    async def notebook_cell() -> None:
        batchrun.run_job(job.path)

    with pytest.raises(RuntimeError, match=r"run_job\(\) cannot run inside a running event loop .*await batchrun\.arun_job"):
        asyncio.run(notebook_cell())
    assert endpoint.log.requests == 0
    assert not (tmp_path / "out").exists()


def test_arun_job_runs_a_job_to_completion_while_the_callers_loop_stays_responsive(
    tmp_path: Path, endpoint: LiveEndpoint, make_job: MakeJob
) -> None:
    rows = prompt_rows(40)
    job = make_job(rows, url=endpoint.url)

    async def notebook_cell() -> tuple[batchrun.RunSummary, int]:
        ticks = 0
        run = asyncio.ensure_future(batchrun.arun_job(job.path))
        while not run.done():
            await asyncio.sleep(0.001)
            ticks += 1
        return run.result(), ticks

    summary, ticks = asyncio.run(notebook_cell())
    assert (summary.status, summary.exit_code, summary.succeeded) == ("complete", 0, 40)
    assert ticks >= 5, "the caller's loop was blocked while the job ran"
    assert_exact(tmp_path / "out" / "result.parquet", rows)


def test_an_error_that_ends_a_run_carries_its_summary(tmp_path: Path, make_job: MakeJob) -> None:
    with LiveEndpoint(rule=lambda n, p: "401") as ep:
        job = make_job(8, url=ep.url)
        with pytest.raises(batchrun.EndpointError) as caught:
            batchrun.run_job(job.path)
    summary = caught.value.summary
    assert (summary.status, summary.exit_code, summary.total_rows) == ("credentials_refused", 4, 8)
