"""Adaptive concurrency (``run.concurrency = "auto"``): a ``Limit`` of requests in flight to one
replica that follows it, between 1 and ``run.max_concurrency``; each replica has its own.

The algorithm is AIMD on overload with a throughput guard, in the family of TCP Vegas and HyStart,
BBR's start-up and Netflix's concurrency-limits. It steers by what a batch run wants, prompts
answered per second, rather than by latency alone: a continuous-batching server (vLLM) answers
each request more slowly with more in flight while answering more prompts per second, and a
guard that cut whenever latency rose 50% above its lowest held vLLM at 1-2 in flight (0.52-0.67
of the best fixed setting, ``tests/benchmarks/RESULTS.md``). Its only inputs are what every
attempt reports anyway (prompts, latency, failure class):

- **epochs**: every round trip (and at least 4 answers) gives the prompts answered per second and,
  by Little's law, the requests that were in flight (the answers' latencies summed over the
  epoch's length). The best throughput and its in-flight are kept; an epoch *gains* when it beats
  the best by 5%, and becomes the best;
- **slow start**: the limit starts at ``initial`` and grows by half per answer (1.5 times a round
  trip) while every epoch gains, ending at the first that does not (or on overload), not on a
  latency rise;
- **additive increase**: then it grows by one a round trip while it is below the *ceiling*,
  ``headroom`` (1.5) times the in-flight of the best epoch; a gain raises the ceiling. The limit
  grows as long as more in flight brings more prompts/s, however latency rises, and at most 50%
  past where throughput stopped growing (the capacity model's queue: latency up, prompts/s flat);
- **throughput guard**: above the ceiling, with no gain and latency above 1.5 times its lowest, the
  limit is cut by a tenth, never below the ceiling, at most once a round trip; the epoch after a
  cut is not judged (answers sent before it still land). Below the ceiling nothing but overload
  cuts, so a latency spike from another process (throughput down, latency up) moves nothing;
- **multiplicative decrease**: a 429, a 503 or a timeout halves the limit (in slow start) or cuts
  it by a quarter, and lowers the ceiling to the new limit, once per burst: answers to requests
  sent before the replica last reacted to overload (a cut or a pause) say nothing new (and do not
  count toward taking it out of rotation either, see ``fleet.py``), while one sent after it and
  still refused cuts again. A cut that leaves ``current`` as it was (at 1) is not counted.

The best throughput is not decayed: a decayed best is soon beaten by 5% on a server whose
throughput is flat, and every such gain would raise the ceiling until the server sheds. It is
forgotten with the rest on ``reset`` (the replica was out of rotation). Latency figures come from
full batches only (``batch_size`` prompts), since a smaller batch is faster for reasons of its
own; the lowest latency is the minimum of recent windows, so a server whose base latency moves is
followed rather than remembered. A gradient controller (Netflix's ``Gradient2``) steers by the
ratio of long to short latency and would hold a batching server low the same way; ``adaptive.py``
is the one place to swap another in.
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
        headroom: float = 1.5,
        gain: float = 0.05,
    ):
        self._max = max_concurrency
        self._batch = batch_size
        self._initial = initial
        self._tolerance = tolerance
        self._window_size = window
        self._headroom = headroom
        self._slow_step = 0.5
        self._gain = gain
        self._cuts = 0
        self.reset()

    def reset(self) -> None:
        """Start afresh: slow start from ``initial``, latency and throughput forgotten (cuts are
        kept: a count)."""
        self.limit = float(min(self._initial, self._max))
        self.slow_start = True
        self._rtt_min: float | None = None  # the lowest full-batch latency of recent windows
        self._rtt_avg: float | None = None  # a short moving average of full-batch latency
        self._window: list[float] = []
        self._last_cut = float("-inf")
        # The current epoch (about one round trip): answered prompts and the sum of their latencies.
        self._epoch_start: float | None = None
        self._epoch_prompts = 0
        self._epoch_answers = 0
        self._epoch_busy = 0.0
        self._settling = False
        self.best_rate = 0.0  # the best epoch's prompts/s
        self.best_in_flight = 0.0  # requests in flight (Little's law) in that epoch

    @property
    def max_in_flight(self) -> int:
        return self._max

    @property
    def current(self) -> int:
        return max(1, int(self.limit))

    @property
    def cuts(self) -> int:
        return self._cuts

    @property
    def ceiling(self) -> float:
        """How far the limit may grow without a gain in throughput: ``headroom`` times the requests in
        flight at the best throughput seen."""
        return max(float(self._initial), self._headroom * self.best_in_flight)

    def observe(self, result: AttemptResult, now: float, fresh: bool) -> bool:
        if result.cause in OVERLOAD:
            # Once per burst: answers to requests sent before the last cut say nothing new; one
            # sent after it that is still refused says the cut was not enough.
            if not fresh:
                return False
            cut = self._cut(now, 0.5 if self.slow_start else 0.75)
            # The server's limit is below where this one was: probe no higher than this again
            # until throughput says otherwise.
            self.best_in_flight = min(self.best_in_flight, self.limit / self._headroom)
            return cut
        if result.cause is not None:
            return False  # says nothing of the server's load
        if self._epoch_start is None:
            self._epoch_start = now - result.latency_s
        self._epoch_prompts += result.prompts
        self._epoch_answers += 1
        self._epoch_busy += result.latency_s
        if result.prompts == self._batch:
            self._sample(result.latency_s)
        # An epoch is a round trip, and at least 4 answers (fewer measure nothing but noise).
        rtt = self._rtt_avg if self._rtt_avg is not None else result.latency_s
        if now - self._epoch_start >= rtt and self._epoch_answers >= 4:
            return self._judge(now)
        if self.slow_start:
            self.limit = min(float(self._max), self.limit + self._slow_step)
        elif self.limit < self.ceiling:
            self.limit = min(float(self._max), self.limit + 1.0 / self.limit)
        return False

    def _sample(self, sample: float) -> None:
        self._window.append(sample)
        if self._rtt_min is None or sample < self._rtt_min:
            self._rtt_min = sample
        if len(self._window) >= self._window_size:
            # Forget a minimum older than the last two windows: the base latency may have moved.
            self._rtt_min = min(min(self._window), self._rtt_min * 1.05)
            self._window.clear()
        self._rtt_avg = sample if self._rtt_avg is None else 0.8 * self._rtt_avg + 0.2 * sample

    def _judge(self, now: float) -> bool:
        """End of an epoch: compare its throughput with the best seen."""
        assert self._epoch_start is not None
        elapsed = max(now - self._epoch_start, 1e-6)
        rate = self._epoch_prompts / elapsed
        in_flight = self._epoch_busy / elapsed  # Little's law: the mean requests in flight
        self._epoch_start, self._epoch_prompts, self._epoch_answers, self._epoch_busy = now, 0, 0, 0.0
        if self._settling:
            # The first epoch after a cut: answers to requests sent before it still land, and
            # their latencies would read as more in flight than the limit allows. Not judged.
            self._settling = False
            return False
        gained = rate > self.best_rate * (1 + self._gain)
        if gained:
            self.best_rate, self.best_in_flight = rate, min(in_flight, self.limit)
        if self.slow_start:
            if gained:
                self.limit = min(float(self._max), self.limit + self._slow_step)
                return False
            self.slow_start = False  # throughput stopped growing: past the knee
        latency_high = (
            self._rtt_avg is not None and self._rtt_min is not None
            and self._rtt_avg > self._rtt_min * (1 + 2 * self._tolerance)
        )
        if self.limit > self.ceiling and latency_high and not gained:
            if now - self._last_cut >= (self._rtt_avg or 0.0):
                return self._cut(now, max(0.9, self.ceiling / self.limit))
        elif self.limit < self.ceiling or gained:
            self.limit = min(float(self._max), self.limit + 1.0 / self.limit)
        return False

    def _cut(self, now: float, factor: float) -> bool:
        """Lower the limit by ``factor``; a cut counts (and returns True) only when it changes
        ``current``: at the floor of 1 nothing changes."""
        before = self.current
        self.slow_start = False
        self.limit = max(1.0, self.limit * factor)
        if self.current == before:
            return False
        self._last_cut = now
        self._settling = True
        self._cuts += 1
        return True


__all__ = ["OVERLOAD", "AimdLimit"]
