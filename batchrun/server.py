"""The reference endpoint (`batchrun serve`): an aiohttp app serving the deterministic toy model.

It speaks LiteLLM's custom format on any path, and the OpenAI API on ``/v1/completions``,
``/v1/chat/completions`` and ``/v1/models`` as vLLM does (errors included), so every wire format
batchrun speaks has a real server to run against.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from . import chat, completions
from .openai_common import error_body
from .protocol import parse_request, response_body

# The toy model is named here too: tests and users import it from the server.
from .toymodel import DEFAULT_PARAMS as DEFAULT_PARAMS
from .toymodel import MAX_TOKENS_LIMIT as MAX_TOKENS_LIMIT
from .toymodel import effective_params as effective_params
from .toymodel import toy_output as toy_output
from .toymodel import toy_tokens, toy_words

# The most samples (``n``) one OpenAI request may ask for per prompt.
MAX_N = 64

@dataclass
class ServerOptions:
    """How the reference endpoint behaves; the defaults answer at once."""

    latency_s: float = 0.0  # slept once per request
    per_prompt_s: float = 0.0  # slept per prompt in the request, on top
    max_body_bytes: int = 64 * 1024 * 1024
    # Tests set this to pin requests in flight (counted, not yet answered) until they release it.
    hold: asyncio.Event | None = None
    # Keep a tally of every prompt text seen (GET /stats: distinct, seen more than once). It grows
    # with every distinct prompt, so it is off unless asked for (`batchrun serve --tally-prompts`):
    # a server answering tens of millions of prompts must not hold them all.
    tally_prompts: bool = False
    # OpenAI routes: a prompt (or conversation) of more toy tokens (words) than this is refused
    # with vLLM's 400 for a prompt past the model's context, failing its whole request.
    max_prompt_tokens: int | None = None
    served_model: str = "batchrun-toy"  # what GET /v1/models lists; requests may name any model
    # A capacity model (issue 15): ``capacity_prompts`` prompts are served in parallel in
    # ``latency_s``; above that a request's latency grows with the prompts in flight (processor
    # sharing: the ceiling is capacity_prompts / latency_s prompts/s), and a request that would
    # take the prompts in flight past capacity + ``queue_prompts`` is shed with 503, as gateways do.
    capacity_prompts: int | None = None
    queue_prompts: int = 0


@dataclass
class ServerStats:
    """What the endpoint has seen; mutated in place so tests holding it see live numbers."""

    requests: int = 0  # well-formed requests received (rejected ones count in `rejected`)
    shed: int = 0  # requests answered 503 by the capacity model (not counted in `requests`)
    prompts_in_flight: int = 0
    prompts: int = 0
    rejected: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    max_batch: int = 0
    batch_sizes: Counter[int] = field(default_factory=Counter)
    prompts_seen: Counter[str] = field(default_factory=Counter)  # with tally_prompts: proves no resends

    def reset(self) -> None:
        """Forget everything, keeping the same object (the app holds a reference to it)."""
        self.requests = self.prompts = self.rejected = self.shed = 0
        self.in_flight = self.max_in_flight = self.max_batch = 0
        self.batch_sizes.clear()
        self.prompts_seen.clear()

    def to_json(self) -> dict[str, Any]:
        """Plain numbers; prompt texts stay out (they can be large or private), only their tallies."""
        return {
            "requests": self.requests,
            "prompts": self.prompts,
            "rejected": self.rejected,
            "shed": self.shed,
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
            "max_batch": self.max_batch,
            "batch_sizes": {str(size): n for size, n in sorted(self.batch_sizes.items())},
            "distinct_prompts": len(self.prompts_seen),
            "prompts_seen_more_than_once": sum(1 for n in self.prompts_seen.values() if n > 1),
        }


STATS = web.AppKey("stats", ServerStats)
OPTIONS = web.AppKey("options", ServerOptions)


def _error(status: int, reason: str) -> web.Response:
    return web.json_response(response_body([], reason), status=status)


async def _infer(request: web.Request) -> web.Response:
    stats, options = request.app[STATS], request.app[OPTIONS]
    try:
        model, prompts, params = parse_request(await request.read())
        eff = effective_params(params)
    except web.HTTPRequestEntityTooLarge:
        stats.rejected += 1
        return _error(413, f"body is larger than {options.max_body_bytes} bytes")
    except ValueError as exc:
        stats.rejected += 1
        return _error(400, str(exc))
    async with _working(request.app, prompts):
        data = [{"prompt": p, "output": toy_output(model, p, eff), "params": eff} for p in prompts]
        return web.json_response(response_body(data))


@asynccontextmanager
async def _working(app: web.Application, prompts: list[str]) -> AsyncIterator[None]:
    """Count a well-formed request, then wait as the options say before it is answered."""
    stats, options = app[STATS], app[OPTIONS]
    cap = options.capacity_prompts
    if cap is not None and stats.prompts_in_flight + len(prompts) > cap + options.queue_prompts:
        stats.shed += 1
        raise web.HTTPServiceUnavailable(
            text=json.dumps({"message": "overloaded: the queue is full", "error": {
                "message": "overloaded: the queue is full", "type": "ServiceUnavailableError", "code": 503}}),
            content_type="application/json",
        )
    # Counted on receipt, before any delay: a request cancelled mid-sleep was still sent.
    stats.requests += 1
    stats.prompts += len(prompts)
    stats.batch_sizes[len(prompts)] += 1
    stats.max_batch = max(stats.max_batch, len(prompts))
    if options.tally_prompts:
        stats.prompts_seen.update(prompts)
    stats.in_flight += 1
    stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)
    stats.prompts_in_flight += len(prompts)
    try:
        delay = options.latency_s + options.per_prompt_s * len(prompts)
        if cap is not None and stats.prompts_in_flight > cap:
            delay *= stats.prompts_in_flight / cap  # the slots are shared by more prompts than they hold
        if delay > 0:
            await asyncio.sleep(delay)
        if options.hold is not None:
            await options.hold.wait()
        yield
    finally:
        stats.in_flight -= 1
        stats.prompts_in_flight -= len(prompts)


# --- the OpenAI routes ------------------------------------------------------------------------


def _openai_error(status: int, message: str, type_: str = "BadRequestError") -> web.Response:
    return web.json_response(error_body(message, type_, status), status=status)


def _sampling(params: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """The toy model's params and ``n`` for an OpenAI request, or ValueError why not."""
    if params.get("max_tokens") is None and params.get("max_completion_tokens") is not None:
        params = {**params, "max_tokens": params["max_completion_tokens"]}  # the newer chat name
    try:
        eff = effective_params(params)
    except ValueError as exc:
        raise ValueError(str(exc).removeprefix("params.")) from None
    n = params.get("n")
    if n is None:
        n = 1
    if type(n) is not int or not 1 <= n <= MAX_N:
        raise ValueError(f"n must be an integer between 1 and {MAX_N} (got {n!r})")
    return eff, n


