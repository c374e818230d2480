"""A live test endpoint on 127.0.0.1 (port 0) in its own thread: the reference app plus faults.

Tests run batchrun in the foreground (``run_job`` owns its event loop, the CLI its process), so
the endpoint serves from a background thread with a loop of its own. Faults are chosen per
request by a rule ``(request_number, prompts) -> fault name or None``; ``shared_faults`` makes a
seeded rule that faults a share of requests and always rejects chosen (poison) prompts.

Fault names:

- ``"500"``, ``"429"``, any three digits: that status with a JSON error body;
  ``"429ra"``/``"503ra"``: the same with ``Retry-After: <retry_after>`` (seconds);
  ``"429date"``/``"503date"``: with ``Retry-After`` as an HTTP date ``retry_after_date_s`` ahead
  (whole seconds, so the wait it asks for is up to a second shorter);
  ``"401echo"``/``"500echo"``: an error body quoting the request's ``Authorization`` header back,
  as careless servers do ("invalid key: ...").
- ``"reset"``: the connection is closed with no answer; ``"cut"``: the body stops half-way.
- ``"hang"``: no answer at all; ``"slow"``: a valid answer trickled a byte at a time, forever
  for a client with a timeout (each read succeeds, the whole never arrives in time).
- ``"redirect"``: 307 to ``redirect_to``.
- ``"huge"``: a valid answer padded past ``huge_bytes`` (with Content-Length);
  ``"huge_chunked"``: the same, chunked, so the size is only known while reading.
- answers that fail validation: ``"invalid_json"``, ``"empty_body"``, ``"top_list"`` (a JSON
  list, not an object), ``"wrong_shape"`` (``data`` an object), ``"not_ok"``, ``"drop"`` (one item
  too few), ``"extra"`` (one too many), ``"reorder"``, ``"alter"`` (an altered prompt echo),
  ``"output_string"`` / ``"output_numbers"`` (``output`` not a list of strings), ``"output_empty"``
  (``output: []``); each of the item faults ``alter``, ``output_string``, ``output_numbers`` and
  ``output_empty`` spoils the first item, and as ``"every_<kind>"`` every item (an answer of which
  nothing can validate); ``"html200"``: an HTML error page with status 200.
- answers only the echo of which is off: ``"echo_trimmed"`` (every echo with surrounding whitespace
  stripped and CRLF/CR made LF, as some servers do), ``"echo_none"`` (no item echoes a prompt).
- ``"swap_outputs"``: outputs exchanged, prompts echoed faithfully; undetectable by design.

The OpenAI routes (``/v1/completions``, ``/v1/chat/completions``) take the same names. A rule sees
a completions request's ``prompt`` list, and a chat request's last message content as its one
prompt. Status faults answer an OpenAI error body (``{"error": {"message", "type", "code"}}``).
Answer faults act on ``choices`` as their custom namesakes act on ``data``: ``"alter"`` gives the
first choice an index out of range, ``"output_string"`` makes its text a list, ``"output_numbers"``
a number, ``"output_empty"`` removes it; ``"drop"``/``"extra"``/``"reorder"`` drop the last
choice, repeat the first (a duplicated index), reverse them; ``"echo_none"`` removes every index;
``"echo_trimmed"`` changes nothing (no echo to trim); ``"not_ok"`` answers an error body with
status 200; ``"wrong_shape"`` makes ``choices`` an object; ``"top_list"`` answers the bare list.
OpenAI-only: ``"index_bool"`` (the second choice's index made ``true``: the same as 1 in Python,
never an index) and ``"index_dup"`` (the second choice takes the first one's index).
"""

from __future__ import annotations

import asyncio
import email.utils
import itertools
import json
import random
import re
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from aiohttp import web

from batchrun import server

Rule = Callable[[int, list[str]], "str | None"]

STATUS = re.compile(r"^(\d{3})(ra|date|echo)?$")


