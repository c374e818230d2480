"""The reference custom endpoint: an aiohttp app serving a deterministic toy model (`batchrun serve`)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import signal
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from .protocol import parse_request, response_body

DEFAULT_PARAMS: dict[str, Any] = {"max_tokens": 16, "temperature": 1.0, "top_p": 1.0, "top_k": 40}
# A toy answer is a few bytes a token; the cap keeps one request from asking for gigabytes.
MAX_TOKENS_LIMIT = 4096

_WORDS = tuple(
    "amber anchor apple arrow autumn basil beacon birch bramble bridge canyon cedar cinder clover "
    "comet copper coral crystal dawn delta dune ember falcon fern fjord flint forest garnet glacier "
    "harbor hazel heron island ivory jasper juniper kestrel lagoon lantern lilac maple meadow mesa "
    "nectar nimbus oak onyx orchid pebble pine prism quartz raven reef river saffron sage summit "
    "thistle tundra willow".split()
)


def effective_params(params: dict[str, Any]) -> dict[str, Any]:
    """The sampling params the toy model uses: JSON ``null`` or absent means the default.

    LiteLLM sends every parameter the caller did not set as ``null``, so null is not an error.
    Keys other than the four sampling ones (``prompt`` included) are ignored.
    """
    out = dict(DEFAULT_PARAMS)
    for key in DEFAULT_PARAMS:
        if params.get(key) is not None:
            out[key] = params[key]
    for key in ("max_tokens", "top_k"):
        # bool is an int subclass; `true` tokens is a client bug, not a 1.
        if isinstance(out[key], bool) or not isinstance(out[key], int):
            raise ValueError(f"params.{key} must be an integer (got {out[key]!r})")
    for key in ("temperature", "top_p"):
        value = out[key]
        # Python's json accepts NaN and Infinity, so finiteness is checked too.
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ValueError(f"params.{key} must be a finite number (got {value!r})")
        out[key] = float(value)  # 1 and 1.0 must seed the toy model alike
    if not 1 <= out["max_tokens"] <= MAX_TOKENS_LIMIT:
        raise ValueError(f"params.max_tokens must be between 1 and {MAX_TOKENS_LIMIT} (got {out['max_tokens']})")
    if out["temperature"] < 0:
        raise ValueError(f"params.temperature must be >= 0 (got {out['temperature']})")
    if not 0 < out["top_p"] <= 1:
        raise ValueError(f"params.top_p must be in (0, 1] (got {out['top_p']})")
    if out["top_k"] < 0:
        raise ValueError(f"params.top_k must be >= 0 (got {out['top_k']})")
    return out


def toy_output(model: str, prompt: str, params: dict[str, Any]) -> list[str]:
    """The toy model's answer: the prompt, then 1..max_tokens words drawn from a hash of everything.

    A pure function of (model, prompt, effective params), so a test can recompute any row's
    output and prove it belongs to that row.
    """
    eff = effective_params(params)
    # JSON of a list keeps the parts apart ("ab"+"c" vs "a"+"bc"); ASCII escapes make lone
    # surrogates (valid in JSON strings) hashable.
    seed = json.dumps([model, prompt, eff], sort_keys=True, separators=(",", ":")).encode("ascii")
    head = hashlib.blake2b(seed, digest_size=8, person=b"count").digest()
    count = 1 + int.from_bytes(head, "big") % eff["max_tokens"]
    stream = b""
    block = 0
    while len(stream) < count:
        stream += hashlib.blake2b(seed, digest_size=64, salt=block.to_bytes(8, "big")).digest()
        block += 1
    words = " ".join(_WORDS[b % len(_WORDS)] for b in stream[:count])
    return [f"{prompt} {words}"]


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


@dataclass
class ServerStats:
    """What the endpoint has seen; mutated in place so tests holding it see live numbers."""

    requests: int = 0  # well-formed requests received (rejected ones count in `rejected`)
    prompts: int = 0
    rejected: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    max_batch: int = 0
    batch_sizes: Counter[int] = field(default_factory=Counter)
    prompts_seen: Counter[str] = field(default_factory=Counter)  # with tally_prompts: proves no resends

    def reset(self) -> None:
        """Forget everything, keeping the same object (the app holds a reference to it)."""
        self.requests = self.prompts = self.rejected = 0
        self.in_flight = self.max_in_flight = self.max_batch = 0
        self.batch_sizes.clear()
        self.prompts_seen.clear()

    def to_json(self) -> dict[str, Any]:
        """Plain numbers; prompt texts stay out (they can be large or private), only their tallies."""
        return {
            "requests": self.requests,
            "prompts": self.prompts,
            "rejected": self.rejected,
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

    # Counted on receipt, before any delay: a request cancelled mid-sleep was still sent.
    stats.requests += 1
    stats.prompts += len(prompts)
    stats.batch_sizes[len(prompts)] += 1
    stats.max_batch = max(stats.max_batch, len(prompts))
    if options.tally_prompts:
        stats.prompts_seen.update(prompts)
    stats.in_flight += 1
    stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)
    try:
        delay = options.latency_s + options.per_prompt_s * len(prompts)
        if delay > 0:
            await asyncio.sleep(delay)
        if options.hold is not None:
            await options.hold.wait()
        data = [{"prompt": p, "output": toy_output(model, p, eff), "params": eff} for p in prompts]
        return web.json_response(response_body(data))
    finally:
        stats.in_flight -= 1


async def _stats(request: web.Request) -> web.Response:
    return web.json_response(request.app[STATS].to_json())


async def _health(request: web.Request) -> web.Response:
    return web.json_response({"ok": True})


def make_app(options: ServerOptions | None = None) -> web.Application:
    """The endpoint: POST on any path infers; GET /stats and GET /health report."""
    options = options or ServerOptions()
    app = web.Application(client_max_size=options.max_body_bytes)
    app[OPTIONS] = options
    app[STATS] = ServerStats()
    app.router.add_get("/stats", _stats)
    app.router.add_get("/health", _health)
    # Any path: LiteLLM posts to api_base exactly as given, whatever path the user wrote.
    app.router.add_post("/{tail:.*}", _infer)
    return app


@asynccontextmanager
async def builtin_endpoint() -> AsyncIterator[str]:
    """The reference endpoint on a free loopback port for the length of one run
    (``api_base = "builtin"``); yields its URL."""
    runner, url, _ = await start_server("127.0.0.1", 0)
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
