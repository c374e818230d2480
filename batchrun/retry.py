"""When to try again, when the endpoint rather than the rows is at fault, and what to log meanwhile."""

from __future__ import annotations

import email.utils
import logging
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from .errors import OutageError

# The class a failed attempt is counted under when the endpoint answered but nothing validated.
INVALID = "invalid_response"
_KEPT = "stopped early with progress kept: "
_WHEN_BACK = _KEPT + "run the same command when the endpoint is back"
_WHEN_FIXED = _KEPT + "run the same command once the endpoint's answers are fixed (or endpoint.echo_match set)"


@dataclass(frozen=True)
class RetryPolicy:
    """When and how long to wait before trying again: the one place that decides it.

    Exponential backoff with full jitter, raised to the endpoint's ``Retry-After`` (capped), and
    an outage verdict after ``outage_after`` failed attempts in a row across all requests.
    """

    max_retries: int
    base_s: float
    cap_s: float
    retry_after_cap_s: float = 120.0
    outage_after: int = 20

    def delay(self, retry: int, retry_after: float | None = None) -> float:
        jitter = random.uniform(0.0, min(self.cap_s, self.base_s * 2 ** (retry - 1)))
        if retry_after is None:
            return jitter
        return max(jitter, min(retry_after, self.retry_after_cap_s))


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


class OutageVerdict:
    """Decides, for a whole run, when failures are the endpoint's fault and not the rows'.

    An attempt that yields no valid answer (a 5xx, a timeout, a refused connection, an answer of
    which nothing validates) counts; one valid answer resets the count. ``outage_after`` in a row
    is an outage. A batch out of attempts is one too when the endpoint has never answered this
    job (``answered``: not in this run, nor in the progress saved before it), or when its last
    attempt could not connect at all: rows end failed only for causes that can be theirs, once the
    endpoint has shown it answers others. (A rerun of rows that failed before, against an endpoint
    that keeps failing them, marks them failed again, exit 3, rather than calling an outage on
    every run.)
    """

    def __init__(self, outage_after: int, *, answered: bool = False):
        self.outage_after = outage_after
        self.in_a_row = 0
        self.invalid_in_a_row = 0
        self.answered = answered

    def answer(self) -> None:
        """An attempt gave at least one valid answer."""
        self.in_a_row = self.invalid_in_a_row = 0
        self.answered = True

    def failure(self, cause: str, reason: str) -> None:
        """An attempt gave no valid answer; raise ``OutageError`` when that makes an outage."""
        self.in_a_row += 1
        if cause == INVALID:
            self.invalid_in_a_row += 1
        if self.in_a_row < self.outage_after:
            return
        if self.invalid_in_a_row == self.in_a_row:
            raise OutageError(
                f"the endpoint's answers failed validation {self.in_a_row} attempts in a row "
                f"(last: {_answer_problem(reason)}); {_WHEN_FIXED}"
            )
        raise OutageError(
            f"the endpoint failed {self.in_a_row} attempts in a row (last: {cause}: {reason}); {_WHEN_BACK}"
        )

    def give_up(self, cause: str, reason: str, could_not_connect: bool) -> None:
        """A batch ran out of attempts; raise ``OutageError`` unless its rows may be at fault."""
        if could_not_connect:
            raise OutageError(f"cannot connect to the endpoint ({reason}); {_WHEN_BACK}")
        if self.answered:
            return
        if cause == INVALID and self.invalid_in_a_row == self.in_a_row:
            raise OutageError(
                f"the endpoint's answers failed validation {self.in_a_row} attempts in a row and none "
                f"has validated for this job (last: {_answer_problem(reason)}); {_WHEN_FIXED}"
            )
        # 429s pause rather than count, so a run shed by an overloaded endpoint may count none.
        failed = f"failed {self.in_a_row} attempts in a row and " if self.in_a_row else ""
        raise OutageError(
            f"the endpoint {failed}has not answered this job once (last: {cause}: {reason}); {_WHEN_BACK}"
        )


def _answer_problem(reason: str) -> str:
    return reason.removeprefix("invalid response: ")


class RetryLog:
    """Failed attempts as log lines a person can read off a terminal: the first at once, then at
    most one line every ``interval_s`` summing what failed since, by class, with the last reason.

    ``clock`` is injectable so that the rate limit can be tested without waiting.
    """

    def __init__(
        self,
        interval_s: float = 30.0,
        *,
        clock: Callable[[], float] = time.monotonic,
        logger: logging.Logger | None = None,
    ):
        self.interval_s = interval_s
        self._clock = clock
        self._log = logger or logging.getLogger("batchrun")
        self._since: float | None = None  # when the last line was logged
        self._counts: Counter[str] = Counter()
        self._last = ("", "")

    def failed(self, cause: str, reason: str) -> None:
        """An attempt failed and will be retried (or its batch given up)."""
        now = self._clock()
        self._last = (cause, _clip(reason.removeprefix("invalid response: ")))
        if self._since is None:
            self._since = now
            self._log.warning(
                "retrying: first failed attempt: %s: %s", *self._last,
                extra={"fields": {"failed_attempts": {cause: 1}}},
            )
            return
        self._counts[cause] += 1
        self.tick(now)

    def tick(self, now: float | None = None) -> None:
        """Log what failed since the last line, if an interval has passed since it."""
        if not self._counts or self._since is None:
            return
        now = self._clock() if now is None else now
        if now - self._since >= self.interval_s:
            self._emit(now)

    def flush(self) -> None:
        """Log what failed since the last line, whatever the time (the run is ending)."""
        if self._counts and self._since is not None:
            self._emit(self._clock())

    def _emit(self, now: float) -> None:
        counts = sorted(self._counts.items(), key=lambda kv: (-kv[1], kv[0]))
        span = now - (self._since if self._since is not None else now)
        self._log.warning(
            "retrying: %s in the last %s s; last: %s: %s",
            ", ".join(f"{n} {cause}" for cause, n in counts), f"{span:.0f}" if span >= 10 else f"{span:.1f}", *self._last,
            extra={"fields": {"failed_attempts": dict(counts)}},
        )
        self._counts.clear()
        self._since = now


def _clip(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
