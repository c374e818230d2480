"""The HTTP side: one aiohttp session, the retry policy, and aiohttp errors mapped to ours in one place."""

from __future__ import annotations

import asyncio
import email.utils
import io
import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import aiohttp
from aiolimiter import AsyncLimiter

from .errors import AuthError, EndpointError, OutageError
from .protocol import Answer, ResponseError, build_request, match_response

# A hostile or broken endpoint must not exhaust memory: larger responses are refused.
DEFAULT_MAX_RESPONSE_BYTES = 256 << 20
# Request bodies past this size are sent from a stream, in chunks, as aiohttp asks.
_STREAM_BODY_BYTES = 1 << 20
# Statuses worth retrying; other 4xx mean the request itself is refused.
RETRY_STATUSES = frozenset({408, 409, 425, 429})


class RowOutcome(NamedTuple):
    """What became of one prompt of a batch after all its attempts (one per row: kept cheap)."""

    answer: Answer | None
    error: str | None
    attempts: int
    latency_s: float | None


@dataclass
class Accounting:
    """Request-level figures for the run summary."""

    requests: int = 0
    prompts_sent: int = 0
    prompts_resent: int = 0
    retries: Counter[str] = field(default_factory=Counter)
    throttle_wait_s: float = 0.0


class _Transient(Exception):
    def __init__(self, cause: str, reason: str, retry_after: float | None = None):
        self.cause, self.reason, self.retry_after = cause, reason, retry_after


class _Rejected(Exception):
    def __init__(self, status: int, reason: str):
        self.status, self.reason = status, reason


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


class Throttle:
    """Shared by every request of a run: smooth rate limits and the pause a 429 imposes on all.

    Buckets hold one request and one batch of prompts, so the rate is held evenly from the first
    second instead of allowing a minute's worth in a burst.
    """

    def __init__(self, requests_per_minute: float | None, prompts_per_minute: float | None, batch_size: int):
        self._requests = AsyncLimiter(1, 60.0 / requests_per_minute) if requests_per_minute else None
        self._batch = batch_size
        self._prompts = (
            AsyncLimiter(batch_size, batch_size * 60.0 / prompts_per_minute) if prompts_per_minute else None
        )
        self._paused_until = 0.0

    def pause(self, seconds: float) -> None:
        self._paused_until = max(self._paused_until, time.monotonic() + seconds)

    async def wait(self, prompts: int) -> float:
        """Wait for a turn to send ``prompts`` prompts; return the seconds waited."""
        started = time.monotonic()
        await self._sit_out_pause()
        if self._requests is not None:
            await self._requests.acquire()
        if self._prompts is not None:
            await self._prompts.acquire(min(prompts, self._batch))
        # A 429 answered while this request queued on a limiter holds it too.
        await self._sit_out_pause()
        return time.monotonic() - started

    async def _sit_out_pause(self) -> None:
        while (left := self._paused_until - time.monotonic()) > 0:
            await asyncio.sleep(left)


