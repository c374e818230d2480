"""The fleet's rules on their own (issue 15): routing by spare room, overload pausing one replica,
taking a replica out of rotation and probing it back, the outage only when every replica is
out, and the per-replica figures. A fake clock; attempts are reported as the client reports them."""

from __future__ import annotations

import asyncio
import random
from collections import Counter

import pytest

from batchrun.adaptive import AimdLimit
from batchrun.admission import AttemptResult, FixedLimit
from batchrun.errors import OutageError
from batchrun.fleet import IN, OUT, PROBE_FIRST_S, Fleet, Latencies, Ticket
from batchrun.retry import INVALID, RetryPolicy

POLICY = RetryPolicy(max_retries=5, base_s=0.0, cap_s=0.0, outage_after=6)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def fleet_of(*limits: int, clock: Clock | None = None, auto: bool = False) -> Fleet:
    bases = [f"http://r{i}" for i in range(len(limits))]
    made = [AimdLimit(n, 16, initial=n) if auto else FixedLimit(n) for n in limits]
    return Fleet(bases, made, POLICY, clock=clock or Clock(), rng=random.Random(7))  # type: ignore[arg-type]


def ok(ticket: Ticket, fleet: Fleet, latency: float = 0.1) -> None:
    fleet.settle(ticket, AttemptResult(16, latency))
    fleet.answered(ticket)


def fail(ticket: Ticket, fleet: Fleet, cause: str, latency: float = 0.1, *, connect: bool = False) -> bool:
    fleet.settle(ticket, AttemptResult(16, latency, cause))
    return fleet.failed(ticket, cause, "test", connect)


def test_requests_go_to_the_replica_with_the_most_spare_room_and_wait_when_all_are_full() -> None:
    async def main() -> None:
        fleet = fleet_of(1, 2, 4)
        tickets = [await fleet.admit(16) for _ in range(7)]
        assert [r.in_flight for r in fleet.replicas] == [1, 2, 4]  # each filled to its limit
        # The first three went one to each (all empty: equal room); the fourth to the 4 (3/4 left).
        assert {t.replica.index for t in tickets[:3]} == {0, 1, 2}
        assert tickets[3].replica.index == 2
        waiting = asyncio.ensure_future(fleet.admit(16))
        await asyncio.sleep(0.01)
        assert not waiting.done()
        ok(tickets[1], fleet)  # the 2 gets room back
        assert (await asyncio.wait_for(waiting, 1)).replica is tickets[1].replica

    asyncio.run(main())


def test_work_splits_in_proportion_to_room_over_many_requests() -> None:
    """Answering in turn, oldest first, three replicas of limits 2, 4 and 8 take shares of about
    2:4:8 of the requests: the fast one gets more."""

    async def main() -> Counter[int]:
        fleet = fleet_of(2, 4, 8)
        seen: Counter[int] = Counter()
        live = [await fleet.admit(16) for _ in range(14)]
        for _ in range(700):
            done = live.pop(0)
            ok(done, fleet)
            t = await fleet.admit(16)
            seen[t.replica.index] += 1
            live.append(t)
        return seen

    seen = asyncio.run(main())
    assert 80 <= seen[0] <= 120 and 170 <= seen[1] <= 230 and 360 <= seen[2] <= 440, seen


def test_a_503_pauses_only_its_replica_and_its_burst_tail_counts_for_nothing() -> None:
    async def main() -> None:
        clock = Clock()
        fleet = Fleet(["http://a", "http://b"], [FixedLimit(4), FixedLimit(4)],
                      RetryPolicy(5, 1.0, 1.0, outage_after=3), clock=clock)
        a, b = fleet.replicas
        burst = [await fleet.admit(16, avoid=b) for _ in range(4)]
        assert all(t.replica is a for t in burst)
        clock.now += 0.1
        fail(burst[0], fleet, "http_503", latency=0.1)
        assert a.paused_until > clock.now and a.verdict.in_a_row == 1
        for t in burst[1:]:  # in flight when the pause began: the same news
            fail(t, fleet, "http_503", latency=0.1)
        assert a.verdict.in_a_row == 1 and a.state == IN
        others = [(await fleet.admit(16)).replica for _ in range(3)]
        assert a not in others  # b takes the work
        assert fleet.report()[0]["failures_by_class"] == {"http_503": 4}

    asyncio.run(main())