@dataclass
class Arrival:
    """One POST as the endpoint saw it: when (``time.monotonic``), how big, and what it got."""

    n: int
    at: float
    prompts: int
    headers: dict[str, str]
    fault: str | None = None
    path: str = ""  # the route it was sent to (/inference, /v1/completions, ...)
    answered_at: float | None = None  # when the answer (or fault) was handed back


@dataclass
class FaultLog:
    """Every POST the endpoint received, faulted or not."""

    requests: int = 0
    faults: dict[str, int] = field(default_factory=dict)
    in_flight: int = 0
    max_in_flight: int = 0
    max_batch: int = 0
    prompts_received: list[str] = field(default_factory=list)
    arrivals: list[Arrival] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)  # every request body, as received


def _spoil(kind: str, item: dict) -> dict:
    """One item made invalid in the way ``kind`` names."""
    if kind == "alter":
        return {**item, "prompt": item["prompt"] + " (altered)"}
    if kind == "output_string":
        return {**item, "output": item["output"][0]}
    if kind == "output_numbers":
        return {**item, "output": [1, 2, 3]}
    if kind == "output_empty":
        return {**item, "output": []}
    raise ValueError(f"unknown item fault {kind!r}")


ITEM_FAULTS = ("alter", "output_string", "output_numbers", "output_empty")


OPENAI_PATHS = ("/v1/completions", "/v1/chat/completions")


def _texts(choice: dict) -> tuple[dict, str]:
    """Where a choice keeps its text: (the dict holding it, the key)."""
    return (choice["message"], "content") if "message" in choice else (choice, "text")


def _spoil_choice(kind: str, choice: dict, count: int) -> dict:
    choice = json.loads(json.dumps(choice))
    holder, key = _texts(choice)
    if kind == "alter":
        choice["index"] = count
    elif kind == "output_string":
        holder[key] = [holder[key]]
    elif kind == "output_numbers":
        holder[key] = 123
    elif kind == "output_empty":
        del holder[key]
    else:
        raise ValueError(f"unknown item fault {kind!r}")
    return choice


def _mutate_openai(kind: str, doc: dict) -> dict | bytes:
    choices = doc["choices"]
    if kind in ITEM_FAULTS:
        choices[0] = _spoil_choice(kind, choices[0], len(choices))
    elif kind.startswith("every_") and kind.removeprefix("every_") in ITEM_FAULTS:
        doc["choices"] = [_spoil_choice(kind.removeprefix("every_"), c, len(choices)) for c in choices]
    elif kind == "echo_trimmed":
        pass
    elif kind == "echo_none":
        for choice in choices:
            del choice["index"]
    elif kind == "reorder":
        doc["choices"] = list(reversed(choices))
    elif kind == "drop":
        doc["choices"] = choices[:-1]
    elif kind == "extra":
        doc["choices"] = choices + [choices[0]]
    elif kind == "index_bool" and len(choices) > 1:
        choices[1]["index"] = True
    elif kind == "index_dup" and len(choices) > 1:
        choices[1]["index"] = choices[0]["index"]
    elif kind in ("index_bool", "index_dup"):
        pass  # one choice: nothing to confuse it with
    elif kind == "swap_outputs":
        if len(choices) > 1:
            (h0, k0), (h1, k1) = _texts(choices[0]), _texts(choices[1])
            h0[k0], h1[k1] = h1[k1], h0[k0]
    elif kind == "not_ok":
        return json.dumps(_openai_error(503, "model overloaded")).encode()
    elif kind == "wrong_shape":
        doc["choices"] = {str(c["index"]): c for c in choices}
    elif kind == "top_list":
        return json.dumps(choices).encode()
    elif kind == "invalid_json":
        return b'{"choices": [ this is not json'
    elif kind == "empty_body":
        return b""
    else:
        raise ValueError(f"unknown fault {kind!r}")
    return doc


