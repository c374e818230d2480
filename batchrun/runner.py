"""The run: plan, resume, shards and the finish (what it reports lives in ``report``)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, nullcontext
from pathlib import Path
from typing import Any

from . import fingerprint as fingerprints
from . import source
from .checkpoint import DamagedStateError
from .config import JobSpec
from .engine import Engine, Progress
from .errors import (
    BatchrunError,
    BusyError,
    InterruptedRun,
    JobError,
    NotReadyError,
    ObjectStoreError,
    StateError,
    StorageError,
)
from .fleet import idle_report
from .incremental import carry_forward
from .inputcheck import check_sample, open_job, with_input
from .jobchecks import BUILTIN
from .localfs import crashpoint
from .memory import release_free_memory
from .plan import Plan
from .preflight import (
    Access,
    check_output_owned,
    check_output_path,
    check_output_writable,
    check_saved_progress,
    read_access,
    with_overwrite,
)
from .report import (
    RunSummary,
    Shard,
    counts_of,
    failure_status,
    now,
    saved_counts,
    set_counts,
    success_path,
    summary_path,
)
from .segments import SegmentInfo
from .sink import write_output
from .stopsignals import StopSignals
from .storage import ProgressStore, input_store, output_store, progress_store
from .wire import builtin_path

log = logging.getLogger("batchrun")

__all__ = ["arun_job", "merge_job", "run_job"]


def run_job(
    job: JobSpec | str | Path,
    *,
    on_progress: Callable[[Progress], None] | None = None,
    restart: bool = False,
    handle_signals: bool = False,
    shard: Shard | str | None = None,
    overwrite: bool = False,
) -> RunSummary:
    """Run or resume a job (or one shard of it) to completion and return its summary.

    Raises a ``BatchrunError`` when the run cannot finish (invalid job, endpoint refused, storage,
    busy, interrupted); progress committed before that is kept and the same call resumes it. The
    exception carries the run's summary as ``.summary`` (except ``BusyError``: the running
    process owns the summary).

    ``run_job`` runs its own event loop; from code already inside one (a notebook, an async
    service) use ``await arun_job(...)``.
    """
    _refuse_running_loop("run_job")
    spec = with_overwrite(_opened(job), overwrite)
    part = Shard.parse(shard) if isinstance(shard, str) else shard
    if restart and part is not None:
        raise JobError("--restart discards the progress of every shard; run it once without --shard")
    check_output_path(spec)
    access = read_access(spec)
    check_output_writable(spec, create=True)
    state = progress_store(spec)
    summary = RunSummary(
        job=str(spec.job_path), status="", exit_code=0, output_path=str(spec.output_path),
        shard=str(part) if part else "", started_at=now(), echo_match=spec.echo_match,
        replicas=idle_report(spec.api_base),
    )
    started = time.monotonic()
    try:
        with StopSignals() if handle_signals else nullcontext() as signals, state.lock(
            f"lock.{part.slug}" if part else "lock"
        ):
            _run_locked(spec, state, summary, part, restart, access, on_progress, signals, started)
    except BusyError:
        raise
    except BatchrunError as exc:
        # A scheduler reading the summary of a run that stopped early sees the job's counts as
        # `status` reports them, as it does after a complete run.
        total, counts = saved_counts(state, part)
        summary.total_rows = summary.total_rows or total
        set_counts(summary, counts)
        summary.status = failure_status(exc)
        summary.exit_code = exc.exit_code
        summary.message = str(exc)
        _close_summary(summary, started, spec, part)
        exc.summary = summary
        raise
    _close_summary(summary, started, spec, part)
    return summary


async def arun_job(
    job: JobSpec | str | Path,
    *,
    on_progress: Callable[[Progress], None] | None = None,
    restart: bool = False,
    shard: Shard | str | None = None,
    overwrite: bool = False,
) -> RunSummary:
    """``run_job`` for callers inside an event loop (a notebook, an async service).

    The run gets an event loop of its own in a worker thread, so the caller's loop stays free;
    ``on_progress`` is called from that thread. Signals stay the host's to handle.
    """
    return await asyncio.to_thread(
        run_job, job, on_progress=on_progress, restart=restart, shard=shard, overwrite=overwrite
    )


def _opened(job: JobSpec | str | Path) -> JobSpec:
    """The job with its input looked at: every run, merge and validation starts here."""
    return with_input(job) if isinstance(job, JobSpec) else open_job(job)


def _refuse_running_loop(name: str) -> None:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return
    raise RuntimeError(
        f"{name}() cannot run inside a running event loop (a notebook or an async service); "
        f"use `await batchrun.arun_job(...)` there instead"
    )


@asynccontextmanager
async def _endpoint(spec: JobSpec) -> AsyncIterator[tuple[str, ...]]:
    """Where a run sends its requests: the job's replicas, or the reference endpoint started for it."""
    if spec.api_base == (BUILTIN,):
        from .server import builtin_endpoint  # aiohttp's server side, only when asked for

        async with builtin_endpoint(builtin_path(spec)) as url:
            yield (url,)
        return
    yield spec.api_base


