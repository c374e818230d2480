"""The reference endpoint, exercised over real HTTP on 127.0.0.1 with an OS-chosen port."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from hypothesis import given
from hypothesis import strategies as st

from batchrun.server import (
    DEFAULT_PARAMS,
    MAX_TOKENS_LIMIT,
    OPTIONS,
    STATS,
    ServerOptions,
    ServerStats,
    effective_params,
    make_app,
    start_server,
    toy_output,
)

MODEL = "meta-llama/Llama-2-13b-hf"


@contextlib.asynccontextmanager
async def serving(
    options: ServerOptions | None = None,
) -> AsyncIterator[tuple[aiohttp.ClientSession, str, web.Application]]:
    runner, url, app = await start_server(options=options)
    try:
        async with aiohttp.ClientSession() as session:
            yield session, url, app
    finally:
        await runner.cleanup()


async def post(session: aiohttp.ClientSession, url: str, body: Any) -> tuple[int, Any]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with session.post(url, data=data, headers={"Content-Type": "application/json"}) as resp:
        return resp.status, await resp.json()


async def until(condition: Callable[[], bool], within_s: float = 10.0) -> None:
    """Wait for a condition the server reaches on its own (no event to await from outside)."""
    deadline = time.monotonic() + within_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


def run(body: Callable[..., Awaitable[Any]], options: ServerOptions | None = None) -> Any:
    async def main() -> Any:
        async with serving(options) as (session, url, app):
            return await body(session, url, app)

    return asyncio.run(main())


def request(prompts: Any, **params: Any) -> dict[str, Any]:
    return {"model": MODEL, "params": {"prompt": prompts, **params}}


# --- the toy model ---------------------------------------------------------------------------


def test_toy_output_is_deterministic_and_starts_with_the_prompt() -> None:
    out = toy_output(MODEL, "The capital of France is P", {"max_tokens": 8})
    assert out == toy_output(MODEL, "The capital of France is P", {"max_tokens": 8})
    assert isinstance(out, list) and len(out) == 1 and isinstance(out[0], str)
    assert out[0].startswith("The capital of France is P ")
    assert 1 <= len(out[0].split()) - 6 <= 8


def test_toy_output_differs_across_prompts_params_and_models() -> None:
    base = toy_output(MODEL, "hello", {})
    assert toy_output(MODEL, "hello!", {}) != base
    assert toy_output("other-model", "hello", {}) != base
    assert toy_output(MODEL, "hello", {"temperature": 0.5}) != base
    assert toy_output(MODEL, "hello", {"top_k": 1}) != base


def test_toy_output_depends_on_effective_params_only() -> None:
    """Absent, null, the default value and unknown keys all mean the same params."""
    base = toy_output(MODEL, "x", {})
    assert toy_output(MODEL, "x", {"max_tokens": None, "temperature": None, "top_p": None, "top_k": None}) == base
    assert toy_output(MODEL, "x", dict(DEFAULT_PARAMS)) == base
    assert toy_output(MODEL, "x", {"temperature": 1, "top_p": 1}) == base  # 1 and 1.0 alike
    assert toy_output(MODEL, "x", {"prompt": ["ignored"], "stop": ["\n"]}) == base


@pytest.mark.parametrize("prompt", ["", " ", "\n", "line1\nline2\r\n", "é中文🙂", "\ud800", "\x00", "a" * 10_000])
def test_toy_output_handles_odd_prompts(prompt: str) -> None:
    out = toy_output(MODEL, prompt, {"max_tokens": 4})
    assert out[0].startswith(prompt + " ") and len(out[0]) > len(prompt) + 1


@given(prompt=st.text(), max_tokens=st.integers(1, 64))
def test_toy_output_word_count_is_within_max_tokens(prompt: str, max_tokens: int) -> None:
    out = toy_output(MODEL, prompt, {"max_tokens": max_tokens})[0]
    words = out[len(prompt) + 1 :].split(" ")
    assert out[: len(prompt)] == prompt and 1 <= len(words) <= max_tokens and all(words)


@given(a=st.text(), b=st.text())
def test_toy_output_differs_for_different_prompts(a: str, b: str) -> None:
    if a != b:
        assert toy_output(MODEL, a, {}) != toy_output(MODEL, b, {})


def test_effective_params_fills_defaults_and_normalises_numbers() -> None:
    assert effective_params({}) == DEFAULT_PARAMS
    assert effective_params({"max_tokens": 3, "temperature": 0, "top_p": 1, "top_k": 0, "n": 2}) == {
        "max_tokens": 3, "temperature": 0.0, "top_p": 1.0, "top_k": 0,
    }
    assert isinstance(effective_params({"temperature": 0})["temperature"], float)


@pytest.mark.parametrize(
    ("params", "reason"),
    [
        ({"max_tokens": 0}, "params.max_tokens must be between 1"),
        ({"max_tokens": MAX_TOKENS_LIMIT + 1}, "params.max_tokens must be between 1"),
        ({"max_tokens": "16"}, "params.max_tokens must be an integer"),
        ({"max_tokens": 16.0}, "params.max_tokens must be an integer"),
        ({"max_tokens": True}, "params.max_tokens must be an integer"),
        ({"temperature": -0.1}, "params.temperature must be >= 0"),
        ({"temperature": math.nan}, "params.temperature must be a finite number"),
        ({"temperature": "hot"}, "params.temperature must be a finite number"),
        ({"top_p": 0}, "params.top_p must be in (0, 1]"),
        ({"top_p": 1.5}, "params.top_p must be in (0, 1]"),
        ({"top_k": -1}, "params.top_k must be >= 0"),
        ({"top_k": 2.5}, "params.top_k must be an integer"),
    ],
)
def test_effective_params_rejects_bad_values(params: dict[str, Any], reason: str) -> None:
    with pytest.raises(ValueError, match=re.escape(reason)):
        effective_params(params)


# --- the HTTP endpoint -----------------------------------------------------------------------


def test_response_has_the_exact_shape_one_item_per_prompt_in_order() -> None:
    prompts = ["The capital of France is P", "The capital of Italy is R", "Z", "The capital of France is P"]

    async def body(session: aiohttp.ClientSession, url: str, app: web.Application) -> None:
        sent = request(prompts, max_tokens=32, temperature=0.7, top_p=1.0, top_k=40)
        async with session.post(url, json=sent) as resp:
            assert resp.status == 200
            assert resp.content_type == "application/json"
            doc = await resp.json()
        used = {"max_tokens": 32, "temperature": 0.7, "top_p": 1.0, "top_k": 40}
        assert doc == {
            "data": [{"prompt": p, "output": toy_output(MODEL, p, used), "params": used} for p in prompts],
            "message": "ok",
        }

    run(body)


def test_any_post_path_is_the_endpoint() -> None:
    async def body(session: aiohttp.ClientSession, url: str, app: web.Application) -> None:
        root = url.removesuffix("/inference")
        for path in ["/", "/inference", "/v1/generate", "/stats"]:
            status, doc = await post(session, root + path, request(["p"]))
            assert (status, doc["message"], len(doc["data"])) == (200, "ok", 1), path

    run(body)


def test_null_params_use_the_defaults() -> None:
    """LiteLLM sends every parameter the caller did not set as JSON null."""

    async def body(session: aiohttp.ClientSession, url: str, app: web.Application) -> None:
        nulls = {"max_tokens": None, "temperature": None, "top_p": None, "top_k": None}
        status, doc = await post(session, url, request(["a"], **nulls))
        assert status == 200
        assert doc["data"] == [{"prompt": "a", "output": toy_output(MODEL, "a", {}), "params": DEFAULT_PARAMS}]

    run(body)


def test_unknown_keys_are_ignored() -> None:
    """LiteLLM >= 1.74 merges extra_body keys into the top level; unknown params are ignored too."""

    async def body(session: aiohttp.ClientSession, url: str, app: web.Application) -> None:
        plain = await post(session, url, request(["a", "b"]))
        extra = await post(session, url, {**request(["a", "b"], stop=["\n"], n=3), "user": "x", "metadata": {}})
        assert plain == extra and plain[0] == 200

    run(body)


def test_a_single_string_prompt_is_one_prompt() -> None:
    async def body(session: aiohttp.ClientSession, url: str, app: web.Application) -> None:
        assert await post(session, url, request("solo")) == await post(session, url, request(["solo"]))
        assert app[STATS].batch_sizes == {1: 2}

    run(body)


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"{", "body is not JSON"),
        (b"", "body is not JSON"),
        (b'{"model": "m", "params": {"prompt": ["\xff"]}}', "body is not JSON"),
        (b"[" * 100_000, "body is not JSON"),
        (b"[]", "body must be a JSON object (got list)"),
        ({"params": {"prompt": ["a"]}}, "model must be a string (got NoneType)"),
        ({"model": 7, "params": {"prompt": ["a"]}}, "model must be a string (got int)"),
        ({"model": "m"}, "params must be an object (got NoneType)"),
        ({"model": "m", "params": None}, "params must be an object (got NoneType)"),
        ({"model": "m", "params": ["a"]}, "params must be an object (got list)"),
        ({"model": "m", "params": {}}, "params.prompt must be a non-empty list of strings (got null)"),
        ({"model": "m", "params": {"prompt": []}}, "params.prompt must be a non-empty list of strings (got empty"),
        ({"model": "m", "params": {"prompt": 3}}, "params.prompt must be a non-empty list of strings (got int)"),
        ({"model": "m", "params": {"prompt": ["a", 1]}}, "params.prompt[1] must be a string (got int)"),
        ({"model": "m", "params": {"prompt": ["a"], "max_tokens": 0}}, "params.max_tokens must be between 1"),
        ({"model": "m", "params": {"prompt": ["a"], "top_p": "1"}}, "params.top_p must be a finite number"),
        (b'{"model": "m", "params": {"prompt": ["a"], "temperature": Infinity}}', "params.temperature must be"),
    ],
)
def test_bad_requests_answer_400_with_a_reason(body: Any, reason: str) -> None:
    async def check(session: aiohttp.ClientSession, url: str, app: web.Application) -> None:
        status, doc = await post(session, url, body)
        assert status == 400
        assert doc["data"] == [] and doc["message"].startswith(reason)
        stats = app[STATS]
        assert (stats.rejected, stats.requests, stats.prompts, stats.in_flight) == (1, 0, 0, 0)

    run(check)


def test_a_body_over_the_limit_answers_413() -> None:
    async def body(session: aiohttp.ClientSession, url: str, app: web.Application) -> None:
        status, doc = await post(session, url, request(["x" * 2000]))
        assert (status, doc) == (413, {"message": "body is larger than 1000 bytes", "data": []})
        assert (await post(session, url, request(["small"])))[0] == 200

    run(body, ServerOptions(max_body_bytes=1000))


# --- stats, latency, concurrency -------------------------------------------------------------


def test_stats_count_requests_prompts_and_batch_sizes() -> None:
    async def body(session: aiohttp.ClientSession, url: str, app: web.Application) -> None:
        for prompts in (["a", "b", "c"], ["d"], ["e", "a", "a"], ["f"]):
            assert (await post(session, url, request(prompts)))[0] == 200
        await post(session, url, b"nope")
        stats = app[STATS]
        assert (stats.requests, stats.prompts, stats.rejected, stats.max_batch) == (4, 8, 1, 3)
        assert stats.batch_sizes == {3: 2, 1: 2}
        assert stats.prompts_seen == {"a": 3, "b": 1, "c": 1, "d": 1, "e": 1, "f": 1}
        async with session.get(url.removesuffix("/inference") + "/stats") as resp:
            assert await resp.json() == {
                "requests": 4, "prompts": 8, "rejected": 1, "shed": 0, "in_flight": 0, "max_in_flight": 1,
                "max_batch": 3, "batch_sizes": {"1": 2, "3": 2},
                "distinct_prompts": 6, "prompts_seen_more_than_once": 1,
            }
        stats.reset()
        assert stats == ServerStats() and app[STATS] is stats

    run(body, ServerOptions(tally_prompts=True))


def test_health() -> None:
    async def body(session: aiohttp.ClientSession, url: str, app: web.Application) -> None:
        async with session.get(url.removesuffix("/inference") + "/health") as resp:
            assert (resp.status, await resp.json()) == (200, {"ok": True})

    run(body)


def test_max_in_flight_counts_concurrent_requests() -> None:
    hold = asyncio.Event()

    async def body(session: aiohttp.ClientSession, url: str, app: web.Application) -> None:
        stats = app[STATS]
        tasks = [asyncio.create_task(post(session, url, request([f"p{i}"]))) for i in range(5)]
        await until(lambda: stats.in_flight == 5)
        hold.set()
        answers = await asyncio.gather(*tasks)
        assert [doc["data"][0]["prompt"] for _, doc in answers] == [f"p{i}" for i in range(5)]
        assert (stats.max_in_flight, stats.in_flight, stats.requests) == (5, 0, 5)

    run(body, ServerOptions(latency_s=0.05, hold=hold))


def test_latency_delays_every_request() -> None:
    async def body(session: aiohttp.ClientSession, url: str, app: web.Application) -> None:
        start = time.monotonic()
        assert (await post(session, url, request(["a"])))[0] == 200
        assert time.monotonic() - start >= 0.2

    run(body, ServerOptions(latency_s=0.2))


def test_per_prompt_latency_adds_per_prompt() -> None:
    async def body(session: aiohttp.ClientSession, url: str, app: web.Application) -> None:
        start = time.monotonic()
        assert (await post(session, url, request(["a", "b", "c", "d"])))[0] == 200
        assert time.monotonic() - start >= 0.2

    run(body, ServerOptions(per_prompt_s=0.05))


def test_a_client_that_gives_up_leaves_no_request_in_flight() -> None:
    """The handler is cancelled with its client, so in_flight drops; the prompt still counts as seen."""

    async def body(session: aiohttp.ClientSession, url: str, app: web.Application) -> None:
        stats = app[STATS]
        task = asyncio.create_task(post(session, url, request(["slow"])))
        await until(lambda: stats.in_flight == 1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await until(lambda: stats.in_flight == 0)
        assert stats.prompts_seen == {"slow": 1}

    run(body, ServerOptions(hold=asyncio.Event(), tally_prompts=True))


def test_start_server_returns_the_real_url_and_app() -> None:
    async def main() -> None:
        options = ServerOptions(latency_s=0.01)
        runner, url, app = await start_server("127.0.0.1", 0, options, path="v1/gen")
        try:
            assert url.startswith("http://127.0.0.1:") and url.endswith("/v1/gen")
            assert int(url.split(":")[2].split("/")[0]) > 0
            assert app[OPTIONS] is options and isinstance(app[STATS], ServerStats)
        finally:
            await runner.cleanup()

    asyncio.run(main())


def test_make_app_defaults() -> None:
    app = make_app()
    assert app[OPTIONS] == ServerOptions() and app[STATS] == ServerStats()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_serve_forever_prints_its_url_and_stops_on_ctrl_c_or_sigterm(sig: signal.Signals) -> None:
    code = "from batchrun.server import ServerOptions, serve_forever; serve_forever('127.0.0.1', 0, ServerOptions())"
    with subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) as proc:
        try:
            line = proc.stdout.readline()  # type: ignore[union-attr]
            assert line.startswith("batchrun reference endpoint on http://127.0.0.1:")
            url = line.split(" on ")[1].strip()
            assert url.endswith("/inference") and not url.startswith("http://127.0.0.1:0/")
            with urllib.request.urlopen(url.removesuffix("/inference") + "/health", timeout=30) as resp:
                assert json.load(resp) == {"ok": True}
            proc.send_signal(sig)
            assert proc.wait(timeout=30) == 0
            assert proc.stdout.read() == ""  # type: ignore[union-attr]
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


# --- LiteLLM's own client (skipped where litellm is not installed) -----------------------------


@contextlib.contextmanager
def server_in_thread(options: ServerOptions | None = None) -> Iterator[tuple[str, web.Application]]:
    """The endpoint on its own loop in a thread, for synchronous clients."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        runner, url, app = asyncio.run_coroutine_threadsafe(start_server(options=options), loop).result(30)
        try:
            yield url, app
        finally:
            asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(30)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)
        loop.close()


