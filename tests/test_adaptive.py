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


def test_slow_start_doubles_then_additive_increase_while_latency_stays_flat() -> None:
    async def main() -> None:
        g, clock = gate()
        assert (g.current_limit, g.slow_start) == (2, True)
        for _ in range(10):
            await cycle(g, answered())
        assert g.current_limit == 12  # +1 per answer in slow start
        assert g.in_flight == 0
        await cycle(g, AttemptResult(16, 0.1, "http_503"))
        assert (g.current_limit, g.slow_start) == (6, False)  # halved, slow start over
        before = g.limit
        for _ in range(12):
            await cycle(g, answered())
        assert before + 1.5 < g.limit < before + 2.5  # about +1/limit per answer
        assert g.cuts == 1

    asyncio.run(main())


def test_overload_cuts_once_per_round_trip_and_a_latency_rise_cuts_by_a_tenth() -> None:
    async def main() -> None:
        g, clock = gate(initial=40)
        for _ in range(3):
            await cycle(g, answered(0.1))
        limit = g.limit
        await cycle(g, AttemptResult(16, 0.1, "http_429"))
        await cycle(g, AttemptResult(16, 0.1, "timeout"))  # the same round trip: no second cut
        assert g.limit == pytest.approx(limit * 0.5) and g.cuts == 1
        clock.now += 1.0
        await cycle(g, AttemptResult(16, 0.1, "http_503"))
        assert g.limit == pytest.approx(limit * 0.5 * 0.75) and g.cuts == 2
        clock.now += 1.0
        cut = g.limit
        for _ in range(8):  # latency doubled: the server queues
            await cycle(g, answered(0.25))
        assert g.limit == pytest.approx(cut * 0.9) and g.cuts == 3  # once: the rest in the same round trip
        await cycle(g, AttemptResult(16, 0.1, "invalid_response"))
        await cycle(g, AttemptResult(3, 0.01))  # a small batch: not a latency sample
        assert g.cuts == 3

    asyncio.run(main())


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
