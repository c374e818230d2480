"""Admission: what the client asks before every attempt and tells after it (one seam).

``Admission.admit`` waits for a turn to send; ``Admission.settle`` hears how the attempt went.
Admission owns concurrency: ``admit`` takes one of its slots of attempts in flight and
``settle`` gives it back, and the engine sizes its pool of workers (and the connection pool) by
``max_in_flight``, the most it will ever admit at once. Today's implementation,
``FixedAdmission``, has ``run.concurrency`` slots, the run's shared rate limits and the pause a
429 imposes on every request. An adaptive controller is a new implementation whose limit moves
between 1 and ``max_in_flight`` from what ``settle`` hears.

What an implementation must guarantee: ``admit`` returns the seconds it waited, holding a slot;
it raises ``Stopping`` at once when the run's stop event is or becomes set (a stopping run sends
nothing new), holding nothing then; ``settle`` is called exactly once for every ``admit`` that
returned (with cause ``"not_sent"`` when the caller sent nothing after all), releases the slot,
and never blocks.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any, Protocol

from aiolimiter import AsyncLimiter

from .retry import RetryPolicy


class Stopping(Exception):
    """The run is stopping: no new attempt starts, and waits end at once."""


@dataclass(frozen=True)
class AttemptResult:
    """How one attempt went, as admission hears it."""

    prompts: int
    latency_s: float
    cause: str | None = None  # None: the endpoint answered; else the failure's class (http_429, timeout, ...)
    retry_after: float | None = None  # the endpoint's Retry-After, in seconds


class Admission(Protocol):
    @property
    def max_in_flight(self) -> int: ...

    @property
    def current_limit(self) -> int | None:
        """The attempts in flight allowed now, when it moves (None: always ``max_in_flight``)."""
        ...

    @property
    def cuts(self) -> int:
        """How many times the limit was lowered."""
        ...

    async def admit(self, prompts: int, stop: asyncio.Event | None = None) -> float: ...

    def settle(self, result: AttemptResult) -> None: ...

    def counts_toward_outage(self) -> bool:
        """Whether the attempt settled last, if it failed, is evidence that the endpoint is down
        (asked right after ``settle``)."""
        ...


class FixedAdmission:
    """Shared by every request of a run: ``concurrency`` attempts in flight at most, smooth rate
    limits and the pause a 429 imposes on all.

    Buckets hold one request and one batch of prompts, so the rate is held evenly from the first
    second instead of allowing a minute's worth in a burst.
    """

    def __init__(
        self,
        concurrency: int,
        requests_per_minute: float | None,
        prompts_per_minute: float | None,
        batch_size: int,
        policy: RetryPolicy | None = None,
    ):
        self._policy = policy or RetryPolicy(max_retries=0, base_s=1.0, cap_s=60.0)
        self._requests = AsyncLimiter(1, 60.0 / requests_per_minute) if requests_per_minute else None
        self._batch = batch_size
        self._prompts = (
            AsyncLimiter(batch_size, batch_size * 60.0 / prompts_per_minute) if prompts_per_minute else None
        )
        self._paused_until = 0.0
        self._concurrency = concurrency
        self._slots = asyncio.Semaphore(concurrency)

    @property
    def max_in_flight(self) -> int:
        return self._concurrency

    @property
    def current_limit(self) -> int | None:
        return None

    @property
    def cuts(self) -> int:
        return 0

    def settle(self, result: AttemptResult) -> None:
        self._slots.release()
        if result.cause == "http_429":
            # The endpoint is saturated: everyone backs off, not only this request.
            self.pause(self._policy.delay(1, result.retry_after))

    def counts_toward_outage(self) -> bool:
        return True

    def pause(self, seconds: float) -> None:
        self._paused_until = max(self._paused_until, time.monotonic() + seconds)

    async def admit(self, prompts: int, stop: asyncio.Event | None = None) -> float:
        """Wait for a turn to send ``prompts`` prompts; return the seconds waited.

        Raises ``Stopping`` as soon as ``stop`` is set: a stopping run sends nothing new.
        """
        started = time.monotonic()
        await _unless_stopped(self._slots.acquire(), stop)
        try:
            await self._sit_out_pause(stop)
            if self._requests is not None:
                await _unless_stopped(self._requests.acquire(), stop)
            if self._prompts is not None:
                await _unless_stopped(self._prompts.acquire(min(prompts, self._batch)), stop)
            # A 429 answered while this request queued on a limiter holds it too.
            await self._sit_out_pause(stop)
        except BaseException:
            self._slots.release()
            raise
        return time.monotonic() - started

    async def _sit_out_pause(self, stop: asyncio.Event | None) -> None:
        while (left := self._paused_until - time.monotonic()) > 0:
            await sleep_unless_stopped(left, stop)


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