async def _read_openai(
    request: web.Request, parse: Any
) -> tuple[tuple[str, Any, dict[str, Any]], dict[str, Any], int] | web.Response:
    """A parsed request, its toy params and ``n``; or the error answer to send instead."""
    stats, options = request.app[STATS], request.app[OPTIONS]
    try:
        parsed = parse(await request.read())
        eff, n = _sampling(parsed[2])
    except web.HTTPRequestEntityTooLarge:
        stats.rejected += 1
        return _openai_error(413, f"body is larger than {options.max_body_bytes} bytes")
    except ValueError as exc:
        stats.rejected += 1
        return _openai_error(400, str(exc))
    return parsed, eff, n


def _too_long(request: web.Request, tokens: int) -> web.Response | None:
    limit = request.app[OPTIONS].max_prompt_tokens
    if limit is None or tokens <= limit:
        return None
    request.app[STATS].rejected += 1
    return _openai_error(400, (
        f"This model's maximum context length is {limit} tokens. However, you requested {tokens} tokens "
        "in the prompt. Please reduce the length of the prompt."
    ))


def _finish(text: str, eff: dict[str, Any]) -> tuple[int, str]:
    tokens = toy_tokens(text)
    return tokens, "length" if tokens >= eff["max_tokens"] else "stop"


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


async def _completions(request: web.Request) -> web.Response:
    """``POST /v1/completions``: one choice per prompt and sample, index = prompt * n + sample."""
    read = await _read_openai(request, completions.parse_request)
    if isinstance(read, web.Response):
        return read
    (model, prompts, _), eff, n = read
    for prompt in prompts:  # one prompt past the context fails the whole request, as in vLLM
        refused = _too_long(request, toy_tokens(prompt))
        if refused is not None:
            return refused
    async with _working(request.app, prompts):
        choices, spent = [], 0
        for p, prompt in enumerate(prompts):
            for sample in range(n):
                text = toy_words(model, prompt, eff, sample)
                tokens, reason = _finish(text, eff)
                spent += tokens
                choices.append({"index": p * n + sample, "text": text, "logprobs": None, "finish_reason": reason})
        return web.json_response({
            "id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": model, "choices": choices, "usage": _usage(sum(map(toy_tokens, prompts)), spent),
        })


