"""Admission's parts: what an attempt reports, the run's rate limits, and the limit of requests
in flight one replica may have (``Limit``), fixed here and adaptive in ``adaptive.py``.

The seam the client calls before and after every attempt is ``fleet.Fleet`` (``admit`` picks a
replica with room and takes one of its places; ``settle`` gives it back and feeds the replica's
``Limit``). A ``Limit`` is the concurrency algorithm alone: it says how many requests may be in
flight to its replica now (between 1 and ``max_in_flight``), and hears every attempt's result.

What a ``Limit`` must guarantee: ``current`` is always between 1 and ``max_in_flight``;
``observe`` never blocks and returns True when it lowered the limit (a reaction to overload, so
the fleet can tell a burst's tail from news); ``reset`` starts it afresh (its replica was out of
rotation and is back).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Protocol

from aiolimiter import AsyncLimiter


class Stopping(Exception):
    """The run is stopping: no new attempt starts, and waits end at once."""


@dataclass(frozen=True)
class AttemptResult:
    """How one attempt went, as admission hears it."""

    prompts: int
    latency_s: float
    # None: the endpoint gave at least one valid answer; else the failure's class (http_429,
    # timeout, connection, invalid_response, http_400, ...), "not_sent" or "aborted".
    cause: str | None = None
    retry_after: float | None = None  # the endpoint's Retry-After, in seconds


class Limit(Protocol):
    """How many requests may be in flight to one replica: the concurrency algorithm's seam."""

    adaptive: bool

    @property
    def max_in_flight(self) -> int: ...

    @property
    def current(self) -> int: ...

    @property
    def cuts(self) -> int:
        """How many times the limit was lowered."""
        ...

    def observe(self, result: AttemptResult, now: float, fresh: bool) -> bool:
        """Hear how an attempt went (``fresh``: it was sent after the replica last reacted to
        overload); return True when the limit was lowered."""
        ...

    def reset(self) -> None: ...


class FixedLimit:
    """``run.concurrency`` requests in flight at most. Overload lowers it all the same: a fresh 429
    or 503 cuts it by a quarter (a replica shedding load is sent less, not hammered at the same
    rate), and every answer raises it by ``1/limit`` (one a round trip) back up to ``concurrency``.
    A server that never sheds is always sent ``concurrency``."""

    adaptive = False

    def __init__(self, concurrency: int):
        self._n = concurrency
        self.limit = float(concurrency)
        self._cuts = 0

    @property
    def max_in_flight(self) -> int:
        return self._n

    @property
    def current(self) -> int:
        return max(1, int(self.limit))

    @property
    def cuts(self) -> int:
        return self._cuts

    def observe(self, result: AttemptResult, now: float, fresh: bool) -> bool:
        if result.cause in ("http_429", "http_503"):
            if fresh:
                self.limit = max(1.0, self.limit * 0.75)
                self._cuts += 1
                return True
            return False
        if result.cause is None and self.limit < self._n:
            self.limit = min(float(self._n), self.limit + 1.0 / self.limit)
        return False

    def reset(self) -> None:
        self.limit = float(self._n)


class RateGate:
    """The run's rate limits (``requests_per_minute``, ``prompts_per_minute``), shared by every
    request to every replica.

    Buckets hold one request and one batch of prompts, so the rate is held evenly from the first
    second instead of allowing a minute's worth in a burst.
    """

    def __init__(self, requests_per_minute: float | None, prompts_per_minute: float | None, batch_size: int):
        self._requests = AsyncLimiter(1, 60.0 / requests_per_minute) if requests_per_minute else None
        self._batch = batch_size
        self._prompts = (
            AsyncLimiter(batch_size, batch_size * 60.0 / prompts_per_minute) if prompts_per_minute else None
        )

    async def wait(self, prompts: int, stop: asyncio.Event | None = None) -> None:
        """Wait for a turn to send ``prompts`` prompts; raise ``Stopping`` once ``stop`` is set."""
        if self._requests is not None:
            await _unless_stopped(self._requests.acquire(), stop)
        if self._prompts is not None:
            await _unless_stopped(self._prompts.acquire(min(prompts, self._batch)), stop)


async def sleep_unless_stopped(seconds: float, stop: asyncio.Event | None) -> None:
    """Sleep ``seconds``; raise ``Stopping`` at once if ``stop`` is or becomes set."""
    if stop is None:
        await asyncio.sleep(seconds)
        return
    if stop.is_set():
        raise Stopping
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except TimeoutError:
        return
    raise Stopping


async def _unless_stopped(waiting: Any, stop: asyncio.Event | None) -> None:
    """Await ``waiting`` (a limiter's turn), giving it up with ``Stopping`` if ``stop`` is set."""
    if stop is None:
        await waiting
        return
    turn = asyncio.ensure_future(waiting)
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait((turn, stopped), return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
        if not turn.done():
            turn.cancel()
    if stop.is_set() and (turn.cancelled() or not turn.done()):
        raise Stopping
    turn.result()
