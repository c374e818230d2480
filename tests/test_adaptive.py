"""Adaptive concurrency (issue 15, ``run.concurrency = "auto"``): the controller on its own (a
fake clock, synthetic attempts) and whole runs against the reference endpoint's capacity model."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from conftest import MakeJob, assert_exact, cli, prompt_rows
from endpoint import LiveEndpoint

from batchrun import run_job
from batchrun.adaptive import AimdLimit
from batchrun.admission import AttemptResult, Stopping
from batchrun.fleet import Fleet, Ticket
from batchrun.retry import RetryPolicy
from batchrun.server import ServerOptions


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Gate:
    """One replica with an AIMD limit on a fake clock, driven as the client drives it: ``admit``
    before an attempt, ``settle`` (then ``failed`` or ``answered``) after it, oldest first."""

    def __init__(self, **kw: object):
        self.clock = Clock()
        self.aimd = AimdLimit(64, 16, **kw)  # type: ignore[arg-type]
        self.fleet = Fleet(["http://r"], [self.aimd], RetryPolicy(10, 0.0, 0.0), clock=self.clock)
        self.tickets: list[Ticket] = []

    @property
    def current_limit(self) -> int:
        return self.aimd.current

    @property
    def limit(self) -> float:
        return self.aimd.limit

    @property
    def slow_start(self) -> bool:
        return self.aimd.slow_start

    @property
    def cuts(self) -> int:
        return self.aimd.cuts

    @property
    def in_flight(self) -> int:
        return self.fleet.replicas[0].in_flight

    async def admit(self, prompts: int = 16, stop: asyncio.Event | None = None) -> None:
        self.tickets.append(await self.fleet.admit(prompts, stop))

    def settle(self, result: AttemptResult) -> Ticket:
        ticket = self.tickets.pop(0)
        self.fleet.settle(ticket, result)
        if result.cause is None:
            self.fleet.answered(ticket)
        else:
            self.fleet.failed(ticket, result.cause, "test")
        return ticket


def gate(**kw: object) -> tuple[Gate, Clock]:
    g = Gate(**kw)
    return g, g.clock


def answered(latency: float = 0.1) -> AttemptResult:
    return AttemptResult(16, latency)


async def cycle(g: Gate, result: AttemptResult) -> None:
    await g.admit(16)
    g.settle(result)


class Slots:
    """A closed loop on a fake clock: a server with ``slots`` requests served side by side at
    ``base_s`` each, first come first served; past them a request waits its turn (latency grows,
    prompts/s stays flat), as the reference endpoint's capacity model does. The limit is kept full,
    as the client keeps it; every answer is fed to ``observe`` as it lands."""

    def __init__(self, limit: AimdLimit, slots: int, base_s: float = 0.1):
        self.limit, self.base = limit, base_s
        self.free = [0.0] * slots  # when each slot is next free
        self.now = 0.0
        self.flying: list[tuple[float, float]] = []  # (lands at, sent at)
        self.answered = 0

    def run(self, seconds: float) -> list[int]:
        """Run for ``seconds``; the limit after each answer."""
        seen: list[int] = []
        end = self.now + seconds
        while self.now < end:
            while len(self.flying) < self.limit.current:
                slot = min(range(len(self.free)), key=self.free.__getitem__)
                self.free[slot] = max(self.now, self.free[slot]) + self.base
                self.flying.append((self.free[slot], self.now))
            self.flying.sort()
            lands, sent = self.flying.pop(0)
            self.now = lands
            self.limit.observe(AttemptResult(16, lands - sent), self.now, True)
            self.answered += 1
            seen.append(self.limit.current)
        return seen


def test_slow_start_climbs_while_throughput_grows_and_settles_within_half_again_of_the_knee() -> None:
    """On a server with 8 slots, prompts/s grows up to 8 in flight and is flat beyond (latency
    grows): the limit climbs by half a round trip while each epoch gains, leaves slow start when
    throughput stops growing, and settles between the knee and the ceiling (1.5 times the best
    epoch's in-flight), with no cut needed to get there and no drift upward over time."""
    limit = AimdLimit(64, 16)
    server = Slots(limit, slots=8)
    assert (limit.current, limit.slow_start) == (2, True)
    early = server.run(1.0)
    assert max(early) > 2  # it climbed
    seen = server.run(30.0)
    assert not limit.slow_start
    assert 8 <= limit.best_in_flight <= 10
    assert limit.ceiling == pytest.approx(1.5 * limit.best_in_flight)
    late = seen[len(seen) // 2:]
    assert min(late) >= 8 and max(late) <= limit.ceiling + 1  # at the knee, never past the ceiling
    assert limit.cuts == 0


def test_a_limit_above_the_ceiling_with_no_gain_comes_down_by_tenths_never_below_it() -> None:
    """Latency alone does not move the limit below the ceiling (a batching server answers each
    request more slowly with more in flight while answering more prompts). A limit far above it
    (set by hand here: latency four times the lowest, no gain) comes down by a tenth at most once
    a round trip, never below the ceiling."""
    limit = AimdLimit(64, 16)
    server = Slots(limit, slots=8)
    server.run(20.0)
    ceiling = limit.ceiling
    assert 8 <= limit.current <= ceiling + 1 and limit.cuts == 0
    limit.limit = 40.0
    seen = server.run(10.0)
    assert limit.cuts >= 4 and limit.current <= 24  # came down by cuts
    assert min(seen) >= int(ceiling)
    drops = [a - b for a, b in zip(seen, seen[1:]) if b < a]
    assert drops and all(d <= 4 for d in drops)  # a tenth at a time, not a collapse


def test_overload_cuts_once_per_burst_halving_in_slow_start_and_brings_the_ceiling_down_to_the_limit() -> None:
    fresh = AimdLimit(64, 16, initial=16)
    assert fresh.slow_start and fresh.observe(AttemptResult(16, 0.1, "http_429"), 1.0, True)
    assert fresh.current == 8 and not fresh.slow_start  # halved in slow start
    limit = AimdLimit(64, 16)
    server = Slots(limit, slots=64)
    server.run(2.0)  # climbing on a server this large, past slow start
    assert not limit.slow_start and limit.current >= 16 and limit.ceiling > limit.limit
    start = limit.limit
    now = server.now
    limit.observe(AttemptResult(16, 0.1, "http_429"), now, True)
    assert limit.limit == pytest.approx(start * 0.75) and limit.cuts == 1
    # Answers to requests sent before the cut are not news: no second cut.
    assert limit.observe(AttemptResult(16, 0.1, "timeout"), now, False) is False
    assert limit.limit == pytest.approx(start * 0.75) and limit.cuts == 1
    # One sent after it and still refused: a quarter off again.
    assert limit.observe(AttemptResult(16, 0.1, "http_503"), now + 1, True) is True
    assert limit.limit == pytest.approx(start * 0.75**2) and limit.cuts == 2
    assert limit.ceiling == pytest.approx(limit.limit)  # probes no higher than where refused
    # Neither a failure that says nothing of load nor a small batch is a cut.
    limit.observe(AttemptResult(16, 0.1, "invalid_response"), now + 2, True)
    limit.observe(AttemptResult(3, 0.01), now + 2, True)
    assert limit.cuts == 2


def test_a_cut_at_the_floor_of_one_is_not_counted() -> None:
    limit = AimdLimit(64, 16, initial=1)
    assert limit.observe(AttemptResult(16, 0.1, "http_503"), 10.0, True) is False
    assert limit.current == 1 and limit.cuts == 0


def test_reset_forgets_throughput_and_starts_slow_again() -> None:
    limit = AimdLimit(64, 16)
    Slots(limit, slots=8).run(10.0)
    assert limit.best_rate > 0 and not limit.slow_start
    limit.reset()
    assert (limit.current, limit.slow_start, limit.best_rate, limit.best_in_flight) == (2, True, 0.0, 0.0)


def test_admit_waits_for_room_under_the_limit_and_a_stopped_wait_holds_nothing() -> None:
    async def main() -> None:
        g, _ = gate(initial=2)
        await g.admit(16)
        await g.admit(16)
        third = asyncio.ensure_future(g.admit(16))
        await asyncio.sleep(0.02)
        assert not third.done() and g.in_flight == 2
        g.settle(AttemptResult(16, 0.1, "http_503"))  # frees a place but halves the limit to 1
        await asyncio.sleep(0.02)
        assert not third.done() and g.in_flight == 1
        g.settle(answered())
        await asyncio.wait_for(third, 1)
        while g.in_flight < g.current_limit:  # fill the room there is
            await g.admit(16)
        held = g.in_flight
        stop = asyncio.Event()
        fourth = asyncio.ensure_future(g.admit(16, stop))
        await asyncio.sleep(0.02)
        assert not fourth.done()
        stop.set()
        with pytest.raises(Stopping):
            await asyncio.wait_for(fourth, 1)
        assert g.in_flight == held
        for _ in range(held):
            g.settle(answered())
        assert g.in_flight == 0 and not g.fleet._waiters

    asyncio.run(main())


def test_auto_finds_the_capacity_of_a_server_that_sheds_load_and_the_output_is_exact(
    tmp_path: Path, make_job: MakeJob
) -> None:
    """A server with 64 prompt slots that sheds with 503 past 128 prompts in flight: with
    ``concurrency = "auto"`` (up to 64 requests of 16 prompts) the run ends exact, settles at
    about capacity (4 requests of 16 prompts), and almost nothing is shed."""
    rows = prompt_rows(3000)
    options = ServerOptions(latency_s=0.05, capacity_prompts=64, queue_prompts=64)
    with LiveEndpoint(options) as ep:
        job = make_job(rows, url=ep.url, run={"batch_size": 16, "concurrency": "auto", "max_concurrency": 64,
                                              "max_retries": 10})
        summary = run_job(job.path)
        shed = ep.stats.shed
    print(f"auto: {summary.requests} requests, {shed} shed, limit at the end {summary.concurrency_limit}, "
          f"{summary.concurrency_cuts} cuts, {summary.duration_s:.1f}s")
    assert summary.exit_code == 0
    assert_exact(job.output(), rows)
    assert summary.concurrency_limit is not None and 3 <= summary.concurrency_limit <= 10
    assert shed <= 0.03 * summary.requests, f"{shed} of {summary.requests} requests shed"
    assert job.summary()["concurrency_limit"] == summary.concurrency_limit


def test_concurrency_auto_is_validated_and_shown(make_job: MakeJob) -> None:
    with LiveEndpoint() as ep:
        job = make_job(8, url=ep.url, run={"concurrency": "fast"})
        refused = cli("validate", job.path)
        job = make_job(8, url=ep.url, run={"concurrency": "auto", "max_concurrency": 32})
        shown = cli("validate", job.path)
    assert refused.returncode == 2
    assert 'run.concurrency: must be an integer or "auto" (got \'fast\')' in refused.stderr
    assert shown.returncode == 0 and "in flight: adaptive, 1 to 32" in shown.stdout


def test_overload_answers_to_requests_sent_before_the_cut_do_not_count_toward_an_outage() -> None:
    """A burst shed at once is one piece of news: the first 503 counts and cuts the limit; 503s
    to requests sent before that cut do not count; a 503 to a request sent after it does."""

    async def main() -> None:
        g, clock = gate(initial=8)
        verdict = g.fleet.replicas[0].verdict
        for _ in range(4):
            await g.admit(16)
        clock.now += 0.05
        g.settle(AttemptResult(16, 0.05, "http_503"))
        assert verdict.in_a_row == 1 and g.cuts == 1
        clock.now += 0.01
        g.settle(AttemptResult(16, 0.06, "http_503"))  # sent 0.06 s ago, before the cut
        assert verdict.in_a_row == 1
        g.settle(AttemptResult(16, 0.06, "timeout"))
        assert verdict.in_a_row == 1
        await g.admit(16)
        clock.now += 0.02
        g.settle(AttemptResult(16, 0.01, "http_503"))  # sent after the cut: the cut did not help
        assert verdict.in_a_row == 2 and g.cuts == 2
        await g.admit(16)
        g.settle(answered())
        assert verdict.in_a_row == 0

    asyncio.run(main())