def test_fresh_overload_takes_a_replica_out_only_after_outage_after_failures_in_a_row() -> None:
    async def main() -> None:
        clock = Clock()
        fleet = fleet_of(4, 4, clock=clock)
        a = fleet.replicas[0]
        for n in range(1, POLICY.outage_after + 1):
            t = await fleet.admit(16, avoid=fleet.replicas[1])
            assert t.replica is a
            clock.now += 1.0  # each sent after the last pause: fresh
            fail(t, fleet, "http_429", latency=0.5)
            assert a.state == (IN if n < POLICY.outage_after else OUT), n
            a.paused_until = 0.0
        assert a.times_out == 1

    asyncio.run(main())


def test_a_refused_connection_takes_a_replica_out_at_once_and_a_probe_brings_it_back() -> None:
    async def main() -> None:
        clock = Clock()
        fleet = fleet_of(2, 2, clock=clock)
        a, b = fleet.replicas
        t = await fleet.admit(16)
        while t.replica is not a:
            ok(t, fleet)
            t = await fleet.admit(16)
        assert fail(t, fleet, "connection", connect=True) is True  # retried on b, not counted
        assert (a.state, a.times_out) == (OUT, 1)
        assert [(await fleet.admit(16)).replica for _ in range(2)] == [b, b]
        for r in fleet.replicas:
            r.in_flight = 0
        clock.now += PROBE_FIRST_S * 1.3
        probe = await fleet.admit(16)
        assert probe.replica is a and probe.probe
        # A failed probe: out again, for longer; its rows go to b without losing an attempt.
        assert fail(probe, fleet, "connection", connect=True) is True
        assert a.state == OUT and a.probe_backoff == 2 * PROBE_FIRST_S and a.times_out == 1
        clock.now += 2 * PROBE_FIRST_S * 1.3
        probe = await fleet.admit(16)
        assert probe.replica is a
        ok(probe, fleet)
        assert a.state == IN
        report = fleet.report()[0]
        assert report["in_rotation"] and report["times_taken_out"] == 1
        assert report["out_of_rotation_s"] == pytest.approx(PROBE_FIRST_S * 1.3 + 2 * PROBE_FIRST_S * 1.3)

    asyncio.run(main())


@pytest.mark.parametrize("cause", ["timeout", INVALID])
def test_three_timeouts_or_invalid_answers_in_a_row_take_a_replica_out_while_another_serves(cause: str) -> None:
    async def main() -> None:
        fleet = fleet_of(4, 4)
        a = fleet.replicas[0]
        for n in range(3):
            t = await fleet.admit(16, avoid=fleet.replicas[1])
            assert fail(t, fleet, cause) is False
            assert a.state == (IN if n < 2 else OUT)

    asyncio.run(main())


def test_one_replica_is_a_single_endpoint_connection_failures_alone_never_take_it_out() -> None:
    """With one URL the rules are today's: a refused connection is retried (the batch's give-up
    decides), and only outage_after failures in a row are an outage, worded as before."""

    async def main() -> None:
        fleet = fleet_of(4)
        for _ in range(POLICY.outage_after - 1):
            assert fail(await fleet.admit(16), fleet, "connection", connect=True) is False
        assert fleet.replicas[0].state == IN
        with pytest.raises(OutageError, match=r"^the endpoint failed 6 attempts in a row \(last: connection: test\)"):
            fail(await fleet.admit(16), fleet, "connection", connect=True)

    asyncio.run(main())


def test_the_run_is_an_outage_only_when_the_last_replica_in_rotation_goes() -> None:
    async def main() -> None:
        fleet = fleet_of(2, 2)
        a, b = fleet.replicas
        t = await fleet.admit(16, avoid=b)
        fail(t, fleet, "connection", connect=True)
        assert a.state == OUT and b.state == IN
        for _ in range(POLICY.outage_after - 1):  # the last one in rotation: judged by today's rule
            assert fail(await fleet.admit(16), fleet, "connection", connect=True) is False
        assert b.state == IN
        with pytest.raises(OutageError, match=r"^every replica is out of rotation \(http://r0: connection: test; "
                                              r"http://r1: connection: test\); last: the endpoint failed 6"):
            fail(await fleet.admit(16), fleet, "connection", connect=True)

    asyncio.run(main())


