"""The async engine: a pool of workers sized by admission over a bounded queue, segment commits, partials, stop."""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections import Counter
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, cast

import pyarrow as pa

from . import source
from .admission import RateGate
from .client import Accounting, EndpointClient, RowOutcome, make_session
from .config import JobSpec
from .errors import BatchrunError, InterruptedRun
from .fleet import Fleet, fleet_for
from .localfs import crashpoint
from .opensegment import Segment
from .plan import Plan
from .preflight import Access
from .retry import RetryPolicy
from .segments import SegmentInfo
from .stopsignals import StopSignals
from .storage import ProgressStore
from .wire import codec_for, request_url

log = logging.getLogger("batchrun")


@dataclass
class Progress:
    """A snapshot handed to ``on_progress``: rows of the whole job, not only of this run."""

    total: int
    done: int
    failed: int
    sent: int
    elapsed_s: float
    skipped: int = 0  # rows not sent because their prompt is empty (counted in done)
    limit: int | None = None  # with concurrency = "auto": the requests in flight allowed now, over all replicas
    limits: tuple[int, ...] = ()  # with "auto" and several replicas: each one's


@dataclass
class _Batch:
    segment: Segment
    rows: list[int]  # indexes within the segment


class Engine:
    def __init__(
        self,
        spec: JobSpec,
        state: ProgressStore,
        plan: Plan,
        infos: dict[int, SegmentInfo],
        todo: list[int],
        access: Access,
        on_progress: Callable[[Progress], None] | None,
        started: float,
        endpoint: AbstractAsyncContextManager[tuple[str, ...]],
    ):
        self.spec = spec
        self.state = state
        self.plan = plan
        self.infos = infos
        self.todo = set(todo)
        self.access = access
        self.on_progress = on_progress
        run = spec.run
        self.policy = RetryPolicy(
            max_retries=run.max_retries,
            base_s=run.retry_backoff_s,
            cap_s=run.retry_backoff_max_s,
            retry_after_cap_s=run.retry_after_max_s,
            outage_after=run.outage_after_failures,
        )
        # Rows answered by earlier runs prove the endpoint answers this job's prompts.
        answered_before = any(i.rows > i.failed for i in infos.values())
        self.fleet: Fleet = fleet_for(
            spec.api_base, run.concurrency, run.max_concurrency, run.batch_size, self.policy,
            RateGate(run.requests_per_minute, run.prompts_per_minute, run.batch_size),
            answered_before=answered_before,
        )
        self.endpoint = endpoint  # yields the replicas' URLs for the length of the run
        self.started = started
        self.seg_rows = plan.segment_rows
        self.run_id = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
        self.open: dict[int, Segment] = {}
        # Enough open segments to keep every worker busy twice over, so one slow batch does not
        # stall the pipeline; bounded, so memory is too.
        window = 2 * self.fleet.max_in_flight * spec.run.batch_size
        self.max_open = max(2, math.ceil(window / self.seg_rows) + 2)
        self.slots = asyncio.Condition()
        self.write_lock = asyncio.Lock()
        self.stop = asyncio.Event()
        self.workers_done = asyncio.Event()
        self.live_workers = 0
        self.answered = 0
        done = sum(i.rows for k, i in infos.items() if k not in self.todo)
        earlier = [i for k, i in infos.items() if k not in self.todo]
        self.progress = Progress(
            total=plan.rows, done=done, failed=sum(i.retryable for i in earlier), sent=0, elapsed_s=0.0,
            skipped=sum(i.skipped for i in earlier),
        )
        self.accounting = Accounting()

    # -- orchestration --------------------------------------------------------------------------
    async def run(self, signals: StopSignals | None = None) -> None:
        if signals is not None:
            signals.attach(asyncio.get_running_loop(), self.request_stop)
        try:
            await self._run()
        finally:
            self.state.close_journals()
            if signals is not None:
                signals.detach()

    def request_stop(self, signal_name: str) -> None:
        self._signal_name = signal_name
        self.stop.set()

    async def _run(self) -> None:
        fleet = self.fleet
        # The fleet bounds each replica; the connection pool holds every attempt it may admit.
        async with self.endpoint as bases, make_session(
            fleet.max_in_flight, self.spec.timeout_s, self.access.ssl_context
        ) as session:
            fleet.bind([request_url(self.spec, base) for base in bases], bases)
            client = EndpointClient(
                session,
                fleet,
                codec_for(self.spec),
                self.policy,
                api_key=self.access.api_key,
                headers=self.access.headers,
                secrets=self.access.secrets,
                accounting=self.accounting,
                max_response_bytes=self.spec.max_response_bytes,
                stop=self.stop,
            )
            try:
                await self._pipeline(client, fleet.max_in_flight)
            finally:
                client.retry_log.flush()

    async def _pipeline(self, client: EndpointClient, n: int) -> None:
        """``n`` workers (admission's most attempts in flight) take batches from one queue."""
        queue: asyncio.Queue[_Batch | None] = asyncio.Queue(maxsize=n)
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
            # A resumed run starts reading at its first unfinished segment (Parquet seeks there).
            segments = source.iter_segments(
                self.spec, self._needed_columns(), self.seg_rows, start=min(self.todo, default=0)
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

    def _open_segment(self, k: int, table: pa.Table) -> Segment:
        seg = Segment(k, k * self.seg_rows, table, self.spec)
        if k in self.infos:  # committed before with rows worth retrying: keep its successes
            seg.carry_over(self.state.read_segment(k))
        for earlier in (self.state.read_partials(k), self.state.read_carry(seg.start, seg.start + table.num_rows)):
            if earlier is not None:
                seg.carry_over(earlier)
        seg.sent_before = self.state.read_journal(k)
        self.progress.done += sum(o is not None for o in seg.outcomes)
        self.progress.skipped += seg.skipped
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
                outcomes: list[RowOutcome | None] = [None] * len(batch.rows)
                try:
                    # Batches hold only rows with a prompt (empty ones are resolved when opened).
                    prompts = cast(list[str], [seg.texts[i] for i in batch.rows])
                    await client.process(prompts, outcomes, seg.add_usage)
                finally:
                    # Also when stopped, cancelled or ended by an outage: rows answered so far are
                    # kept (a partial checkpoint saves them), the others stay unresolved.
                    resolved = self._keep(seg, batch.rows, outcomes)
                crashpoint("batch:answered")
                self._report()
                if resolved < len(outcomes):
                    continue  # the run is stopping: the segment stays open and is not committed
                seg.outstanding -= 1
                if seg.outstanding == 0:
                    await self._commit(seg)
        finally:
            self.live_workers -= 1
            if self.live_workers == 0:
                self.workers_done.set()

    def _keep(self, seg: Segment, rows: list[int], outcomes: list[RowOutcome | None]) -> int:
        """Put a batch's resolved outcomes on its segment and count them; return how many."""
        resolved = failed = 0
        for i, outcome in zip(rows, outcomes):
            if outcome is not None:
                seg.outcomes[i] = outcome
                resolved += 1
                failed += outcome.error is not None
        if resolved:
            seg.dirty = True
        self.answered += resolved - failed
        self.progress.done += resolved
        self.progress.failed += failed
        self.progress.sent += resolved
        return resolved

    async def _commit(self, seg: Segment) -> None:
        if None in seg.outcomes:
            # A committed segment is final: a row in it without an outcome would be lost.
            raise RuntimeError(f"segment {seg.k} has unresolved rows; it must not be committed")
        table = seg.to_table()
        failed: Counter[str] = Counter()
        for o in seg.outcomes:
            if o is not None and o.error is not None:
                assert o.error_class is not None, o.error  # every failed outcome is made with its class
                failed[o.error_class] += 1
        info = SegmentInfo.of(table, dict(failed), (seg.usage[0], seg.usage[1]))
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
                    table = seg.to_table()
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

    def _report(self) -> None:
        if self.on_progress is not None:
            self.progress.elapsed_s = time.monotonic() - self.started
            self.progress.limit = self.fleet.current_limit
            if self.fleet.adaptive and self.fleet.size > 1:
                self.progress.limits = self.fleet.limits
            self.on_progress(self.progress)


def _next_wanted(segments: Any, wanted: set[int]) -> tuple[int, pa.Table] | None:
    for k, table in segments:
        if k in wanted:
            return k, table
    return None
