"""The replicas a run sends to (``endpoint.api_base``: one URL or a list), and the one seam the
client calls before and after every attempt.

``Fleet.admit`` waits for a replica with room and takes one of its places: the replica with the
most spare room (fewest requests in flight relative to its current limit; ties broken at random),
so a slow replica gets less work and a fast one more. ``Fleet.settle`` gives the place back and
tells the replica's ``Limit`` (fixed, or adaptive in ``adaptive.py``) how the attempt went; then
``answered`` or ``failed`` judge the replica's health. Concurrency is per replica: the engine
sizes its workers by ``max_in_flight``, the sum of the replicas' most.

Rules, per replica:

- **overload is not death**: a 429 or a 503 pauses that replica alone (``Retry-After``, capped by
  ``run.retry_after_max_s``, or a short jittered backoff) and, with ``concurrency = "auto"``,
  lowers its limit. Answers to requests sent before the replica last reacted (a pause, a cut) are
  the tail of a burst already in flight and count for nothing; fresh ones count like any failure.
- **out of rotation**: ``run.outage_after_failures`` failed attempts in a row (nothing valid coming
  back in between) take a replica out. While another replica is in rotation, some failures take
  it out sooner: a connection that cannot be made (at once), ``TAKE_OUT_AFTER`` timeouts or
  answers that never validate in a row. An out replica is probed with backoff
  (``PROBE_FIRST_S`` doubling to ``PROBE_MAX_S``): one real request is sent to it, and an answer
  puts it back in rotation (with ``auto``, its limit starts small again).
- **outage**: taking out the last replica in rotation ends the run as an outage (exit 4, progress
  kept). With one replica that is exactly the single-endpoint rule: the run-wide verdict and the
  replica's are one.
- an attempt that never reached a server (the connection could not be made) while another
  replica is in rotation is retried there at once and not counted against the row's
  ``max_retries`` (at most ``2 x replicas`` times per batch); every other attempt counts, on
  whichever replica it went to.

``requests_per_minute`` and ``prompts_per_minute`` stay limits on the whole run (``RateGate``).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .admission import AttemptResult, FixedLimit, Limit, RateGate, Stopping, _unless_stopped, sleep_unless_stopped
from .errors import OutageError
from .retry import INVALID, OutageVerdict, RetryPolicy

log = logging.getLogger("batchrun")

IN, OUT, PROBING = "in", "out", "probing"
# Overload answers: they pause the replica (never the run).
PAUSING = frozenset({"http_429", "http_503"})
# Answers that may be a burst's tail: counted only when sent after the replica's last reaction.
OVERLOAD = frozenset({"http_429", "http_503", "timeout"})
# With another replica in rotation: this many timeouts, or answers of which nothing validates, in
# a row take a replica out (a connection that cannot be made takes it out at once).
TAKE_OUT_AFTER = 3
PROBE_FIRST_S = 1.0
PROBE_MAX_S = 30.0


class Latencies:
    """A bounded histogram of latencies (buckets 5% wide from 0.1 ms): percentiles within 5%."""

    _BASE = 1e-4
    _STEP = math.log(1.05)

    def __init__(self) -> None:
        self._counts: Counter[int] = Counter()
        self.n = 0

    def add(self, seconds: float) -> None:
        self._counts[max(0, int(math.log(max(seconds, self._BASE) / self._BASE) / self._STEP))] += 1
        self.n += 1

    def quantile(self, q: float) -> float | None:
        if not self.n:
            return None
        rank, seen = q * self.n, 0
        for bucket in sorted(self._counts):
            seen += self._counts[bucket]
            if seen >= rank:
                # The bucket's middle: within 2.5% of any latency in it.
                return round(self._BASE * math.exp((bucket + 0.5) * self._STEP), 6)
        return None  # pragma: no cover - rank <= n always


@dataclass
class ReplicaStats:
    requests: int = 0
    prompts: int = 0
    answered: int = 0
    failures: Counter[str] = field(default_factory=Counter)
    latencies: Latencies = field(default_factory=Latencies)


class Replica:
    def __init__(self, index: int, base: str, limit: Limit, verdict: OutageVerdict):
        self.index = index
        self.base = base  # as the job names it (the URL of the builtin endpoint once started)
        self.url = base  # where requests are POSTed (Fleet.bind)
        self.limit = limit
        self.verdict = verdict
        self.in_flight = 0
        self.paused_until = 0.0
        self.last_reaction = float("-inf")  # when it last paused or cut for overload
        self.state = IN
        self.timeouts = 0  # in a row
        self.probe_at = 0.0
        self.probe_backoff = 0.0
        self.out_since: float | None = None
        self.out_s = 0.0
        self.times_out = 0
        self.last_failure = ""
        self.stats = ReplicaStats()

    def room(self) -> float:
        """Spare room: the share of its limit not in flight."""
        return 1.0 - self.in_flight / self.limit.current

    def report(self, now: float) -> dict[str, Any]:
        s = self.stats
        out = self.out_s + (now - self.out_since if self.out_since is not None else 0.0)
        return {
            "url": self.base,
            "requests": s.requests,
            "prompts": s.prompts,
            "answered": s.answered,
            "failures_by_class": dict(sorted(s.failures.items())),
            "latency_p50_s": s.latencies.quantile(0.5),
            "latency_p95_s": s.latencies.quantile(0.95),
            "out_of_rotation_s": round(out, 3),
            "times_taken_out": self.times_out,
            "in_rotation": self.state == IN,
            "concurrency_limit": self.limit.current,
        }


@dataclass
class Ticket:
    """One admitted attempt: where it goes, and how long it was throttled (waited for a rate limit
    or a pause once it had a place; the wait for a place is concurrency, not throttling)."""

    replica: Replica
    waited_s: float
    probe: bool = False
    fresh: bool = True  # set by settle: sent after the replica last reacted to overload

    @property
    def url(self) -> str:
        return self.replica.url


@dataclass
class _Waiter:
    turn: asyncio.Future[Replica]
    avoid: Replica | None


class Fleet:
    """Every replica of a run, their limits and health; shared by every request of the run."""

    def __init__(
        self,
        bases: Sequence[str],
        limits: Sequence[Limit],
        policy: RetryPolicy,
        rate: RateGate | None = None,
        *,
        answered_before: bool = False,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ):
        if not bases or len(bases) != len(limits):
            raise ValueError("a fleet needs one limit per replica, and at least one replica")
        self._policy = policy
        self._rate = rate
        self._clock = clock
        self._rng = rng or random.Random()
        # The run-wide verdict (has this job ever been answered; a batch out of attempts): with one
        # replica, the replica's own, so that one URL behaves exactly as a single endpoint.
        self.verdict = OutageVerdict(policy.outage_after, answered=answered_before)
        self.replicas = [
            Replica(
                i, base, limit,
                self.verdict if len(bases) == 1 else OutageVerdict(policy.outage_after, answered=answered_before),
            )
            for i, (base, limit) in enumerate(zip(bases, limits))
        ]
        self._waiters: collections.deque[_Waiter] = collections.deque()
        self._timer: asyncio.TimerHandle | None = None

    @classmethod
    def single(cls, url: str, policy: RetryPolicy, concurrency: int = 1_000_000, **kw: Any) -> Fleet:
        """One replica with a fixed limit (tools and tests that drive the client directly)."""
        return cls([url], [FixedLimit(concurrency)], policy, **kw)

    def bind(self, urls: Sequence[str], bases: Sequence[str] | None = None) -> None:
        """Where each replica's requests go (known once the endpoint is up: the builtin one's port)."""
        assert len(urls) == len(self.replicas)
        for i, (r, url) in enumerate(zip(self.replicas, urls)):
            r.url = url
            if bases is not None:
                r.base = bases[i]

    # -- figures ----------------------------------------------------------------------------------
    @property
    def size(self) -> int:
        return len(self.replicas)

    @property
    def max_in_flight(self) -> int:
        return sum(r.limit.max_in_flight for r in self.replicas)

    @property
    def adaptive(self) -> bool:
        return any(r.limit.adaptive for r in self.replicas)

    @property
    def current_limit(self) -> int | None:
        """Requests in flight allowed now, over every replica (None unless adaptive)."""
        return sum(r.limit.current for r in self.replicas) if self.adaptive else None

    @property
    def limits(self) -> tuple[int, ...]:
        return tuple(r.limit.current for r in self.replicas)

    @property
    def cuts(self) -> int:
        return sum(r.limit.cuts for r in self.replicas)

    def in_rotation(self) -> int:
        return sum(r.state == IN for r in self.replicas)

    def report(self) -> list[dict[str, Any]]:
        now = self._clock()
        return [r.report(now) for r in self.replicas]

    # -- before an attempt ------------------------------------------------------------------------
    async def admit(self, prompts: int, stop: asyncio.Event | None = None, avoid: Replica | None = None) -> Ticket:
        """Wait for a replica with room and take a place there; the run's rate limits and the
        replica's pause are waited out before returning. Raises ``Stopping`` once ``stop`` is
        set, holding nothing then."""
        started = self._clock()
        replica = None if self._waiters else self._pick(avoid)
        # Waiting for a place is concurrency, not throttling, unless a pause is what holds it.
        paused = replica is None and any(
            r.state == IN and r.in_flight < r.limit.current and started < r.paused_until for r in self.replicas
        )
        if replica is None:
            turn: asyncio.Future[Replica] = asyncio.get_running_loop().create_future()
            self._waiters.append(_Waiter(turn, avoid))
            self._wake()
            try:
                await _unless_stopped(asyncio.shield(turn), stop)
            except BaseException:
                if turn.done() and not turn.cancelled():
                    self._give_back(turn.result())  # handed a place that will not be used
                else:
                    turn.cancel()
                raise
            replica = turn.result()  # ``_wake`` took the place for this attempt
        else:
            self._take(replica)
        throttled = started if paused else self._clock()
        try:
            if self._rate is not None:
                await self._rate.wait(prompts, stop)
            # A pause that began while this attempt waited for its turn holds it too.
            while (left := replica.paused_until - self._clock()) > 0:
                await sleep_unless_stopped(left, stop)
        except BaseException:
            self._give_back(replica)
            raise
        return Ticket(replica, self._clock() - throttled, probe=replica.state == PROBING)

    def _take(self, r: Replica) -> None:
        if r.state == OUT:
            r.state = PROBING  # this attempt is its probe
        r.in_flight += 1

    def _give_back(self, r: Replica) -> None:
        r.in_flight -= 1
        if r.state == PROBING and r.in_flight == 0:
            r.state, r.probe_at = OUT, self._clock()  # the probe was never sent: another may go
        self._wake()

    def _pick(self, avoid: Replica | None) -> Replica | None:
        now = self._clock()
        for r in self.replicas:
            if r.state == OUT and r.in_flight == 0 and now >= r.probe_at:
                return r  # a probe is due: one request goes to it
        ready = [
            r for r in self.replicas
            if r.state == IN and r.in_flight < r.limit.current and now >= r.paused_until
        ]
        if avoid is not None and any(r is not avoid for r in ready):
            ready = [r for r in ready if r is not avoid]  # a retry goes elsewhere when it can
        if not ready:
            return None
        best = max(r.room() for r in ready)
        return self._rng.choice([r for r in ready if r.room() >= best - 1e-9])

    def _wake(self) -> None:
        """Hand free places to waiting attempts, in order; set a timer for the next pause's end
        or probe when some still wait."""
        while self._waiters:
            head = self._waiters[0]
            if head.turn.done():
                self._waiters.popleft()  # its admit was stopped meanwhile
                continue
            r = self._pick(head.avoid)
            if r is None:
                break
            self._waiters.popleft()
            self._take(r)
            head.turn.set_result(r)
        if self._waiters:
            self._arm_timer()

    def _arm_timer(self) -> None:
        now = self._clock()
        moments = [r.paused_until for r in self.replicas if r.state == IN and r.paused_until > now]
        moments += [r.probe_at for r in self.replicas if r.state == OUT and r.probe_at > now]
        if not moments:
            return
        delay = min(moments) - now + 0.001
        loop = asyncio.get_running_loop()
        if self._timer is not None and self._timer.when() <= loop.time() + delay:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer = loop.call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._wake()

    # -- after an attempt -------------------------------------------------------------------------
    def settle(self, ticket: Ticket, result: AttemptResult) -> None:
        """Give the place back and feed the replica's limit; called once per admitted attempt,
        before anything else is sent; never raises."""
        r = ticket.replica
        now = self._clock()
        if result.cause == "not_sent":
            self._give_back(r)
            return
        r.in_flight -= 1
        ticket.fresh = now - result.latency_s >= r.last_reaction
        r.stats.requests += 1
        r.stats.prompts += result.prompts
        if result.cause is None:
            r.stats.latencies.add(result.latency_s)
        elif result.cause != "aborted":
            r.stats.failures[result.cause] += 1
        reacted = r.limit.observe(result, now, ticket.fresh)
        if result.cause in PAUSING:
            # Overload pauses this replica only: everyone else's requests carry on.
            r.paused_until = max(r.paused_until, now + self._policy.delay(1, result.retry_after))
            reacted = reacted or ticket.fresh
        if reacted:
            r.last_reaction = now
        if ticket.probe and r.state == PROBING and (result.cause == "aborted" or _refused_alone(result.cause)):
            # The probe's batch was refused for its own sake (or the run is ending): it says
            # nothing of the replica's health, and nothing will judge it; another request probes.
            r.state, r.probe_at = OUT, now
        self._wake()

    def answered(self, ticket: Ticket) -> None:
        """The attempt gave at least one valid answer."""
        r = ticket.replica
        r.stats.answered += 1
        r.timeouts = 0
        r.verdict.answer()
        self.verdict.answer()
        if r.state != IN:
            now = self._clock()
            if r.out_since is not None:
                r.out_s += now - r.out_since
            log.info("replica %s answered again: back in rotation after %.1fs out", r.base, now - (r.out_since or now))
            r.state, r.out_since, r.probe_backoff = IN, None, 0.0
            r.limit.reset()
            self._wake()

    def failed(self, ticket: Ticket, cause: str, reason: str, connect: bool = False) -> bool:
        """The attempt gave nothing valid (a transient failure or an invalid answer). Judge the
        replica: take it out of rotation when the rules say so, raising ``OutageError`` when it
        was the last one in rotation. Returns True when the attempt may be retried on another
        replica without counting against the row (it never reached a server)."""
        r = ticket.replica
        if cause in OVERLOAD and not ticket.fresh:
            return False  # the tail of a burst the replica already reacted to: no news
        if r.state == OUT:
            return False  # sent before it was taken out: no news either
        r.timeouts = r.timeouts + 1 if cause == "timeout" else 0
        r.last_failure = f"{cause}: {reason}"
        others = any(o is not r and o.state == IN for o in self.replicas)
        try:
            r.verdict.failure(cause, reason)
        except OutageError as exc:
            if not others:
                self._take_out(r, f"{r.verdict.in_a_row} failed attempts in a row")
                if self.size == 1:
                    raise
                raise OutageError(f"every replica is out of rotation ({self._why_out()}); last: {exc}") from None
            self._take_out(r, f"{r.verdict.in_a_row} failed attempts in a row (last: {r.last_failure})")
            return False
        if r.state == PROBING and ticket.probe:
            self._take_out(r, f"its probe failed ({r.last_failure})")
            return False
        if r.state != IN or not others:
            return False
        if connect:
            self._take_out(r, f"cannot connect ({reason})")
            return True
        if r.timeouts >= TAKE_OUT_AFTER:
            self._take_out(r, f"{r.timeouts} timeouts in a row")
        elif cause == INVALID and r.verdict.invalid_in_a_row >= TAKE_OUT_AFTER:
            self._take_out(r, f"{r.verdict.invalid_in_a_row} answers in a row failed validation (last: {reason})")
        return False

    def _take_out(self, r: Replica, why: str) -> None:
        now = self._clock()
        if r.state == IN:
            r.times_out += 1
            r.out_since = now
        r.state = OUT
        r.probe_backoff = min(PROBE_MAX_S, max(PROBE_FIRST_S, 2 * r.probe_backoff))
        r.probe_at = now + r.probe_backoff * self._rng.uniform(0.8, 1.2)
        if self.size > 1:
            log.warning(
                "replica %s out of rotation: %s; %d of %d in rotation; probing it again in %.1fs",
                r.base, why, self.in_rotation(), self.size, r.probe_at - now,
            )
        self._wake()

    def _why_out(self) -> str:
        return "; ".join(f"{r.base}: {r.last_failure or 'out'}" for r in self.replicas)


def _refused_alone(cause: str | None) -> bool:
    """A 4xx that is not retried (``client.RETRY_STATUSES``): the batch is split, the replica not judged."""
    return cause is not None and cause.startswith("http_4") and cause not in ("http_408", "http_409", "http_425", "http_429")


def fleet_for(
    bases: Sequence[str],
    concurrency: int | str,
    max_concurrency: int,
    batch_size: int,
    policy: RetryPolicy,
    rate: RateGate | None = None,
    *,
    answered_before: bool = False,
) -> Fleet:
    """A run's fleet: per replica a fixed limit of ``concurrency``, or (``"auto"``) an adaptive one."""
    limits: list[Limit]
    if concurrency == "auto":
        from .adaptive import AimdLimit

        limits = [AimdLimit(max_concurrency, batch_size) for _ in bases]
    else:
        assert isinstance(concurrency, int)
        limits = [FixedLimit(concurrency) for _ in bases]
    return Fleet(bases, limits, policy, rate, answered_before=answered_before)


__all__ = ["Fleet", "Latencies", "Replica", "Stopping", "Ticket", "fleet_for"]