async def _chat(request: web.Request) -> web.Response:
    """``POST /v1/chat/completions``: ``n`` assistant messages for one conversation.

    The toy model reads the conversation as its canonical JSON text (``chat.read_messages``);
    stats and tallies count the last message's content as the request's one prompt.
    """
    read = await _read_openai(request, chat.parse_request)
    if isinstance(read, web.Response):
        return read
    (model, messages, _), eff, n = read
    prompt_tokens = sum(toy_tokens(m["content"]) for m in messages)
    refused = _too_long(request, prompt_tokens)
    if refused is not None:
        return refused
    conversation = chat.read_messages(messages)
    async with _working(request.app, [messages[-1]["content"]]):
        choices, spent = [], 0
        for sample in range(n):
            text = toy_words(model, conversation, eff, sample)
            tokens, reason = _finish(text, eff)
            spent += tokens
            choices.append({
                "index": sample, "message": {"role": "assistant", "content": text},
                "logprobs": None, "finish_reason": reason,
            })
        return web.json_response({
            "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": model, "choices": choices, "usage": _usage(prompt_tokens, spent),
        })


async def _models(request: web.Request) -> web.Response:
    model = request.app[OPTIONS].served_model
    return web.json_response(
        {"object": "list", "data": [{"id": model, "object": "model", "created": 0, "owned_by": "batchrun"}]}
    )


async def _stats(request: web.Request) -> web.Response:
    return web.json_response(request.app[STATS].to_json())


async def _health(request: web.Request) -> web.Response:
    return web.json_response({"ok": True})


def make_app(options: ServerOptions | None = None) -> web.Application:
    """The endpoint: POST on the OpenAI paths (``/v1/completions``, ``/v1/chat/completions``)
    speaks OpenAI, POST on any other path the custom format; GET /v1/models, /stats and /health
    report."""
    options = options or ServerOptions()
    app = web.Application(client_max_size=options.max_body_bytes)
    app[OPTIONS] = options
    app[STATS] = ServerStats()
    app.router.add_get("/stats", _stats)
    app.router.add_get("/health", _health)
    app.router.add_get("/v1/models", _models)
    app.router.add_post("/v1/completions", _completions)
    app.router.add_post("/v1/chat/completions", _chat)
    # Any path: LiteLLM posts to api_base exactly as given, whatever path the user wrote.
    app.router.add_post("/{tail:.*}", _infer)
    return app


@asynccontextmanager
async def builtin_endpoint(path: str = "/inference") -> AsyncIterator[str]:
    """The reference endpoint on a free loopback port for the length of one run
    (``api_base = "builtin"``); yields its URL ending in ``path`` (``"/v1"`` for an OpenAI base)."""
    runner, url, _ = await start_server("127.0.0.1", 0, path=path)
    logging.getLogger("batchrun").info("started the builtin reference endpoint at %s", url)
    try:
        yield url
    finally:
        await runner.cleanup()


async def start_server(
    host: str = "127.0.0.1",
    port: int = 0,
    options: ServerOptions | None = None,
    path: str = "/inference",
) -> tuple[web.AppRunner, str, web.Application]:
    """Serve on the running loop; returns the runner (``await runner.cleanup()``), URL and app."""
    app = make_app(options)
    # handler_cancellation: a client that gives up cancels its request's sleep, as a real
    # server's work would stop, so in_flight drops and cleanup does not wait on it.
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=2.0, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except BaseException:
        await runner.cleanup()
        raise
    real_port = runner.addresses[0][1]  # the port the OS chose when 0 was asked
    shown = f"[{host}]" if ":" in host else host
    return runner, f"http://{shown}:{real_port}/{path.lstrip('/')}", app


def serve_forever(host: str, port: int, options: ServerOptions) -> None:
    """Run the endpoint until Ctrl-C or SIGTERM, after printing its URL (with the real port if 0
    was asked).

    The signals go through the event loop (``add_signal_handler``, which wakes it through a
    pipe), not through Python's default SIGINT handler: that one runs only when the main thread
    next runs Python code, and an idle server's main thread sits in ``epoll_wait`` while the
    kernel may hand the signal to one of aiohttp's executor threads, so Ctrl-C could go unseen.
    """

    async def main() -> None:
        runner, url, _ = await start_server(host, port, options)
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            print(f"batchrun reference endpoint on {url}", flush=True)
            await stop.wait()
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
            await runner.cleanup()

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