def _openai_error(status: int, message: str) -> dict:
    kind = {401: "AuthenticationError", 403: "PermissionDeniedError", 429: "RateLimitError"}.get(
        status, "InternalServerError" if status >= 500 else "BadRequestError"
    )
    return {"error": {"message": message, "type": kind, "param": None, "code": status}}


def _prompts_of(doc: dict) -> list[str]:
    """The prompts a rule sees: custom's params.prompt, completions' prompt list, or a chat's last
    message content."""
    if "params" in doc:
        return doc["params"]["prompt"]
    if "prompt" in doc:
        return [doc["prompt"]] if isinstance(doc["prompt"], str) else doc["prompt"]
    return [doc["messages"][-1]["content"]]


def _mutate(kind: str, doc: dict) -> dict | bytes:
    if "choices" in doc:
        return _mutate_openai(kind, doc)
    data = doc["data"]
    if kind in ITEM_FAULTS:
        data[0] = _spoil(kind, data[0])
    elif kind.startswith("every_") and kind.removeprefix("every_") in ITEM_FAULTS:
        doc["data"] = [_spoil(kind.removeprefix("every_"), item) for item in data]
    elif kind == "echo_trimmed":
        for item in data:
            item["prompt"] = item["prompt"].replace("\r\n", "\n").replace("\r", "\n").strip()
    elif kind == "echo_none":
        for item in data:
            del item["prompt"]
    elif kind == "reorder":
        doc["data"] = list(reversed(data))
    elif kind == "drop":
        doc["data"] = data[:-1]
    elif kind == "extra":
        doc["data"] = data + [data[0]]
    elif kind == "swap_outputs":
        # Outputs exchanged but prompts echoed faithfully: undetectable by any client, so tests
        # never use it for correctness; it exists to show what the echo check cannot catch.
        if len(data) > 1:
            data[0]["output"], data[1]["output"] = data[1]["output"], data[0]["output"]
    elif kind == "not_ok":
        doc["message"] = "error: model overloaded"
    elif kind == "wrong_shape":
        doc["data"] = {item["prompt"]: item for item in data}
    elif kind == "top_list":
        return json.dumps(data).encode()
    elif kind == "invalid_json":
        return b'{"data": [ this is not json'
    elif kind == "empty_body":
        return b""
    else:
        raise ValueError(f"unknown fault {kind!r}")
    return doc


def shared_faults(
    share: float,
    kinds: Iterable[str],
    seed: int,
    *,
    always_reject: Iterable[str] = (),
    reject_status: int = 400,
    max_faults: int | None = None,
) -> Rule:
    """Fault about ``share`` of requests with a kind from ``kinds``, and answer ``reject_status``
    to any request holding one of the ``always_reject`` prompts (poison: never answered).

    Whether request ``n`` is faulted is a pure function of ``(seed, n)``, so the same request
    numbers are faulted in every run whatever the prompts; the kinds take turns, so every kind
    occurs once there are as many faults as kinds. At most ``max_faults`` faults are injected
    (poison rejections not counted), for kinds that cost seconds each.
    """
    kinds = list(kinds)
    poison = frozenset(always_reject)
    injected = 0

    def rule(n: int, prompts: list[str]) -> str | None:
        nonlocal injected
        if poison and not poison.isdisjoint(prompts):
            return str(reject_status)
        if not kinds or random.Random(f"{seed}:{n}").random() >= share:
            return None
        if max_faults is not None and injected >= max_faults:
            return None
        injected += 1
        return kinds[(injected - 1) % len(kinds)]

    return rule