# LiteLLM's client in a script of its own: LiteLLM lives in a virtual environment of its own
# (BATCHRUN_LITELLM_PYTHON, made by .ci/run), so its large dependency tree never meets ours.
_LITELLM_CALL = """
import json, os, sys, warnings
os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"  # no fetch of the price list at import
warnings.simplefilter("ignore")
import litellm
url, model = sys.argv[1], sys.argv[2]
resp = litellm.completion(
    model=f"custom/{model}", api_base=url,
    messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}],
    max_tokens=8, temperature=0.5,
)
print(json.dumps({"content": resp.choices[0].message.content}))
"""


def _litellm_python() -> str:
    configured = os.environ.get("BATCHRUN_LITELLM_PYTHON")
    if configured and os.path.exists(configured):
        return configured
    if os.environ.get("CI"):
        pytest.fail("CI must provide LiteLLM: set BATCHRUN_LITELLM_PYTHON to a venv's python with litellm")
    pytest.skip("LiteLLM is not installed here (set BATCHRUN_LITELLM_PYTHON to a venv's python with litellm)")


def test_litellm_custom_provider_gets_the_toy_output() -> None:
    python = _litellm_python()
    with server_in_thread(ServerOptions(tally_prompts=True)) as (url, app):
        proc = subprocess.run(
            [python, "-c", _LITELLM_CALL, url, MODEL], capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 0, proc.stderr
        content = json.loads(proc.stdout.strip().splitlines()[-1])["content"]
        # LiteLLM joins the message contents with spaces and sends them as one prompt.
        prompt = "Be brief. Capital of France?"
        assert content == toy_output(MODEL, prompt, {"max_tokens": 8, "temperature": 0.5})[0]
        stats = app[STATS]
        assert (stats.requests, stats.rejected, stats.batch_sizes, stats.prompts_seen) == (1, 0, {1: 1}, {prompt: 1})