def test_auto_limits_are_per_replica_and_a_cut_on_one_leaves_the_others() -> None:
    async def main() -> None:
        clock = Clock()
        fleet = fleet_of(8, 8, clock=clock, auto=True)
        a, b = fleet.replicas
        t = await fleet.admit(16, avoid=b)
        clock.now += 0.1
        fail(t, fleet, "http_503")
        assert (a.limit.current, b.limit.current) == (4, 8)
        assert fleet.current_limit == 12 and fleet.limits == (4, 8) and fleet.cuts == 1

    asyncio.run(main())


def test_latency_quantiles_are_within_five_percent() -> None:
    lat = Latencies()
    values = [0.001 * (1.01**i) for i in range(1000)]
    for v in values:
        lat.add(v)
    ordered = sorted(values)
    for q in (0.5, 0.95):
        got = lat.quantile(q)
        assert got is not None and abs(got / ordered[int(q * len(ordered)) - 1] - 1) < 0.05
    assert Latencies().quantile(0.5) is None


@pytest.mark.parametrize("cause", ["http_400", "aborted"])
def test_a_probe_whose_batch_is_refused_alone_or_aborted_leaves_the_replica_to_be_probed_again(cause: str) -> None:
    """A 400 splits the batch and judges no replica; the probe must not leave it stuck half-way."""

    async def main() -> None:
        clock = Clock()
        fleet = fleet_of(2, 2, clock=clock)
        a, b = fleet.replicas
        fail(await fleet.admit(16, avoid=b), fleet, "connection", connect=True)
        assert a.state == OUT
        clock.now += PROBE_FIRST_S * 1.3
        probe = await fleet.admit(16)
        assert probe.replica is a and probe.probe
        fleet.settle(probe, AttemptResult(16, 0.1, cause))
        assert a.state == OUT and a.probe_at <= clock.now
        again = await fleet.admit(16)
        assert again.replica is a and again.probe
        ok(again, fleet)
        assert a.state == IN

    asyncio.run(main())


def test_a_retry_waits_for_another_replica_rather_than_going_back_to_the_one_that_failed_it() -> None:
    """A replica that fails at once always has the most room; the retry must still go elsewhere,
    and an attempt behind it that avoids nothing is not held up meanwhile."""

    async def main() -> None:
        fleet = fleet_of(1, 1)
        a, b = fleet.replicas
        first = await fleet.admit(16, avoid=b)
        held = await fleet.admit(16)
        assert (first.replica, held.replica) == (a, b)
        fail(first, fleet, "http_500")  # a is free again, b is full
        retry = asyncio.ensure_future(fleet.admit(16, avoid=a))
        fresh = asyncio.ensure_future(fleet.admit(16))
        await asyncio.sleep(0.01)
        assert not retry.done() and fresh.done() and fresh.result().replica is a
        ok(held, fleet)
        assert (await asyncio.wait_for(retry, 1)).replica is b

    asyncio.run(main())


def test_a_batch_out_of_attempts_on_a_refused_connection_is_an_outage_only_when_no_replica_is_left() -> None:
    async def main() -> None:
        fleet = fleet_of(2, 2)
        a, b = fleet.replicas
        t = await fleet.admit(16, avoid=b)
        fleet.settle(t, AttemptResult(16, 0.1, "connection"))
        fleet.give_up(t, "connection", "refused", True)  # b still serves: rows fail, retried next run
        assert a.state == OUT and b.state == IN
        t = await fleet.admit(16)
        assert t.replica is b
        fleet.settle(t, AttemptResult(16, 0.1, "connection"))
        with pytest.raises(OutageError, match=r"^every replica is out of rotation \(http://r0: connection: refused; "
                                              r"http://r1: connection: refused\); stopped early with progress kept"):
            fleet.give_up(t, "connection", "refused", True)

    asyncio.run(main())
