"""A live test endpoint on 127.0.0.1 (port 0) in its own thread: the reference app plus faults.

Tests run batchrun in the foreground (``run_job`` owns its event loop, the CLI its process), so
the endpoint serves from a background thread with a loop of its own. Faults are chosen per
request by a rule ``(request_number, prompts) -> fault name or None``.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import web

from batchrun import server

Rule = Callable[[int, list[str]], "str | None"]


@dataclass
class FaultLog:
    """Every POST the endpoint received, faulted or not."""

    requests: int = 0
    faults: dict[str, int] = field(default_factory=dict)
    in_flight: int = 0
    max_in_flight: int = 0
    max_batch: int = 0
    prompts_received: list[str] = field(default_factory=list)


def _mutate(kind: str, doc: dict) -> dict | bytes:
    data = doc["data"]
    if kind == "reorder":
        doc["data"] = list(reversed(data))
    elif kind == "drop":
        doc["data"] = data[:-1]
    elif kind == "extra":
        doc["data"] = data + [data[0]]
    elif kind == "alter":
        data[0] = {**data[0], "prompt": data[0]["prompt"] + " (altered)"}
    elif kind == "swap_outputs":
        # Outputs exchanged but prompts echoed faithfully: undetectable by any client, so tests
        # never use it for correctness; it exists to show what the echo check cannot catch.
        if len(data) > 1:
            data[0]["output"], data[1]["output"] = data[1]["output"], data[0]["output"]
    elif kind == "not_ok":
        doc["message"] = "error: model overloaded"
    elif kind == "output_string":
        data[0] = {**data[0], "output": data[0]["output"][0]}
    elif kind == "invalid_json":
        return b'{"data": [ this is not json'
    else:
        raise ValueError(f"unknown fault {kind!r}")
    return doc


class LiveEndpoint:
    """``with LiveEndpoint(rule=...) as ep: ... ep.url ... ep.stats ... ep.log``."""

    def __init__(self, options: server.ServerOptions | None = None, rule: Rule | None = None):
        self.options = options or server.ServerOptions()
        self.rule = rule
        self.log = FaultLog()
        self.url = ""
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._app: web.Application | None = None
        self._lock = threading.Lock()
        self._numbers = itertools.count(1)

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

    def _serve(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        app = server.make_app(self.options)
        app.middlewares.append(self._middleware)
        self._app = app
        runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.5)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}/inference"
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            await runner.cleanup()

    @web.middleware
    async def _middleware(self, request: web.Request, handler):
        if request.method != "POST":
            return await handler(request)
        n = next(self._numbers)
        try:
            prompts = (await request.json())["params"]["prompt"]
        except Exception:
            prompts = []
        log = self.log
        log.requests += 1
        log.in_flight += 1
        log.max_in_flight = max(log.max_in_flight, log.in_flight)
        log.max_batch = max(log.max_batch, len(prompts))
        log.prompts_received.extend(prompts)
        try:
            kind = self.rule(n, prompts) if self.rule else None
            if kind is None:
                return await handler(request)
            log.faults[kind] = log.faults.get(kind, 0) + 1
            if kind.isdigit():
                return web.json_response(
                    {"message": f"injected HTTP {kind}", "data": []}, status=int(kind)
                )
            if kind == "hang":
                await asyncio.sleep(3600)
            if kind == "reset":
                assert request.transport is not None
                request.transport.close()
                raise ConnectionResetError("injected reset")
            resp = await handler(request)
            mutated = _mutate(kind, json.loads(resp.body))
            if isinstance(mutated, bytes):
                return web.Response(body=mutated, content_type="application/json")
            return web.json_response(mutated)
        finally:
            log.in_flight -= 1
