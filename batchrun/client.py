"""The HTTP side: one aiohttp session, the retry policy, and aiohttp errors mapped to ours in one place."""

from __future__ import annotations

import asyncio
import io
import ssl
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import aiohttp

from .admission import AttemptResult, Stopping, sleep_unless_stopped
from .errors import AuthError, EndpointError
from .fleet import Fleet, Replica, Ticket
from .protocol import Answer, Codec, Matched, ResponseError, Usage
from .retry import INVALID, RetryLog, RetryPolicy, parse_retry_after

# A hostile or broken endpoint must not exhaust memory: larger responses are refused.
DEFAULT_MAX_RESPONSE_BYTES = 256 << 20
# Request bodies past this size are sent from a stream, in chunks, as aiohttp asks.
_STREAM_BODY_BYTES = 1 << 20
# Statuses worth retrying; other 4xx mean the request itself is refused.
RETRY_STATUSES = frozenset({408, 409, 425, 429})
# The class of a row the endpoint refused alone (a 4xx for that one prompt).
REJECTED = "rejected"


class RowOutcome(NamedTuple):
    """What became of one prompt of a batch after all its attempts (one per row: kept cheap)."""

    answer: Answer | None
    error: str | None  # "<class>: <reason>", as stored on the row
    attempts: int
    latency_s: float | None
    error_class: str | None = None  # the class of ``error``, carried as data (never parsed back)


@dataclass
class Accounting:
    """Request-level figures for the run summary."""

    requests: int = 0
    prompts_sent: int = 0
    prompts_resent: int = 0
    retries: Counter[str] = field(default_factory=Counter)
    throttle_wait_s: float = 0.0
    # Tokens the endpoint reports spending (formats with usage), whether or not every answer was usable.
    prompt_tokens: int = 0
    completion_tokens: int = 0


class _Transient(Exception):
    def __init__(self, cause: str, reason: str, retry_after: float | None = None, connect: bool = False):
        self.cause, self.reason, self.retry_after = cause, reason, retry_after
        self.connect = connect  # the request never reached the server: refused, DNS, unreachable, TLS
        self.free = False  # retried on another replica without counting against the row


class _Rejected(Exception):
    def __init__(self, status: int, reason: str):
        self.status, self.reason = status, reason