class EndpointClient:
    """Sends batches of prompts and returns one outcome per prompt; never raises for a row."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        url: str,
        model: str,
        params: dict[str, Any],
        policy: RetryPolicy,
        api_key: str | None = None,
        throttle: Throttle | None = None,
        accounting: Accounting | None = None,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
    ):
        self._session = session
        self._url = url
        self._model = model
        self._params = params
        self._policy = policy
        self._headers = {"Content-Type": "application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._throttle = throttle or Throttle(None, None, 1)
        self._max_bytes = max_response_bytes
        self._failures_in_a_row = 0
        self.accounting = accounting if accounting is not None else Accounting()

    async def process(self, prompts: Sequence[str]) -> list[RowOutcome]:
        """Answer every prompt, retrying failed attempts and splitting refused batches."""
        outcomes: list[RowOutcome | None] = [None] * len(prompts)
        attempts = [0] * len(prompts)
        await self._process(list(range(len(prompts))), prompts, outcomes, attempts)
        assert all(o is not None for o in outcomes)
        return outcomes  # type: ignore[return-value]

    async def _process(
        self,
        pending: list[int],
        prompts: Sequence[str],
        outcomes: list[RowOutcome | None],
        attempts: list[int],
    ) -> None:
        cause, reason, retry_after = "", "", None
        for attempt in range(self._policy.max_retries + 1):
            if attempt:
                self.accounting.retries[cause] += 1
                await asyncio.sleep(self._policy.delay(attempt, retry_after))
            self.accounting.throttle_wait_s += await self._throttle.wait(len(pending))
            for i in pending:
                if attempts[i]:
                    self.accounting.prompts_resent += 1
                attempts[i] += 1
            started = time.monotonic()
            try:
                matched = await self._attempt([prompts[i] for i in pending])
            except _Transient as exc:
                cause, reason, retry_after = exc.cause, exc.reason, exc.retry_after
                self._failed_attempt(exc)
                continue
            except _Rejected as exc:
                if len(pending) == 1:
                    outcomes[pending[0]] = RowOutcome(
                        None, f"rejected: HTTP {exc.status}: {exc.reason}", attempts[pending[0]], None
                    )
                    return
                # One refused prompt must not sink its neighbours: halve until it stands alone.
                half = len(pending) // 2
                await self._process(pending[:half], prompts, outcomes, attempts)
                await self._process(pending[half:], prompts, outcomes, attempts)
                return
            latency = time.monotonic() - started
            self._failures_in_a_row = 0
            for j, answer in matched.answers.items():
                i = pending[j]
                outcomes[i] = RowOutcome(answer, None, attempts[i], latency)
            pending = [i for j, i in enumerate(pending) if j not in matched.answers]
            if not pending:
                return
            cause, reason, retry_after = "invalid_response", matched.problem or "invalid response", None
        for i in pending:
            outcomes[i] = RowOutcome(
                None, f"{cause}: {reason} (gave up after {attempts[i]} attempts)", attempts[i], None
            )

    def _snippet(self, raw: bytes) -> str:
        # An endpoint may quote the request back in its error; the key must not reach a message.
        return _snippet(raw, self._headers.get("Authorization", "").removeprefix("Bearer "))

    def _failed_attempt(self, exc: _Transient) -> None:
        if exc.cause == "http_429":
            # The endpoint is saturated: everyone backs off, not only this request.
            self._throttle.pause(self._policy.delay(1, exc.retry_after))
            return
        self._failures_in_a_row += 1
        if self._failures_in_a_row >= self._policy.outage_after:
            raise OutageError(
                f"the endpoint failed {self._failures_in_a_row} attempts in a row "
                f"(last: {exc.cause}: {exc.reason}); stopped early with progress kept: "
                "run the same command when the endpoint is back"
            )

    async def _attempt(self, prompts: list[str]):
        body: bytes | io.BytesIO = build_request(self._model, prompts, self._params)
        if len(body) > _STREAM_BODY_BYTES:  # aiohttp writes a large bytes body in one go
            body = io.BytesIO(body)
        self.accounting.requests += 1
        self.accounting.prompts_sent += len(prompts)
        try:
            async with self._session.post(
                self._url, data=body, headers=self._headers, allow_redirects=False
            ) as resp:
                raw = await _read_capped(resp, self._max_bytes)
                status = resp.status
                if status in (401, 403):
                    raise AuthError(status, self._snippet(raw))
                if 300 <= status < 400:
                    raise EndpointError(
                        f"the endpoint redirected (HTTP {status}) to {resp.headers.get('Location', '?')}; "
                        "redirects are not followed (they could leak credentials): set "
                        "endpoint.api_base to the final URL"
                    )
                if status in RETRY_STATUSES or status >= 500:
                    raise _Transient(
                        f"http_{status}",
                        f"HTTP {status}: {self._snippet(raw)}",
                        parse_retry_after(resp.headers.get("Retry-After")),
                    )
                if 400 <= status < 500:
                    raise _Rejected(status, self._snippet(raw))
                if status != 200:
                    raise _Transient(f"http_{status}", f"unexpected HTTP {status}")
        except asyncio.TimeoutError:
            raise _Transient("timeout", "no complete answer within endpoint.timeout_s") from None
        except aiohttp.ClientConnectionError as exc:
            raise _Transient("connection", f"{exc.__class__.__name__}: {exc}") from None
        except aiohttp.ClientPayloadError as exc:
            raise _Transient("connection", f"broken response body: {exc}") from None
        except _ResponseTooLarge as exc:
            raise _Transient("invalid_response", str(exc)) from None
        try:
            return match_response(raw, prompts)
        except ResponseError as exc:
            raise _Transient("invalid_response", str(exc)) from None


class _ResponseTooLarge(Exception):
    pass


async def _read_capped(resp: aiohttp.ClientResponse, cap: int) -> bytes:
    declared = resp.content_length
    if declared is not None and declared > cap:
        raise _ResponseTooLarge(f"response body of {declared} bytes exceeds the {cap}-byte cap (endpoint.max_response_mb)")
    if declared is not None and resp.headers.get("Content-Encoding", "identity") == "identity":
        # The usual case: the size is known and within the cap, and aiohttp reads at most
        # Content-Length bytes, so one read is safe and far cheaper than a loop over chunks.
        return await resp.read()
    chunks, size = [], 0
    async for chunk in resp.content.iter_chunked(1 << 16):
        size += len(chunk)
        if size > cap:
            raise _ResponseTooLarge(f"response body exceeds the {cap}-byte cap (endpoint.max_response_mb)")
        chunks.append(chunk)
    return b"".join(chunks)


def _snippet(raw: bytes, secret: str = "", limit: int = 200) -> str:
    text = raw.decode("utf-8", "replace").strip().replace("\n", " ")
    if secret:
        text = text.replace(secret, "[redacted]")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def make_session(concurrency: int, timeout_s: float) -> aiohttp.ClientSession:
    """One session per run: connector limit = concurrency, an explicit total timeout per request."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=concurrency, limit_per_host=concurrency),
        timeout=aiohttp.ClientTimeout(total=timeout_s),
        raise_for_status=False,
    )
