"""``batchrun tune``: find the batch size and concurrency an endpoint serves fastest, gently.

A sample of the job's own prompts (the first ``sample`` prompts of its input, rendered as a run
renders them) is sent through the run's own client, codec and fleet at a grid of settings:
batch sizes 1, 2, 4, ... up to ``max_batch`` (never above the protocol's limit or the sample),
and at each of them concurrencies 1, 2, 4, ... up to ``max_concurrency``. Nothing is written:
not the job's output, not its progress; answers are counted and dropped.

Each grid point is measured in steady state. Its workers start one at a time: those of the step
before spread over one of its round trips (so they do not answer in step), the new ones over the
next two, each also after one more answer has landed (as TCP's slow start is clocked by acks), so
a server that cannot take the new load meets a request or two too many, not a burst. Once every
worker is running, the point counts the requests started until ``max(4C, sample / B)`` of them
have started (or ``point_s`` has passed), and its rate is the prompts those requests answered
over that span. Latency is per request, over the requests answered in full.

The climb at one batch size stops at the first point that
- had any failed request (429, 5xx, timeout, connection, an invalid answer): sending stops at the
  first failure, and no higher concurrency is tried;
- answered fewer than 5% more prompts/s than the point before it;
- had a median latency above 3x the lowest median seen at this batch size (the server is
  queueing). The median, not the p95: a point's p95 is one of its last few requests, and one
  hiccup (a pause of the host, not the server) would end a climb.

The whole tune stops when a batch size fails at concurrency 1 (larger batches would fare no
better), when a batch size's best is more than 25% below the best of smaller ones (clearly
slower, not noise), after ``_MAX_ERRORS`` failed requests in all, when the endpoint stops
accepting connections, or when ``budget_s`` has passed. Requests are never retried (``max_retries = 0``): errors are counted,
not hidden. The job's ``requests_per_minute`` and ``prompts_per_minute`` hold as in a run.

The recommendation is the point with the most prompts/s among those without failures (and not
stopped for latency), preferring the smallest concurrency within 5% of that best: as fast, and
gentler on a shared server.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import functools
import logging
import math
import time
from collections import Counter
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import pyarrow as pa

from . import source
from .admission import RateGate, Stopping, sleep_unless_stopped
from .client import REJECTED, Accounting, EndpointClient, RowOutcome, make_session
from .errors import BatchrunError, EndpointError, JobError, OutageError
from .fleet import fleet_for
from .jobchecks import BUILTIN
from .preflight import Access, read_access
from .prompts import render_prompts
from .retry import RetryLog, RetryPolicy
from .wire import builtin_path, codec_for, request_url

if TYPE_CHECKING:
    from .config import JobSpec

log = logging.getLogger("batchrun")

__all__ = ["GridPoint", "Stop", "TuneOptions", "TuneResult", "read_sample_prompts", "recommend", "tune_job"]

# The most prompts one request may carry, by protocol (config.RunSection.batch_size; openai-chat
# sends one conversation a request).
_PROTOCOL_MAX_BATCH = {"openai-chat": 1}
_MAX_BATCH = 4096
GAIN = 0.05  # a step must answer this much more (relative) to be worth climbing past
LATENCY_BLOWUP = 3.0  # p50 over this multiple of the lowest p50 at the batch size: queueing
SLOWER = 0.25  # a batch size whose best is this much below the best so far ends the tune
_MAX_ERRORS = 20  # failed requests in a whole tune before it stops climbing altogether


class Stop(enum.StrEnum):
    """Why a climb (or the whole tune) stopped at a point."""

    ERRORS = "errors"  # a request failed: sending stopped at once
    FLAT = "flat"  # prompts/s grew by less than GAIN over the step before
    LATENCY = "latency"  # p50 beyond LATENCY_BLOWUP x the lowest p50 at this batch size
    TOP = "max_concurrency"  # the top of the grid
    BUDGET = "budget"  # the time budget ran out
    LOST = "lost"  # the endpoint stopped accepting connections


@dataclass(frozen=True)
class TuneOptions:
    sample: int = 256  # prompts read from the start of the input
    max_batch: int = 64
    max_concurrency: int = 64
    point_s: float = 10.0  # the longest one grid point is measured
    budget_s: float = 300.0  # the longest the whole tune sends
    replica: int = 1  # 1-based: which of the job's endpoint URLs to tune


@dataclass(frozen=True)
class GridPoint:
    """One setting as measured: its rate, latency, requests and failed requests by class."""

    batch_size: int
    concurrency: int
    prompts_per_s: float
    p50_s: float | None
    p95_s: float | None
    requests: int
    errors: dict[str, int] = field(default_factory=dict)  # failed requests by class
    rejected: int = 0  # prompts refused alone (a 4xx for that prompt): the prompt's fault, not load
    stop: Stop | None = None  # set on the point where its batch size's climb stopped

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "batch_size": self.batch_size, "concurrency": self.concurrency,
            "in_flight_prompts": self.batch_size * self.concurrency,
            "prompts_per_s": round(self.prompts_per_s, 3),
            "p50_s": None if self.p50_s is None else round(self.p50_s, 4),
            "p95_s": None if self.p95_s is None else round(self.p95_s, 4),
            "requests": self.requests, "errors": self.error_count, "errors_by_class": dict(self.errors),
            "rejected_prompts": self.rejected, "stop": None if self.stop is None else str(self.stop),
        }


@dataclass(frozen=True)
class TuneResult:
    """The grid as measured, why the tune ended, and the setting it recommends (None: none ran clean)."""

    job: str
    url: str
    protocol: str
    sample: int
    points: tuple[GridPoint, ...]
    recommended: GridPoint | None
    stopped: str  # why the tune ended, in words
    duration_s: float

    def to_dict(self) -> dict[str, Any]:
        rec = self.recommended
        return {
            "job": self.job, "endpoint": self.url, "protocol": self.protocol, "sample_prompts": self.sample,
            "duration_s": round(self.duration_s, 2), "stopped": self.stopped,
            "points": [p.to_dict() for p in self.points],
            "recommended": None if rec is None else {
                "batch_size": rec.batch_size, "concurrency": rec.concurrency,
                "prompts_per_s": round(rec.prompts_per_s, 3),
                "in_flight_prompts": rec.batch_size * rec.concurrency,
            },
        }

    def lines(self) -> list[str]:
        """The table, the recommendation and a snippet to paste into the job file."""
        out = [
            f"tune: {self.job} against {self.url}"
            + (f" ({self.protocol})" if self.protocol != "custom" else "")
            + f", {self.sample} sample prompts, {self.duration_s:.1f}s",
            f"{'batch':>5}  {'concurrency':>11}  {'prompts/s':>10}  {'p50 s':>7}  {'p95 s':>7}  "
            f"{'requests':>8}  {'errors':<14}  stop",
        ]
        for p in self.points:
            errors = ", ".join(f"{n} {cause}" for cause, n in sorted(p.errors.items())) or "0"
            if p.rejected:
                errors += f" (+{p.rejected} rejected)"
            out.append(
                f"{p.batch_size:>5}  {p.concurrency:>11}  {p.prompts_per_s:>10.1f}  {_secs(p.p50_s):>7}  "
                f"{_secs(p.p95_s):>7}  {p.requests:>8}  {errors:<14}  {p.stop or ''}".rstrip()
            )
        out.append(f"stopped: {self.stopped}")
        rec = self.recommended
        if rec is None:
            return out
        out += [
            f"recommended: batch_size {rec.batch_size}, concurrency {rec.concurrency} "
            f"({rec.prompts_per_s:.1f} prompts/s, {rec.batch_size * rec.concurrency} prompts in flight)",
            "",
            "[run]",
            f"batch_size = {rec.batch_size}",
            f"concurrency = {rec.concurrency}",
            "",
            f'(or concurrency = "auto" with batch_size = {rec.batch_size}: the limit then follows the '
            "endpoint's load during each run)",
        ]
        return out


def _secs(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def tune_job(job: JobSpec | str | Path, options: TuneOptions | None = None) -> TuneResult:
    """Measure the job's endpoint over the grid and recommend a setting; writes nothing.

    Raises ``JobError`` (exit 2) for a job or options that cannot be tuned, ``EndpointError``
    (exit 4) when the endpoint does not answer the first request.
    """
    from .config import JobSpec
    from .inputcheck import open_job, with_input

    opts = options or TuneOptions()
    spec = with_input(job) if isinstance(job, JobSpec) else open_job(job)
    access = read_access(spec)
    urls = replica_urls(spec.api_base)
    if opts.replica > len(urls):
        raise JobError(
            f"{spec.job_path}: --replica {opts.replica}: endpoint.api_base names {len(urls)} "
            f"URL{'s' if len(urls) != 1 else ''}"
        )
    prompts = read_sample_prompts(spec, opts.sample)
    return asyncio.run(_tune(spec, access, urls[opts.replica - 1], prompts, opts))


def replica_urls(api_base: str | Sequence[str]) -> tuple[str, ...]:
    """The endpoint's URLs: ``api_base`` as one URL, or as a list of replicas (concurrency is per
    replica, so one of them is tuned)."""
    return (api_base,) if isinstance(api_base, str) else tuple(api_base)


def read_sample_prompts(spec: JobSpec, n: int) -> list[str]:
    """The first ``n`` prompts a run would send, from the start of the input (empty and invalid
    ones skipped); reads chunk by chunk and stops once it has them."""
    prompts: list[str] = []
    batches = source.iter_batches(spec, list(spec.prompt_columns), chunk_rows=min(n, 65536))
    try:
        for batch in batches:
            rendered = render_prompts(pa.Table.from_batches([batch]), spec)
            prompts += [t for t in rendered.text if t is not None]
            if len(prompts) >= n:
                break
    finally:
        close = getattr(batches, "close", None)  # a generator: let go of the file at once
        if close is not None:
            close()
    if not prompts:
        raise JobError(f"{spec.job_path}: input.path: the input holds no prompt to send (all empty or invalid)")
    return prompts[:n]


def _doubling(top: int) -> list[int]:
    values = [1]
    while values[-1] * 2 <= top:
        values.append(values[-1] * 2)
    return values


def grid_batch_sizes(spec: JobSpec, max_batch: int, sample: int) -> list[int]:
    """1, 2, 4, ... up to ``max_batch``, the protocol's limit and the sample's size."""
    return _doubling(max(1, min(max_batch, _PROTOCOL_MAX_BATCH.get(spec.protocol, _MAX_BATCH), sample)))


def stop_reason(point: GridPoint, before: GridPoint | None, lowest_p50: float | None) -> Stop | None:
    """Why the climb at ``point``'s batch size stops here (None: climb on). ``before`` is the
    point one step lower; ``lowest_p50`` the lowest p50 seen at this batch size, this one included."""
    if point.errors:
        return Stop.ERRORS
    if point.p50_s is not None and lowest_p50 is not None and point.p50_s > LATENCY_BLOWUP * lowest_p50:
        return Stop.LATENCY
    if before is not None and point.prompts_per_s < (1 + GAIN) * before.prompts_per_s:
        return Stop.FLAT
    return None


def recommend(points: Sequence[GridPoint]) -> GridPoint | None:
    """The fastest clean point, or a gentler one (smaller concurrency) within GAIN of it."""
    clean = [p for p in points if not p.errors and p.stop is not Stop.LATENCY and p.prompts_per_s > 0]
    if not clean:
        return None
    best = max(p.prompts_per_s for p in clean)
    near = [p for p in clean if p.prompts_per_s >= (1 - GAIN) * best]
    return min(near, key=lambda p: (p.concurrency, -p.prompts_per_s))


def _endpoint(spec: JobSpec, url: str) -> AbstractAsyncContextManager[str]:
    if url == BUILTIN:
        from .server import builtin_endpoint  # aiohttp's server side, only when asked for

        return builtin_endpoint(builtin_path(spec))
    return nullcontext(url)


class _FailureLog(RetryLog):
    """A worker's failed attempts, kept as data for its point (a tune logs no retry lines: it
    never retries)."""

    def __init__(self) -> None:
        super().__init__(logger=_SILENT)
        self.causes: list[str] = []
        self.last: tuple[str, str] = ("", "")

    def failed(self, cause: str, reason: str) -> None:
        self.causes.append(cause)
        self.last = (cause, reason)

    def tick(self, now: float | None = None) -> None:
        return


_SILENT = logging.Logger("batchrun.tune.silent")  # outside the logger tree: reaches no handler
_SILENT.addHandler(logging.NullHandler())


@dataclass
class _Request:
    started: float
    latency_s: float
    answered: int  # prompts answered
    failures: list[str]  # classes of its failed attempts
    in_window: bool  # started once every worker was running


@dataclass
class _Tally:
    """What a tune has seen so far, across points."""

    answered: bool = False
    errors: int = 0
    lost: str | None = None  # the endpoint stopped accepting connections: why
    first_failure: tuple[str, str] | None = None


async def _tune(spec: JobSpec, access: Access, target: str, prompts: list[str], opts: TuneOptions) -> TuneResult:
    started = time.monotonic()
    deadline = started + opts.budget_s
    sizes = grid_batch_sizes(spec, opts.max_batch, len(prompts))
    concurrencies = _doubling(opts.max_concurrency)
    policy = RetryPolicy(max_retries=0, base_s=spec.run.retry_backoff_s, cap_s=spec.run.retry_backoff_max_s,
                         retry_after_cap_s=spec.run.retry_after_max_s, outage_after=1_000_000)
    points: list[GridPoint] = []
    tally = _Tally()
    stopped = "the grid is done"
    async with _endpoint(spec, target) as base, make_session(
        concurrencies[-1], spec.timeout_s, access.ssl_context
    ) as session:
        shown = target if target != BUILTIN else f"builtin ({base})"
        best_so_far = 0.0
        for b in sizes:
            # One gate per batch size, shared by its points as a run's requests share one: the
            # job's rate limits are promises to the endpoint's owner, and hold in a tune too.
            rate = RateGate(spec.run.requests_per_minute, spec.run.prompts_per_minute, b)
            before: GridPoint | None = None
            lowest: float | None = None
            for c in concurrencies:
                if time.monotonic() >= deadline:
                    if before is not None:  # the point before ended just in time: its climb stops there
                        points[-1] = dataclasses.replace(before, stop=Stop.BUDGET)
                    break
                point = await _measure(
                    session, base, spec, access, policy, rate, prompts, b, c, before,
                    min(deadline, time.monotonic() + opts.point_s), tally,
                )
                if not tally.answered:
                    cause, reason = tally.first_failure or ("", "no answer")
                    raise EndpointError(
                        f"the endpoint did not answer the first request (batch_size {b}, concurrency {c}) "
                        f"at {shown}: {cause}: {reason}"
                    )
                if point.p50_s is not None and not point.errors:
                    lowest = point.p50_s if lowest is None else min(lowest, point.p50_s)
                why = stop_reason(point, before, lowest)
                if why is not Stop.ERRORS and tally.lost is not None:
                    why = Stop.LOST
                elif why is not Stop.ERRORS and time.monotonic() >= deadline:
                    why = Stop.BUDGET  # cut short: its figures say little about the step
                elif why is None and c == concurrencies[-1]:
                    why = Stop.TOP
                point = dataclasses.replace(point, stop=why)
                points.append(point)
                log.info(
                    "tune: batch %d, concurrency %d: %.1f prompts/s, p95 %s s, %d requests, %d failed%s",
                    b, c, point.prompts_per_s, _secs(point.p95_s), point.requests, point.error_count,
                    f"; climb stops ({why})" if why else "",
                )
                if why is not None:
                    break
                before = point
            at_b = [p for p in points if p.batch_size == b]
            best_here = max((p.prompts_per_s for p in at_b if not p.errors), default=0.0)
            if tally.lost is not None:
                stopped = f"the endpoint stopped accepting connections ({tally.lost})"
                break
            if time.monotonic() >= deadline:
                stopped = f"the time budget ({opts.budget_s:g}s) ran out"
                break
            if at_b and at_b[0].errors:
                stopped = f"batch size {b} failed at concurrency 1; larger batches were not tried"
                break
            if tally.errors >= _MAX_ERRORS:
                stopped = f"{tally.errors} requests failed in all; the tune stopped there"
                break
            if best_so_far and best_here < (1 - SLOWER) * best_so_far:
                stopped = f"batch size {b} was slower than smaller ones; larger batches were not tried"
                break
            best_so_far = max(best_so_far, best_here)
    return TuneResult(
        job=str(spec.job_path), url=shown, protocol=spec.protocol, sample=len(prompts), points=tuple(points),
        recommended=recommend(points), stopped=stopped, duration_s=time.monotonic() - started,
    )


async def _measure(
    session: aiohttp.ClientSession,
    base: str,
    spec: JobSpec,
    access: Access,
    policy: RetryPolicy,
    rate: RateGate,
    prompts: list[str],
    b: int,
    c: int,
    before: GridPoint | None,
    deadline: float,
    tally: _Tally,
) -> GridPoint:
    """Measure one grid point (see the module docstring); stops sending at its first failure."""
    # One replica with a fixed limit of c, as a run's fleet has it.
    fleet = fleet_for([base], c, c, b, policy, rate, answered_before=tally.answered)
    fleet.bind([request_url(spec, base)], [base])
    accounts: list[Accounting] = []  # one per worker: each call's wait for the rate limits is its own
    landed = asyncio.Condition()
    halt = asyncio.Event()
    requests: list[_Request] = []
    rejected = 0
    state = {"landed": 0, "running": 0, "window": 0, "next": 0}
    ramp_end: list[float] = []  # set once every worker runs
    closed: list[float] = []  # when sending stopped
    target = max(4 * c, math.ceil(len(prompts) / b))
    start = time.monotonic()
    # The step before's workers start spread over one of its round trips, so that they do not
    # answer in step (a burst of answers would start a burst of new requests); the new ones join
    # over the next two, each after one more answer has landed, so a server slower than it was is
    # not flooded and an overload is met by a request or two, not a burst.
    warm = max(before.concurrency if before else 0, 1)
    rtt = (before.p50_s or 0.0) if before else 0.0

    def close() -> None:
        if not closed:
            closed.append(time.monotonic())

    def answered_or_halted(answers: int) -> bool:
        return state["landed"] >= answers or halt.is_set()

    async def launch(tg: asyncio.TaskGroup) -> None:
        # One worker at a time, each gap measured from the start before it: a host too busy to
        # wake on time starts them late, never in a burst.
        for i in range(c):
            gap = 0.0 if i == 0 else rtt / warm if i < warm else 2 * rtt / (c - warm)
            try:
                await sleep_unless_stopped(min(gap, max(0.0, deadline - time.monotonic())), halt)
            except Stopping:
                return
            if i >= warm:
                async with landed:
                    try:
                        await asyncio.wait_for(
                            landed.wait_for(functools.partial(answered_or_halted, i - warm + 1)),
                            max(0.0, deadline - time.monotonic()),
                        )
                    except TimeoutError:
                        return
            if halt.is_set() or time.monotonic() >= deadline:
                return
            tg.create_task(worker())

    async def worker() -> None:
        nonlocal rejected
        state["running"] += 1
        if state["running"] == c:
            ramp_end.append(time.monotonic())
        failures = _FailureLog()
        account = Accounting()
        accounts.append(account)
        client = EndpointClient(
            session, fleet, codec_for(spec), policy, api_key=access.api_key, accounting=account,
            max_response_bytes=spec.max_response_bytes, retry_log=failures, headers=access.headers,
            secrets=access.secrets,
        )
        while True:
            if halt.is_set() or time.monotonic() >= deadline or state["window"] >= target:
                close()
                return
            k = state["next"]
            state["next"] = (k + b) % len(prompts)
            batch = [prompts[(k + j) % len(prompts)] for j in range(b)]
            in_window = bool(ramp_end)
            state["window"] += in_window
            seen = len(failures.causes)
            t0, waited = time.monotonic(), account.throttle_wait_s
            outcomes: list[RowOutcome | None] = [None] * b
            try:
                await client.process(batch, outcomes)
            except OutageError:
                # Answered before: only a connection refused ends here (see OutageVerdict.give_up).
                if tally.answered:
                    tally.lost = "{}: {}".format(*failures.last)
            # The request's own time: a wait for the job's rate limits is not the server's latency.
            latency = time.monotonic() - t0 - (account.throttle_wait_s - waited)
            answered = sum(1 for o in outcomes if o is not None and o.answer is not None)
            rejected += sum(1 for o in outcomes if o is not None and o.error_class == REJECTED)
            new = failures.causes[seen:]
            requests.append(_Request(t0, latency, answered, new, in_window))
            if answered:
                tally.answered = True
            if new:
                tally.errors += len(new)
                if tally.first_failure is None:
                    tally.first_failure = failures.last
                close()
                halt.set()
            async with landed:
                state["landed"] += 1
                landed.notify_all()
            if tally.lost is not None or (new and not tally.answered):
                return

    try:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(launch(tg))
    except BaseExceptionGroup as group:
        # A refused key or a redirect ends the tune as it ends a run: with batchrun's own error.
        ours = group.subgroup(lambda e: isinstance(e, BatchrunError))
        if ours is None:
            raise
        raise _first(ours) from None
    close()
    return _point(b, c, requests, sum(a.requests for a in accounts), rejected, start, ramp_end[0] if ramp_end else None, closed[0])


def _first(group: BaseExceptionGroup[BaseException]) -> BaseException:
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


def _point(
    b: int, c: int, requests: list[_Request], sent: int, rejected: int, start: float, ramp_end: float | None,
    closed: float,
) -> GridPoint:
    window = [r for r in requests if r.in_window]
    halted = any(r.failures for r in requests)
    if window and ramp_end is not None and closed > ramp_end and not halted:
        rate = sum(r.answered for r in window) / (closed - ramp_end)
    else:
        # Stopped by a failure, or before every worker ran: the whole point is the span.
        window = requests
        span = max((r.started + r.latency_s for r in requests), default=start) - start
        rate = sum(r.answered for r in requests) / span if span > 0 else 0.0
    latencies = sorted(r.latency_s for r in window if not r.failures and r.answered == b)
    errors = Counter(cause for r in requests for cause in r.failures)
    return GridPoint(
        batch_size=b, concurrency=c, prompts_per_s=rate, p50_s=_rank(latencies, 0.50), p95_s=_rank(latencies, 0.95),
        requests=sent, errors=dict(errors), rejected=rejected,
    )


def _rank(values: list[float], q: float) -> float | None:
    """The nearest-rank percentile of sorted ``values``."""
    if not values:
        return None
    return values[max(0, math.ceil(q * len(values)) - 1)]