class EndpointClient:
    """Sends batches of prompts and returns one outcome per prompt; never raises for a row.

    Raises ``OutageError`` when the endpoint, not the rows, is at fault (see ``OutageVerdict``).
    Once ``stop`` is set, no attempt starts and backoff and throttle waits end at once; rows not
    answered by then stay unresolved (``None``), to be sent by the next run.
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        fleet: Fleet | str,
        codec: Codec,
        policy: RetryPolicy,
        api_key: str | None = None,
        accounting: Accounting | None = None,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
        *,
        stop: asyncio.Event | None = None,
        answered_before: bool = False,
        retry_log: RetryLog | None = None,
        headers: dict[str, str] | None = None,
        secrets: tuple[str, ...] = (),
    ):
        """``fleet``: the run's replicas and their limits (``fleet.fleet_for``), or one URL to send
        to with no limit of its own (``answered_before`` then says whether earlier runs were answered)."""
        self._session = session
        self._fleet = fleet if isinstance(fleet, Fleet) else Fleet.single(fleet, policy, answered_before=answered_before)
        self._codec = codec
        self._policy = policy
        # Extra headers (endpoint.headers, headers_env) first: batchrun's own win any clash.
        self._headers = {**(headers or {}), "Content-Type": "application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        # Values never shown in a message: the key and every header read from the environment.
        self._secrets = tuple(s for s in (api_key, *secrets) if s)
        self._in_flight = 0  # attempts sent and not yet settled, across every caller
        self._max_bytes = max_response_bytes
        self._stop = stop
        self.verdict = self._fleet.verdict
        self.retry_log = retry_log or RetryLog()
        self.accounting = accounting if accounting is not None else Accounting()

    async def process(
        self,
        prompts: Sequence[str],
        outcomes: list[RowOutcome | None] | None = None,
        on_usage: Callable[[Usage], None] | None = None,
    ) -> list[RowOutcome | None]:
        """Answer every prompt, retrying failed attempts and splitting refused batches.

        Outcomes are written into ``outcomes`` as they come, so that a caller whose call is
        cancelled, or ends in ``OutageError``, still holds the rows answered before. Every entry
        is set unless the run is stopping. ``on_usage`` hears the tokens every answered attempt
        was reported to spend (formats with usage).
        """
        if outcomes is None:
            outcomes = [None] * len(prompts)
        attempts = [0] * len(prompts)
        try:
            await self._process(list(range(len(prompts))), prompts, outcomes, attempts, on_usage)
        except Stopping:
            pass
        return outcomes

    async def _process(
        self,
        pending: list[int],
        prompts: Sequence[str],
        outcomes: list[RowOutcome | None],
        attempts: list[int],
        on_usage: Callable[[Usage], None] | None = None,
    ) -> None:
        failure = _Transient("", "")
        retries = free = 0
        avoid: Replica | None = None
        fleet = self._fleet
        while True:
            if failure.cause:
                self.accounting.retries[failure.cause] += 1
                if not failure.free:
                    # With several replicas, Retry-After pauses the replica that sent it; the
                    # rows go on to another one after the usual backoff.
                    retry_after = failure.retry_after if fleet.size == 1 else None
                    await sleep_unless_stopped(self._policy.delay(retries, retry_after), self._stop)
            ticket = await fleet.admit(len(pending), self._stop, avoid)
            self.accounting.throttle_wait_s += ticket.waited_s
            if self._stop is not None and self._stop.is_set():
                fleet.settle(ticket, AttemptResult(len(pending), 0.0, "not_sent"))
                raise Stopping
            for i in pending:
                if attempts[i]:
                    self.accounting.prompts_resent += 1
                attempts[i] += 1
            started = time.monotonic()
            self._in_flight += 1
            try:
                matched = await self._attempt(ticket.url, [prompts[i] for i in pending])
            except _Transient as exc:
                self._settle(ticket, len(pending), started, exc.cause, exc.retry_after)
                failure = exc
                self.retry_log.failed(exc.cause, exc.reason)
                avoid = ticket.replica
                # Never reached a server, and another replica takes over: not the row's attempt.
                failure.free = fleet.failed(ticket, exc.cause, exc.reason, exc.connect) and free < 2 * fleet.size
                if failure.free:
                    free += 1
                    continue
                retries += 1
                if retries > self._policy.max_retries:
                    break
                continue
            except _Rejected as exc:
                self._settle(ticket, len(pending), started, f"http_{exc.status}")
                if len(pending) == 1:
                    outcomes[pending[0]] = RowOutcome(
                        None, f"{REJECTED}: HTTP {exc.status}: {exc.reason}", attempts[pending[0]], None, REJECTED
                    )
                    return
                # One refused prompt must not sink its neighbours: halve until it stands alone.
                half = len(pending) // 2
                await self._process(pending[:half], prompts, outcomes, attempts, on_usage)
                await self._process(pending[half:], prompts, outcomes, attempts, on_usage)
                return
            except BaseException:  # the run is ending (credentials refused, redirect, cancelled)
                self._settle(ticket, len(pending), started, "aborted")
                raise
            latency = self._settle(ticket, len(pending), started, None if matched.answers else INVALID)
            if matched.usage is not None:
                self.accounting.prompt_tokens += matched.usage.prompt_tokens
                self.accounting.completion_tokens += matched.usage.completion_tokens
                if on_usage is not None:
                    on_usage(matched.usage)
            for j, answer in matched.answers.items():
                i = pending[j]
                outcomes[i] = RowOutcome(answer, None, attempts[i], latency)
            pending = [i for j, i in enumerate(pending) if j not in matched.answers]
            if matched.answers:
                fleet.answered(ticket)
            if not pending:
                self.retry_log.tick()
                return
            failure = _Transient(INVALID, self._redact(matched.problem or "invalid response"))
            self.retry_log.failed(failure.cause, failure.reason)
            if not matched.answers:
                # Nothing usable came back: as much the endpoint's failure as a 5xx.
                avoid = ticket.replica
                fleet.failed(ticket, failure.cause, failure.reason)
            retries += 1
            if retries > self._policy.max_retries:
                break
        if self._stop is not None and self._stop.is_set():
            raise Stopping  # cut short: whether these rows or the endpoint are at fault is unknown
        while not self.verdict.answered and not failure.connect and self._in_flight > 0:
            # "Never answered this job" is judged once no attempt still in flight can answer it:
            # a batch unlucky enough to fail first is not an outage if its neighbours succeed.
            await sleep_unless_stopped(0.01, self._stop)
        self.verdict.give_up(failure.cause, failure.reason, failure.connect)
        for i in pending:
            outcomes[i] = RowOutcome(
                None, f"{failure.cause}: {failure.reason} (gave up after {attempts[i]} attempts)", attempts[i], None,
                failure.cause,
            )

    def _snippet(self, raw: bytes) -> str:
        # An endpoint may quote the request back in its error; the key must not reach a message.
        # The codec reads its format's error shape (OpenAI's {"error": {"message"}}); otherwise
        # the body is quoted.
        reason = self._codec.error_reason(raw)
        return _snippet(raw if reason is None else reason.encode("utf-8", "replace"), self._secrets)

    def _redact(self, text: str) -> str:
        # Problems quote the answer (echoes, "message"), which a careless endpoint may fill with
        # the request's headers.
        return _redacted(text, self._secrets)

    def _settle(
        self, ticket: Ticket, prompts: int, started: float, cause: str | None = None, retry_after: float | None = None
    ) -> float:
        """Tell the fleet how an attempt went (before anything else is sent); return its latency."""
        latency = time.monotonic() - started
        self._in_flight -= 1
        self._fleet.settle(ticket, AttemptResult(prompts, latency, cause, retry_after))
        return latency

    async def _attempt(self, url: str, prompts: list[str]) -> Matched:
        encoded = self._codec.build_request(prompts)
        # aiohttp writes a large bytes body in one go; a stream goes in chunks.
        body: bytes | io.BytesIO = io.BytesIO(encoded) if len(encoded) > _STREAM_BODY_BYTES else encoded
        self.accounting.requests += 1
        self.accounting.prompts_sent += len(prompts)
        try:
            async with self._session.post(
                url, data=body, headers=self._headers, allow_redirects=False
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
        except TimeoutError:
            raise _Transient("timeout", "no complete answer within endpoint.timeout_s") from None
        except aiohttp.ClientConnectorError as exc:
            # Refused, DNS, unreachable, TLS: the request never reached the server.
            raise _Transient("connection", f"{exc.__class__.__name__}: {exc}", connect=True) from None
        except aiohttp.ClientConnectionError as exc:
            raise _Transient("connection", f"{exc.__class__.__name__}: {exc}") from None
        except aiohttp.ClientPayloadError as exc:
            raise _Transient("connection", f"broken response body: {exc}") from None
        except _ResponseTooLarge as exc:
            raise _Transient("invalid_response", str(exc)) from None
        try:
            return self._codec.match(raw, prompts)
        except ResponseError as exc:
            raise _Transient(INVALID, self._redact(str(exc))) from None


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


def _snippet(raw: bytes, secrets: tuple[str, ...] = (), limit: int = 200) -> str:
    text = _redacted(raw.decode("utf-8", "replace").strip().replace("\n", " "), secrets)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _redacted(text: str, secrets: tuple[str, ...]) -> str:
    for secret in secrets:
        text = text.replace(secret, "[redacted]")
    return text


def make_session(concurrency: int, timeout_s: float, ssl_context: ssl.SSLContext | None = None) -> aiohttp.ClientSession:
    """One session per run: connector limit = concurrency, an explicit total timeout per request;
    ``ssl_context`` for endpoints behind a private CA (``endpoint.ca_bundle``)."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(
            limit=concurrency, limit_per_host=concurrency, ssl=ssl_context if ssl_context is not None else True
        ),
        timeout=aiohttp.ClientTimeout(total=timeout_s),
        raise_for_status=False,
    )
