"""Adaptive concurrency (``run.concurrency = "auto"``): a ``Limit`` of requests in flight to one
replica that follows it, between 1 and ``run.max_concurrency``; each replica has its own.

The algorithm is AIMD with a latency guard, in the family of TCP Vegas and Netflix's
concurrency-limits (its ``AIMDLimit`` and ``VegasLimit``), chosen because its only inputs are
what every attempt reports anyway (latency and failure class) and its behaviour is easy to state:

- **slow start**: the limit starts at ``initial`` and grows by one per answered request
  (doubling every round trip) until the first sign of a full server: an overload answer, or one
  answer slower than ``tolerance`` above the lowest latency (as TCP's HyStart leaves slow start
  on a delay rise, before the losses an overshoot would cause);
- **additive increase**: afterwards it grows by one per round trip (``1/limit`` per answer) while
  the recent latency stays within ``tolerance`` of the lowest seen (the server has spare room:
  more in flight means more answered);
- **latency guard**: when the recent latency rises past twice that tolerance, the server is
  queueing: the limit is cut by 10%, at most once per round trip. More in flight would add
  latency, not throughput, and a queue that keeps growing ends in shed load;
- **multiplicative decrease**: a 429, a 503 or a timeout halves the limit (in slow start) or cuts
  it by a quarter, once per burst: answers to requests sent before the replica last reacted to
  overload (a cut or a pause) say nothing new (and do not count toward taking it out of rotation
  either, see ``fleet.py``), while one sent after it and still refused cuts again.

Only full batches (``batch_size`` prompts) feed the latency figures, since a smaller batch (a
resend, a halved batch) is faster for reasons of its own. The lowest latency is the minimum of
recent windows, so a server whose base latency moves is followed rather than remembered.
A gradient controller (Netflix's ``Gradient2``) reacts to the same signals more smoothly but has
more settings to get wrong; ``adaptive.py`` is the one place to swap it in.
"""

from __future__ import annotations

from .admission import AttemptResult

# The failure classes that mean "the server is full": everything else (a reset, an invalid
# answer) says nothing of its load.
OVERLOAD = frozenset({"http_429", "http_503", "timeout"})


class AimdLimit:
    """A ``Limit`` (see ``admission.py``) that follows its replica, between 1 and ``max_concurrency``."""

    adaptive = True

    def __init__(
        self,
        max_concurrency: int,
        batch_size: int,
        *,
        initial: int = 2,
        tolerance: float = 0.25,
        window: int = 50,
    ):
        self._max = max_concurrency
        self._batch = batch_size
        self._initial = initial
        self._tolerance = tolerance
        self._window_size = window
        self._cuts = 0
        self.reset()

    def reset(self) -> None:
        """Start afresh: slow start from ``initial``, latency forgotten (cuts are kept: a count)."""
        self.limit = float(min(self._initial, self._max))
        self.slow_start = True
        self._rtt_min: float | None = None  # the lowest full-batch latency of recent windows
        self._rtt_avg: float | None = None  # a short moving average of full-batch latency
        self._window: list[float] = []
        self._last_cut = float("-inf")

    @property
    def max_in_flight(self) -> int:
        return self._max

    @property
    def current(self) -> int:
        return max(1, int(self.limit))

    @property
    def cuts(self) -> int:
        return self._cuts

    def observe(self, result: AttemptResult, now: float, fresh: bool) -> bool:
        if result.cause in OVERLOAD:
            # Once per burst: answers to requests sent before the last cut say nothing new; one
            # sent after it that is still refused says the cut was not enough.
            if fresh:
                self._cut(now, 0.5 if self.slow_start else 0.75)
                return True
            return False
        if result.cause is not None or result.prompts != self._batch:
            return False  # says nothing of the server's load, or not comparably
        sample = result.latency_s
        self._window.append(sample)
        if self._rtt_min is None or sample < self._rtt_min:
            self._rtt_min = sample
        if len(self._window) >= self._window_size:
            # Forget a minimum older than the last two windows: the base latency may have moved.
            self._rtt_min = min(min(self._window), self._rtt_min * 1.05)
            self._window.clear()
        self._rtt_avg = sample if self._rtt_avg is None else 0.8 * self._rtt_avg + 0.2 * sample
        floor = self._rtt_min
        if self.slow_start and sample > floor * (1 + self._tolerance):
            # The first answer slowed by a queue ends slow start, before the average shows it: a
            # limit doubling every round trip would otherwise overshoot into shed load.
            self.slow_start = False
            return False
        if self._rtt_avg <= floor * (1 + self._tolerance):
            self.limit = min(float(self._max), self.limit + (1.0 if self.slow_start else 1.0 / self.limit))
        elif self._rtt_avg > floor * (1 + 2 * self._tolerance):
            self.slow_start = False
            if now - self._last_cut >= self._rtt_avg:  # at most once a round trip
                self._cut(now, 0.9)
                return True
        return False

    def _cut(self, now: float, factor: float) -> None:
        self.slow_start = False
        self._last_cut = now
        self.limit = max(1.0, self.limit * factor)
        self._cuts += 1


__all__ = ["OVERLOAD", "AimdLimit"]
