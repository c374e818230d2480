"""The run: plan, resume, a fixed pool of workers over a bounded queue, commits, and the finish."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import signal
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from . import source
from .checkpoint import RESULT_SCHEMA, DamagedStateError, RunState, SegmentInfo, crashpoint
from .client import Accounting, EndpointClient, RetryPolicy, RowOutcome, Throttle, make_session
from .config import BUILTIN, JobSpec, load_job
from .errors import BatchrunError, InterruptedRun, JobError, StateError
from .protocol import Answer
from .incremental import carry_forward
from .sink import merge_kind, output_identity, params_types, write_output

log = logging.getLogger("batchrun")

EMPTY_PROMPT = "empty_prompt"


@dataclass
class Progress:
    """A snapshot handed to ``on_progress``: rows of the whole job, not only of this run."""

    total: int
    done: int
    failed: int
    sent: int
    elapsed_s: float


@dataclass
class RunSummary:
    """What a run did; ``exit_code`` is what the CLI exits with."""

    job: str
    status: str
    exit_code: int
    total_rows: int = 0
    succeeded: int = 0
    failed: int = 0
    failed_by_class: dict[str, int] = field(default_factory=dict)
    rows_answered_this_run: int = 0
    rows_reused: int = 0
    requests: int = 0
    prompts_sent: int = 0
    prompts_resent: int = 0
    retries_by_cause: dict[str, int] = field(default_factory=dict)
    throttle_wait_s: float = 0.0
    incremental: dict[str, int] = field(default_factory=dict)
    duration_s: float = 0.0
    output_path: str = ""
    message: str = ""

    def line(self) -> str:
        """The one summary line printed at the end of a run."""
        if self.status == "nothing_to_do":
            return f"batchrun: nothing to do: all {self.total_rows} rows are done ({self.output_path})"
        changed = (
            "input changed: {reused} rows reused, {changed} changed, {new} new; ".format(**self.incremental)
            if self.incremental
            else ""
        )
        failed = (
            f", {self.failed} failed ({', '.join(f'{k} {v}' for k, v in sorted(self.failed_by_class.items()))})"
            if self.failed
            else ""
        )
        retries = sum(self.retries_by_cause.values())
        causes = ", ".join(f"{k} {v}" for k, v in sorted(self.retries_by_cause.items()))
        throttled = f", {self.throttle_wait_s:.1f}s throttled" if self.throttle_wait_s >= 0.05 else ""
        return (
            f"batchrun: {self.status}: {self.succeeded}/{self.total_rows} rows succeeded{failed}; "
            f"{changed}this run answered {self.rows_answered_this_run} rows in {self.requests} requests "
            f"({retries} retries{': ' + causes if causes else ''}, {self.prompts_resent} prompts "
            f"resent{throttled}) in {self.duration_s:.1f}s; output: {self.output_path}"
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_job(
    job: JobSpec | str | Path,
    *,
    on_progress: Callable[[Progress], None] | None = None,
    restart: bool = False,
    handle_signals: bool = False,
) -> RunSummary:
    """Run or resume a job to completion and return its summary.

    Raises a ``BatchrunError`` when the run cannot finish (invalid job, endpoint refused, storage,
    busy, interrupted); progress committed before that is kept and the same call resumes it.
    """
    spec = job if isinstance(job, JobSpec) else load_job(job)
    api_key = _api_key(spec)
    started = time.monotonic()
    state = RunState(spec.state_dir)
    with state.lock():
        if restart:
            state.reset()
        state.ensure_dirs()
        state.clear_leftovers(spec.output_path)
        plan = _plan(spec, state)
        summary = RunSummary(
            job=str(spec.job_path), status="", exit_code=0, total_rows=plan["rows"],
            output_path=str(spec.output_path),
        )
        sizes = _segment_sizes(plan["rows"], int(plan["segment_rows"]))
        # A checkpoint file found damaged while the output is written is removed and its rows
        # redone; a second pass normally suffices, a third means the disk itself is failing.
        for _ in range(3):
            infos = state.scan_segments(sizes)
            todo = [k for k in sizes if k not in infos or infos[k].retryable > 0]
            finished = state.read_finished()
            if not todo and finished is not None and finished.get("output") == output_identity(spec.output_path):
                summary.status = "nothing_to_do"
                summary.succeeded = finished.get("succeeded", 0)
                summary.failed = finished.get("failed", 0)
                summary.failed_by_class = finished.get("failed_by_class", {})
                summary.exit_code = 3 if summary.failed else 0
                summary.duration_s = time.monotonic() - started
                return summary
            if todo:
                state.clear_finished()
                engine = _Engine(spec, state, plan, infos, todo, api_key, on_progress, started)
                try:
                    asyncio.run(engine.run(handle_signals))
                finally:
                    _account(summary, engine)
                infos = state.scan_segments(sizes)
                missing = [k for k in sizes if k not in infos]
                if missing:
                    raise StateError(f"segments {missing[:5]} were not committed; run again to resume")
            types: dict[str, str] = {}
            for info in infos.values():
                for key, kind in info.params_types.items():
                    types[key] = merge_kind(types.get(key), kind)
            try:
                stats = write_output(spec, state, plan, types)
            except DamagedStateError as exc:
                log.warning("%s", exc)
                continue
            break
        else:
            raise StateError(f"checkpoint files in {state.root} keep reading back damaged; check the disk")
        state.drop_carry()
        summary.succeeded = stats.succeeded
        summary.failed = stats.failed
        summary.failed_by_class = dict(stats.failed_by_class)
        summary.rows_reused = summary.total_rows - summary.rows_answered_this_run
        summary.incremental = plan.get("incremental", {})
        summary.status = "complete" if not stats.failed else "complete_with_failed_rows"
        summary.exit_code = 0 if not stats.failed else 3
        state.write_finished(
            {
                "output": output_identity(spec.output_path),
                "rows": stats.rows,
                "succeeded": stats.succeeded,
                "failed": stats.failed,
                "failed_by_class": dict(stats.failed_by_class),
            }
        )
        summary.duration_s = time.monotonic() - started
        return summary


def _account(summary: RunSummary, engine: _Engine) -> None:
    acc = engine.accounting
    summary.requests += acc.requests
    summary.prompts_sent += acc.prompts_sent
    summary.prompts_resent += acc.prompts_resent
    for cause, n in acc.retries.items():
        summary.retries_by_cause[cause] = summary.retries_by_cause.get(cause, 0) + n
    summary.throttle_wait_s += acc.throttle_wait_s
    summary.rows_answered_this_run += engine.answered


def _api_key(spec: JobSpec) -> str | None:
    if spec.api_key_env is None:
        return None
    value = os.environ.get(spec.api_key_env)
    if not value:
        raise JobError(
            f"{spec.job_path}: endpoint.api_key_env: environment variable "
            f"{spec.api_key_env} is not set (it should hold the endpoint's API key)"
        )
    return value


def _segment_sizes(rows: int, seg_rows: int) -> dict[int, int]:
    n = math.ceil(rows / seg_rows)
    return {k: min(seg_rows, rows - k * seg_rows) for k in range(n)}


def _plan(spec: JobSpec, state: RunState) -> dict[str, Any]:
    """Load the pinned plan, or make and pin a new one.

    A changed input or changed settings are refused, saying what changed, except one case: with
    an id column and the same settings, a grown or edited input is planned incrementally, reusing
    the answers of rows whose id and prompt are unchanged.
    """
    settings = json.loads(json.dumps(spec.settings()))
    fingerprint = source.fingerprint(spec.input_files)
    plan = state.read_plan()
    incremental: dict[str, int] | None = None
    if plan is not None:
        changed = [
            f"{k}: {plan.get('settings', {}).get(k)!r} -> {settings[k]!r}"
            for k in settings
            if plan.get("settings", {}).get(k) != settings[k]
        ]
        same_input = _input_identity(plan.get("fingerprint", [])) == _input_identity(fingerprint)
        if not changed and same_input:
            return plan
        if changed or not spec.id_column:
            if not same_input:
                changed.append("the input files (names, sizes or contents) differ")
            raise StateError(
                "this job has saved progress from a different input or settings: "
                + "; ".join(changed)
                + f". Restore them, or run with --restart to discard the progress in {state.root}"
            )
    elif state.has_progress() or state.carry_path.exists():
        # Progress without the plan it was made under cannot be placed safely: start over.
        log.warning("the run state in %s had no readable plan; its progress is discarded", state.root)
        state.reset()
        state.drop_carry()
    rows = source.count_rows_and_check_ids(spec)
    if rows == 0:
        raise JobError(f"{spec.job_path}: input.path: the input has no rows")
    if plan is not None:
        incremental = carry_forward(spec, state)
        log.info(
            "input changed: %d rows reused, %d changed, %d new",
            incremental["reused"], incremental["changed"], incremental["new"],
        )
    crashpoint("plan:carried")
    new_plan: dict[str, Any] = {
        "rows": rows,
        "segment_rows": spec.run.checkpoint_rows,
        "fingerprint": fingerprint,
        "settings": settings,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if incremental is not None:
        new_plan["incremental"] = incremental
    state.write_plan(new_plan)
    return json.loads(json.dumps(state.read_plan()))


def _input_identity(fp: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    # The directory may move with the job, and a copy changes mtime: compare what the bytes are.
    return [(Path(str(f["path"])).name, f["size"], f["sample_sha256"]) for f in fp]


@dataclass
class _Batch:
    segment: _Segment
    rows: list[int]  # indexes within the segment


class _Segment:
    """A segment being worked on: its prompts, the outcome of each row, and batches outstanding."""

    def __init__(self, k: int, start: int, table: pa.Table, spec: JobSpec):
        self.k = k
        self.start = start
        prompts = source.render_prompts(table, spec)
        self.texts = prompts.text
        self.hashes = prompts.hashes()
        self.ids = source.id_strings(table, spec.id_column) if spec.id_column else None
        n = table.num_rows
        self.outcomes: list[RowOutcome | None] = [None] * n
        for i, why in enumerate(prompts.reason):
            if why is not None:
                self.outcomes[i] = RowOutcome(None, f"{EMPTY_PROMPT}: {why}", 0, None)
        self.outstanding = 0
        self.dirty = False  # results not yet in a partial file
        self.sent_before: set[int] = set()  # rows a crashed run had sent (from the journal)

    def carry_over(self, table: pa.Table) -> int:
        """Reuse earlier successful results whose prompt hash still matches; return how many."""
        reused = 0
        d = table.to_pydict()
        for row, h, rid, out, params, err, att, lat in zip(
            d["row"], d["prompt_hash"], d["id"], d["output"], d["params"], d["error"], d["attempts"], d["latency_s"]
        ):
            i = row - self.start
            if err is not None or not 0 <= i < len(self.outcomes) or self.hashes[i] != h:
                continue
            if self.ids is not None and self.ids[i] != rid:
                continue
            if self.outcomes[i] is None:
                self.outcomes[i] = RowOutcome(Answer(out, params), None, att, lat)
                reused += 1
        return reused

    def pending(self) -> list[int]:
        return [i for i, o in enumerate(self.outcomes) if o is None]

    def to_table(self, only_resolved: bool) -> pa.Table:
        idx = [i for i, o in enumerate(self.outcomes) if o is not None or not only_resolved]
        outs = [self.outcomes[i] for i in idx]
        return pa.table(
            {
                "row": [self.start + i for i in idx],
                "prompt_hash": self.hashes[idx] if idx else pa.array([], pa.int64()),
                "id": [self.ids[i] for i in idx] if self.ids is not None else [None] * len(idx),
                "output": [o.answer.output if o.answer else None for o in outs],
                "params": [o.answer.params_json if o.answer else None for o in outs],
                "error": [o.error for o in outs],
                "attempts": [o.attempts for o in outs],
                "latency_s": [o.latency_s for o in outs],
            },
            schema=RESULT_SCHEMA,
        )


class _Engine:
    def __init__(
        self,
        spec: JobSpec,
        state: RunState,
        plan: dict[str, Any],
        infos: dict[int, SegmentInfo],
        todo: list[int],
        api_key: str | None,
        on_progress: Callable[[Progress], None] | None,
        started: float,
    ):
        self.spec = spec
        self.state = state
        self.plan = plan
        self.infos = infos
        self.todo = set(todo)
        self.api_key = api_key
        self.on_progress = on_progress
        self.started = started
        self.seg_rows = int(plan["segment_rows"])
        self.run_id = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
        self.open: dict[int, _Segment] = {}
        # Enough open segments to keep every worker busy twice over, so one slow batch does not
        # stall the pipeline; bounded, so memory is too.
        window = 2 * spec.run.concurrency * spec.run.batch_size
        self.max_open = max(2, math.ceil(window / self.seg_rows) + 2)
        self.slots = asyncio.Condition()
        self.write_lock = asyncio.Lock()
        self.stop = asyncio.Event()
        self.workers_done = asyncio.Event()
        self.live_workers = 0
        self.answered = 0
        done = sum(i.rows for k, i in infos.items() if k not in self.todo)
        failed = sum(i.failed for k, i in infos.items() if k not in self.todo)
        self.progress = Progress(total=plan["rows"], done=done, failed=failed, sent=0, elapsed_s=0.0)
        self.accounting = Accounting()

    # -- orchestration --------------------------------------------------------------------------
    async def run(self, handle_signals: bool) -> None:
        if handle_signals:
            self._install_signals()
        server_runner = None
        url = self.spec.api_base
        try:
            if url == BUILTIN:
                from . import server

                server_runner, url, _ = await server.start_server("127.0.0.1", 0)
                log.info("started the builtin reference endpoint at %s", url)
            async with make_session(self.spec.run.concurrency, self.spec.timeout_s) as session:
                run = self.spec.run
                client = EndpointClient(
                    session,
                    url,
                    self.spec.model_name,
                    self.spec.params,
                    RetryPolicy(
                        max_retries=run.max_retries,
                        base_s=run.retry_backoff_s,
                        cap_s=run.retry_backoff_max_s,
                        retry_after_cap_s=run.retry_after_max_s,
                        outage_after=run.outage_after_failures,
                    ),
                    api_key=self.api_key,
                    throttle=Throttle(run.requests_per_minute, run.prompts_per_minute, run.batch_size),
                    accounting=self.accounting,
                    max_response_bytes=self.spec.max_response_bytes,
                )
                await self._pipeline(client)
        finally:
            if server_runner is not None:
                await server_runner.cleanup()

    async def _pipeline(self, client: EndpointClient) -> None:
        queue: asyncio.Queue[_Batch | None] = asyncio.Queue(maxsize=self.spec.run.concurrency)
        n = self.spec.run.concurrency
        self.live_workers = n
        try:
            async with asyncio.TaskGroup() as tg:
                producer = tg.create_task(self._produce(queue, n))
                workers = [tg.create_task(self._work(queue, client)) for _ in range(n)]
                tg.create_task(self._tick())
                tg.create_task(self._watch_stop(queue, producer, workers))
        except BaseExceptionGroup as group:
            await self._flush_partials()
            errors = [e for e in group.exceptions if isinstance(e, BatchrunError)]
            raise (errors[0] if errors else group.exceptions[0]) from None
        except BaseException:
            await self._flush_partials()
            raise
        if self.stop.is_set():
            await self._flush_partials()
            raise InterruptedRun(self._signal_name)

    async def _produce(self, queue: asyncio.Queue[_Batch | None], workers: int) -> None:
        try:
            segments = source.iter_segments(
                self.spec.input_files,
                self.spec.input_format,
                self._needed_columns(),
                self.seg_rows,
            )
            while True:
                item = await asyncio.to_thread(_next_wanted, segments, self.todo)
                if item is None or self.stop.is_set():
                    break
                k, table = item
                async with self.slots:
                    await self.slots.wait_for(lambda: len(self.open) < self.max_open or self.stop.is_set())
                if self.stop.is_set():
                    break
                seg = await asyncio.to_thread(self._open_segment, k, table)
                pending = seg.pending()
                size = self.spec.run.batch_size
                batches = [pending[i : i + size] for i in range(0, len(pending), size)]
                seg.outstanding = len(batches)
                self.open[k] = seg
                self._report()
                if not batches:
                    await self._commit(seg)
                for rows in batches:
                    await queue.put(_Batch(seg, rows))
                    if self.stop.is_set():
                        break
        except asyncio.CancelledError:
            # Cancelled because the run is failing or stopping: the workers are going too, so
            # nobody would take end markers from a full queue; awaiting a put would hang forever.
            raise
        if not self.stop.is_set():
            for _ in range(workers):
                await queue.put(None)

    def _needed_columns(self) -> list[str]:
        cols = list(self.spec.prompt_columns)
        if self.spec.id_column and self.spec.id_column not in cols:
            cols.append(self.spec.id_column)
        return cols

    def _open_segment(self, k: int, table: pa.Table) -> _Segment:
        seg = _Segment(k, k * self.seg_rows, table, self.spec)
        reused = 0
        if k in self.infos:  # committed before with rows worth retrying: keep its successes
            reused += seg.carry_over(self.state.read_segment(k))
        for earlier in (self.state.read_partials(k), self.state.read_carry(seg.start, seg.start + table.num_rows)):
            if earlier is not None:
                reused += seg.carry_over(earlier)
        seg.sent_before = self.state.read_journal(k)
        resolved = sum(o is not None for o in seg.outcomes)
        self.progress.done += resolved
        self.progress.failed += resolved - reused
        return seg

    async def _work(self, queue: asyncio.Queue[_Batch | None], client: EndpointClient) -> None:
        try:
            while True:
                batch = await queue.get()
                if batch is None:
                    return
                if self.stop.is_set():
                    continue
                seg = batch.segment
                # A one-line append, not worth a thread hop: it lets the next run count resends.
                self.state.journal_sent(seg.k, batch.rows)
                self.accounting.prompts_resent += len(seg.sent_before.intersection(batch.rows))
                outcomes = await client.process([seg.texts[i] for i in batch.rows])
                for i, outcome in zip(batch.rows, outcomes):
                    seg.outcomes[i] = outcome
                seg.dirty = True
                crashpoint("batch:answered")
                failed = sum(o.error is not None for o in outcomes)
                self.answered += len(outcomes) - failed
                self.progress.done += len(outcomes)
                self.progress.failed += failed
                self.progress.sent += len(outcomes)
                self._report()
                seg.outstanding -= 1
                if seg.outstanding == 0:
                    await self._commit(seg)
        finally:
            self.live_workers -= 1
            if self.live_workers == 0:
                self.workers_done.set()

    async def _commit(self, seg: _Segment) -> None:
        table = seg.to_table(only_resolved=False)
        info = _info_of(table)
        async with self.write_lock:
            await asyncio.to_thread(self.state.commit_segment, seg.k, table, info)
        self.open.pop(seg.k, None)
        self.infos[seg.k] = info
        async with self.slots:
            self.slots.notify_all()

    async def _tick(self) -> None:
        """Write partial checkpoints of open segments every ``checkpoint_interval_s``."""
        while not self.workers_done.is_set():
            try:
                await asyncio.wait_for(self.workers_done.wait(), self.spec.run.checkpoint_interval_s)
            except TimeoutError:
                await self._flush_partials()

    async def _flush_partials(self) -> None:
        async with self.write_lock:
            for seg in list(self.open.values()):
                if seg.dirty and seg.outstanding:
                    table = seg.to_table(only_resolved=True)
                    await asyncio.to_thread(self.state.write_partial, seg.k, self.run_id, table)
                    seg.dirty = False

    async def _watch_stop(
        self, queue: asyncio.Queue[_Batch | None], producer: asyncio.Task[None], workers: list[asyncio.Task[None]]
    ) -> None:
        stop = asyncio.ensure_future(self.stop.wait())
        done = asyncio.ensure_future(self.workers_done.wait())
        try:
            await asyncio.wait([stop, done], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            done.cancel()
        if not self.stop.is_set():
            return
        producer.cancel()
        async with self.slots:
            self.slots.notify_all()
        while not queue.empty():
            queue.get_nowait()
        for _ in workers:
            queue.put_nowait(None)
        grace = self.spec.run.grace_s
        log.warning("stopping: letting requests in flight land (up to %.0fs)", grace)
        try:
            await asyncio.wait_for(self.workers_done.wait(), grace)
        except TimeoutError:
            for w in workers:
                w.cancel()

    # -- signals and progress -------------------------------------------------------------------
    _signal_name = "signal"

    def _install_signals(self) -> None:
        loop = asyncio.get_running_loop()

        def on_signal(sig: signal.Signals) -> None:
            if self.stop.is_set():
                # Every file is published atomically, so leaving now is safe; in-flight work is
                # simply redone by the next run.
                os.write(2, b"batchrun: second signal: exiting now; run the same command to resume\n")
                os._exit(130)
            self._signal_name = sig.name
            self.stop.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal, sig)

    def _report(self) -> None:
        if self.on_progress is not None:
            self.progress.elapsed_s = time.monotonic() - self.started
            self.on_progress(self.progress)


def _next_wanted(segments: Any, wanted: set[int]) -> tuple[int, pa.Table] | None:
    for k, table in segments:
        if k in wanted:
            return k, table
    return None


def _info_of(table: pa.Table) -> SegmentInfo:
    errors = table.column("error").to_pylist()
    failed = sum(e is not None for e in errors)
    retryable = sum(e is not None and not e.startswith(EMPTY_PROMPT) for e in errors)
    return SegmentInfo(
        rows=table.num_rows,
        failed=failed,
        retryable=retryable,
        params_types=params_types(table.column("params").unique().to_pylist()),
    )