class LiveEndpoint:
    """``with LiveEndpoint(rule=...) as ep: ... ep.url ... ep.stats ... ep.log``.

    ``api_keys``: when set, a request without ``Authorization: Bearer <one of them>`` is refused
    with ``refuse_status`` before any rule applies. ``ssl_context`` serves https instead.

    ``port``: 0 (the default) takes a free port; a fixed one serves there. ``kill()`` takes the
    endpoint down abruptly, as a crashed replica goes: the listener is closed (new connections
    are refused) and every open connection is aborted (requests in flight get no answer);
    ``restart()`` serves again on the same port, with the same app, rule, ``stats`` and ``log``
    (so counts run on across the outage; ``killed_at``/``restarted_at`` say when, in
    ``time.monotonic``, to tell arrivals before and after apart). ``delay_s``: seconds every POST
    waits before it is answered (or faulted), on top of the app's latency; a test may change it
    mid-run to slow a replica down and keep a run going until something it waits for happens.
    """

    def __init__(
        self,
        options: server.ServerOptions | None = None,
        rule: Rule | None = None,
        *,
        retry_after: str = "1",
        retry_after_date_s: float = 2.0,
        redirect_to: str = "",
        huge_bytes: int = 256 * 1024,
        slow_step_s: float = 0.05,
        api_keys: Iterable[str] | None = None,
        refuse_status: int = 401,
        ssl_context: ssl.SSLContext | None = None,
        port: int = 0,
    ):
        self.options = options or server.ServerOptions()
        self.port = port
        self.rule = rule
        self.retry_after = retry_after
        self.retry_after_date_s = retry_after_date_s
        self.redirect_to = redirect_to
        self.huge_bytes = huge_bytes
        self.slow_step_s = slow_step_s
        self.api_keys = None if api_keys is None else set(api_keys)
        self.refuse_status = refuse_status
        self.ssl_context = ssl_context
        self.log = FaultLog()
        self.url = ""
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._app: web.Application | None = None
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self._numbers = itertools.count(1)
        self.delay_s = 0.0
        self.killed_at: float | None = None
        self.restarted_at: float | None = None

    @property
    def openai_base(self) -> str:
        """The ``api_base`` of the OpenAI routes (``{openai_base}/completions``, ...)."""
        return self.url.removesuffix("/inference") + "/v1"

    @property
    def stats(self) -> server.ServerStats:
        assert self._app is not None
        return self._app[server.STATS]

    def __enter__(self) -> LiveEndpoint:
        self._thread = threading.Thread(target=self._serve, name="test-endpoint", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("test endpoint did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None and self._stop is not None and self._thread is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def kill(self) -> None:
        """Go down at once, as a replica whose process died: refuse new connections and abort
        every open one (no answer to requests in flight). The loop and the app stay, so
        ``restart()`` can serve again on the same port."""
        self._call(self._take_down())
        self.killed_at = time.monotonic()

    def restart(self) -> None:
        """Serve again on the port the endpoint had, after ``kill()``."""
        self._call(self._listen())
        self.restarted_at = time.monotonic()

    @property
    def serving(self) -> bool:
        return self._site is not None

    def _call(self, coro) -> None:
        assert self._loop is not None, "the endpoint is not running"
        asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    async def _take_down(self) -> None:
        assert self._site is not None and self._runner is not None, "the endpoint is already down"
        site, self._site = self._site, None
        await site.stop()  # the listener: a connect now is refused
        assert self._runner.server is not None
        for handler in self._runner.server.connections:  # the connections it had accepted
            if handler.transport is not None:
                handler.transport.abort()

    async def _listen(self) -> None:
        assert self._site is None and self._runner is not None, "the endpoint is already serving"
        site = web.TCPSite(self._runner, "127.0.0.1", self.port, ssl_context=self.ssl_context)
        await site.start()
        self._site = site
        self.port = self._runner.addresses[0][1]  # the one bound, when asked for port 0

    def _serve(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        app = server.make_app(self.options)
        app.middlewares.append(self._middleware)
        self._app = app
        # handler_cancellation: a request the client gave up on (a timeout) stops counting as in
        # flight when its connection closes, so max_in_flight measures the client's concurrency.
        runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.5, handler_cancellation=True)
        await runner.setup()
        self._runner = runner
        await self._listen()
        scheme = "https" if self.ssl_context else "http"
        self.url = f"{scheme}://127.0.0.1:{self.port}/inference"
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            await runner.cleanup()

    @web.middleware
    async def _middleware(self, request: web.Request, handler):
        if request.method != "POST":
            return await handler(request)
        arrival = Arrival(next(self._numbers), time.monotonic(), 0, dict(request.headers), path=request.path)
        self.log.bodies.append(await request.read())
        try:
            prompts = _prompts_of(await request.json())
        except Exception:
            prompts = []
        arrival.prompts = len(prompts)
        log = self.log
        log.arrivals.append(arrival)
        log.requests += 1
        log.in_flight += 1
        log.max_in_flight = max(log.max_in_flight, log.in_flight)
        log.max_batch = max(log.max_batch, len(prompts))
        log.prompts_received.extend(prompts)
        try:
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            kind = self._choose(arrival.n, prompts, request)
            arrival.fault = kind
            if kind is None:
                return await handler(request)
            log.faults[kind] = log.faults.get(kind, 0) + 1
            return await self._fault(kind, request, handler)
        finally:
            arrival.answered_at = time.monotonic()
            log.in_flight -= 1

    def _choose(self, n: int, prompts: list[str], request: web.Request) -> str | None:
        if self.api_keys is not None:
            if request.headers.get("Authorization") not in {f"Bearer {k}" for k in self.api_keys}:
                return str(self.refuse_status)
        return self.rule(n, prompts) if self.rule else None

    async def _fault(self, kind: str, request: web.Request, handler) -> web.StreamResponse:
        status = STATUS.match(kind)
        if status:
            headers = {}
            if status.group(2) == "ra":
                headers["Retry-After"] = self.retry_after
            elif status.group(2) == "date":
                headers["Retry-After"] = email.utils.formatdate(time.time() + self.retry_after_date_s, usegmt=True)
            message = f"injected HTTP {status.group(1)}"
            if status.group(2) == "echo":
                message = f"invalid credentials: {request.headers.get('Authorization', '')}"
            code = int(status.group(1))
            error = _openai_error(code, message) if request.path in OPENAI_PATHS else {"message": message, "data": []}
            return web.json_response(error, status=code, headers=headers)
        if kind == "redirect":
            return web.Response(status=307, headers={"Location": self.redirect_to})
        if kind == "html200":
            page = "<!DOCTYPE html>\n<html><head><title>Service Unavailable</title></head><body>upstream down</body></html>"
            return web.Response(text=page, content_type="text/html")
        if kind == "hang":
            await asyncio.sleep(3600)
        if kind == "reset":
            assert request.transport is not None
            request.transport.close()
            raise ConnectionResetError("injected reset")
        resp = await handler(request)
        body: bytes = resp.body
        if kind in ("huge", "huge_chunked"):
            doc = json.loads(body)
            doc["padding"] = "x" * self.huge_bytes  # still a valid answer: only its size is wrong
            body = json.dumps(doc).encode()
            if kind == "huge":
                return web.Response(body=body, content_type="application/json")
            stream = web.StreamResponse(headers={"Content-Type": "application/json"})
            stream.enable_chunked_encoding()
            await stream.prepare(request)
            for i in range(0, len(body), 16384):
                await stream.write(body[i : i + 16384])
            await stream.write_eof()
            return stream
        if kind in ("slow", "cut"):
            stream = web.StreamResponse(headers={"Content-Type": "application/json"})
            stream.content_length = len(body)
            await stream.prepare(request)
            if kind == "cut":
                await stream.write(body[: len(body) // 2])
                assert request.transport is not None
                request.transport.close()
                raise ConnectionResetError("injected cut")
            for i in range(len(body)):  # bounded: a byte per step, ends when the client leaves
                await stream.write(body[i : i + 1])
                await asyncio.sleep(self.slow_step_s)
            await stream.write_eof()
            return stream
        mutated = _mutate(kind, json.loads(body))
        if isinstance(mutated, bytes):
            return web.Response(body=mutated, content_type="application/json")
        return web.json_response(mutated)