def _run_engine(engine: Engine, signals: StopSignals | None) -> None:
    asyncio.run(engine.run(signals))
    if signals is not None and signals.fired:
        # A signal that came as the engine was finishing found nothing left to stop: honour it.
        raise InterruptedRun(signals.fired)


def merge_job(job: JobSpec | str | Path, *, overwrite: bool = False) -> RunSummary:
    """Write the single output from every shard's segments; refuse while a shard is unfinished."""
    spec = with_overwrite(_opened(job), overwrite)
    check_output_path(spec)
    state = progress_store(spec)
    summary = RunSummary(
        job=str(spec.job_path), status="", exit_code=0, output_path=str(spec.output_path),
        started_at=now(), echo_match=spec.echo_match,
    )
    started = time.monotonic()
    plan = state.read_plan()
    if plan is None:
        raise NotReadyError(f"nothing to merge: no shard of {spec.job_path} has run yet")
    summary.total_rows = plan.rows
    sizes = plan.sizes()
    infos = state.scan_segments(sizes)
    _refuse_unfinished(state, sizes, infos)
    with state.lock("merge.lock"):
        if _output_current(spec, state):
            _already_done(spec, state, summary, infos)
        else:
            _finish(spec, state, plan, summary, sizes)
    _close_summary(summary, started, spec, None)
    return summary


def _run_locked(
    spec: JobSpec,
    state: ProgressStore,
    summary: RunSummary,
    part: Shard | None,
    restart: bool,
    access: Access,
    on_progress: Callable[[Progress], None] | None,
    signals: StopSignals | None,
    started: float,
) -> None:
    with state.lock("plan.lock", wait=True):
        if restart:
            state.reset()
        state.ensure_dirs()
        state.clear_leftovers()
        output_store(spec).clear_leftovers(spec.output_path)
        plan = _plan(spec, state, allow_incremental=part is None)
        check_output_owned(spec, state)
    summary.total_rows = plan.rows
    summary.incremental = plan.incremental or {}
    sizes = plan.sizes()
    mine = [k for k in sizes if part is None or part.owns(k)]
    # A checkpoint file found damaged while the output is written is removed and its rows
    # redone; a second pass normally suffices, a third means the disk itself is failing.
    for _ in range(3):
        infos = state.scan_segments(sizes)
        todo = [k for k in mine if k not in infos or infos[k].retryable > 0]
        if todo:
            state.clear_finished()
            output_store(spec).remove(success_path(spec))
            engine = Engine(spec, state, plan, infos, todo, access, on_progress, started, _endpoint(spec))
            try:
                _run_engine(engine, signals)
            finally:
                _account(summary, engine)
            infos = state.scan_segments(sizes)
            lost = [k for k in todo if k not in infos]
            if lost:
                raise StateError(f"segments {lost[:5]} were not committed; run again to resume")
        elif _output_current(spec, state):
            _already_done(spec, state, summary, infos)
            return
        if len(infos) < len(sizes):
            # This shard is done; others are not. Whoever finishes last writes the output.
            summary.status = "shard_complete"
            set_counts(summary, counts_of({k: infos[k] for k in mine if k in infos}))
            summary.message = f"{len(sizes) - len(infos)} segments of other shards are not done yet"
            return
        try:
            with state.lock("merge.lock", wait=part is None):
                if _output_current(spec, state):
                    _already_done(spec, state, summary, infos)
                    return
                _finish(spec, state, plan, summary, sizes)
        except DamagedStateError as exc:
            log.warning("%s", exc)
            continue
        except BusyError:
            summary.status = "shard_complete"
            set_counts(summary, counts_of({k: infos[k] for k in mine if k in infos}))
            summary.message = "another process is writing the output"
        return
    raise StateError(f"checkpoint files in {state.root} keep reading back damaged; check the disk")


def _finish(spec: JobSpec, state: ProgressStore, plan: Plan, summary: RunSummary, sizes: dict[int, int]) -> None:
    """Write the output from the committed segments; then the finish marker and success marker."""
    infos = state.scan_segments(sizes)
    check_output_owned(spec, state)  # a file may have appeared there meanwhile
    release_free_memory()
    writing = time.monotonic()
    stats = write_output(spec, state, plan, infos)
    summary.write_output_s = time.monotonic() - writing
    state.drop_carry()
    counts = {
        "succeeded": stats.succeeded, "failed": stats.failed, "failed_by_class": dict(stats.failed_by_class),
        "skipped": stats.skipped,
    }
    set_counts(summary, counts)
    summary.status = "complete" if not stats.failed else "complete_with_failed_rows"
    finished = {"output": output_store(spec).identity(spec.output_path), "rows": stats.rows, **counts}
    state.write_finished(finished)
    crashpoint("finished:marked")
    _write_success(spec, finished)


def _write_success(spec: JobSpec, finished: dict[str, Any]) -> None:
    counts = {k: finished.get(k, 0) for k in ("rows", "succeeded", "failed", "failed_by_class", "skipped")}
    output_store(spec).write_json(
        success_path(spec), {"output": str(spec.output_path), **counts, "written_at": now()}, "success"
    )


def _already_done(spec: JobSpec, state: ProgressStore, summary: RunSummary, infos: dict[int, SegmentInfo]) -> None:
    """The output is written and current: report so, and put back a success marker a crash (or a
    hand) removed between the output's publication and the marker's."""
    summary.status = "nothing_to_do"
    set_counts(summary, counts_of(infos))
    finished = state.read_finished()
    if finished is not None and not output_store(spec).exists(success_path(spec)):
        _write_success(spec, finished)


def _output_current(spec: JobSpec, state: ProgressStore) -> bool:
    finished = state.read_finished()
    return finished is not None and finished.get("output") == output_store(spec).identity(spec.output_path)


def _refuse_unfinished(state: ProgressStore, sizes: dict[int, int], infos: dict[int, SegmentInfo]) -> None:
    missing = [k for k in sizes if k not in infos]
    if not missing:
        return
    count = state.shard_count()
    if count:
        shards = sorted({k % count + 1 for k in missing})
        which = ", ".join(f"{i}/{count}" for i in shards)
        raise NotReadyError(
            f"cannot merge yet: {len(missing)} of {len(sizes)} segments are not done; "
            f"unfinished shard(s): {which}"
        )
    raise NotReadyError(f"cannot merge yet: {len(missing)} of {len(sizes)} segments are not done")


def _close_summary(summary: RunSummary, started: float, spec: JobSpec, part: Shard | None) -> None:
    summary.duration_s = time.monotonic() - started
    summary.finished_at = now()
    summary.rows_per_s = summary.rows_answered_this_run / summary.duration_s if summary.duration_s else 0.0
    summary.rows_reused = max(0, summary.succeeded - summary.rows_answered_this_run)
    try:
        output_store(spec).write_json(summary_path(spec, part), summary.to_dict(), "summary")
    except (OSError, StorageError, ObjectStoreError) as exc:
        # The summary is a report, not the truth: failing to write it must not mask the run's
        # result, nor the error that stopped it (an S3 store that died mid-upload is still dead).
        log.warning("could not write the run summary: %s", exc)


def _account(summary: RunSummary, engine: Engine) -> None:
    acc = engine.accounting
    summary.requests += acc.requests
    summary.prompts_sent += acc.prompts_sent
    summary.prompts_resent += acc.prompts_resent
    for cause, n in acc.retries.items():
        summary.retries_by_cause[cause] = summary.retries_by_cause.get(cause, 0) + n
    summary.throttle_wait_s += acc.throttle_wait_s
    fleet = engine.fleet
    if fleet.current_limit is not None:
        summary.concurrency_limit = fleet.current_limit
        summary.concurrency_cuts += fleet.cuts
    summary.replicas = fleet.report()
    summary.prompt_tokens += acc.prompt_tokens
    summary.completion_tokens += acc.completion_tokens
    summary.rows_answered_this_run += engine.answered


def _plan(spec: JobSpec, state: ProgressStore, *, allow_incremental: bool = True) -> Plan:
    """Load the pinned plan, or make and pin a new one.

    A changed input or changed settings are refused, saying what changed, except one case: with
    an id column and the same settings, a grown or edited input is planned incrementally, reusing
    the answers of rows whose id and prompt are unchanged.
    """
    settings = json.loads(json.dumps(spec.settings()))
    plan = state.read_plan()
    incremental: dict[str, int] | None = None
    hashed: dict[tuple[str, int, int], str] = {}
    if plan is not None:
        seen = check_saved_progress(spec, state, plan, allow_incremental=allow_incremental)
        hashed = seen.hashes
        if seen.same:
            if seen.refreshed is not None:
                # Same bytes under a new mtime (a copy, a touch): record it, so the next run
                # trusts the file by its metadata instead of hashing it again.
                plan = plan.with_fingerprint(seen.refreshed)
                state.write_plan(plan)
            return plan
    elif state.has_progress() or state.has_carry():
        # Progress without the plan it was made under cannot be placed safely: start over.
        log.warning("the run state in %s had no readable plan; its progress is discarded", state.root)
        state.reset()
        state.drop_carry()
    fingerprint = fingerprints.take(input_store(spec.input_pattern, spec.storage), spec.input_files, hashed)
    check_sample(spec)
    rows = source.count_rows_and_check_ids(spec)
    if rows == 0:
        raise JobError(f"{spec.job_path}: input.path: the input has no rows")
    if plan is not None:
        incremental = carry_forward(spec, state, fingerprints.identity(fingerprint))
        log.info(
            "input changed: %d rows reused, %d changed, %d new",
            incremental["reused"], incremental["changed"], incremental["new"],
        )
    crashpoint("plan:carried")
    new_plan = Plan(
        rows=rows, segment_rows=spec.run.checkpoint_rows, fingerprint=fingerprint, settings=settings,
        created_at=now(), incremental=incremental,
    )
    state.write_plan(new_plan)
    written = state.read_plan()
    assert written is not None
    if written != new_plan:
        # Another run pinned a plan at the same moment (possible where locks are leases, on an
        # object store): this run works under it only if it fits this job.
        check_saved_progress(spec, state, written, allow_incremental=False)
    return written
