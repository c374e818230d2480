"""The reference endpoint's OpenAI routes over real HTTP on 127.0.0.1, answered as vLLM answers."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from batchrun.chat import ChatCodec, read_messages
from batchrun.completions import CompletionsCodec
from batchrun.protocol import CustomCodec, Usage
from batchrun.server import STATS, ServerOptions, toy_output, toy_tokens, toy_words
from tests.test_server import MODEL, run, server_in_thread


def root(url: str) -> str:
    return url.removesuffix("/inference")


async def post(session: aiohttp.ClientSession, url: str, body: Any) -> tuple[int, Any]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with session.post(url, data=data, headers={"Content-Type": "application/json"}) as resp:
        return resp.status, await resp.json()


def finish(text: str, max_tokens: int = 16) -> str:
    return "length" if toy_tokens(text) == max_tokens else "stop"


# --- toy model ---------------------------------------------------------------------------------


def test_toy_words_are_the_custom_output_without_the_prompt_and_differ_per_sample() -> None:
    for prompt in ["The capital of France is P", "", "é\n"]:
        assert toy_output(MODEL, prompt, {"max_tokens": 8})[0] == f"{prompt} {toy_words(MODEL, prompt, {'max_tokens': 8})}"
    samples = {toy_words(MODEL, "p", {}, s) for s in range(8)}
    assert len(samples) == 8


# --- /v1/completions -----------------------------------------------------------------------------


def test_completions_answer_has_vllm_shape_index_per_prompt_and_usage_per_request() -> None:
    prompts = ["The capital of France is", "one two", "The capital of France is"]

    async def body(session: aiohttp.ClientSession, url: str, app: web.Application) -> None:
        status, doc = await post(session, root(url) + "/v1/completions",
                                 {"model": MODEL, "prompt": prompts, "max_tokens": 5, "temperature": 0, "seed": 7})
        assert status == 200
        assert doc["object"] == "text_completion" and doc["model"] == MODEL and doc["id"].startswith("cmpl-")
        assert abs(doc["created"] - time.time()) < 60
        eff = {"max_tokens": 5, "temperature": 0}
        texts = [toy_words(MODEL, p, eff) for p in prompts]
        assert doc["choices"] == [
            {"index": i, "text": t, "logprobs": None, "finish_reason": finish(t, 5)} for i, t in enumerate(texts)
        ]
        completion_tokens = sum(map(toy_tokens, texts))
        assert doc["usage"] == {"prompt_tokens": 12, "completion_tokens": completion_tokens, "total_tokens": 12 + completion_tokens}
        stats = app[STATS]
        assert (stats.requests, stats.prompts, stats.batch_sizes) == (1, 3, {3: 1})

    run(body)


def test_completions_with_n_are_prompt_major_and_a_string_prompt_is_one_prompt() -> None:
    async def body(session: aiohttp.ClientSession, url: str, app: web.Application) -> None:
        status, doc = await post(session, root(url) + "/v1/completions", {"model": "m", "prompt": ["a", "b"], "n": 3})
        assert status == 200
        assert [c["index"] for c in doc["choices"]] == list(range(6))
        assert [c["text"] for c in doc["choices"]] == [toy_words("m", p, {}, s) for p in "ab" for s in range(3)]
        _, solo = await post(session, root(url) + "/v1/completions", {"model": "m", "prompt": "a"})
        assert solo["choices"][0]["text"] == doc["choices"][0]["text"]

    run(body)


@pytest.mark.parametrize(
    ("path", "body", "message"),
    [
        ("/v1/completions", b"{", "body is not JSON (JSONDecodeError)"),
        ("/v1/completions", {"prompt": ["a"]}, "model must be a string (got NoneType)"),
        ("/v1/completions", {"model": "m"}, "prompt must be a string or a non-empty list of strings (got null)"),
        ("/v1/completions", {"model": "m", "prompt": []}, "prompt must be a string or a non-empty list of strings (got empty list)"),
        ("/v1/completions", {"model": "m", "prompt": [[1, 2]]}, "prompt[0] must be a string (got list)"),
        ("/v1/completions", {"model": "m", "prompt": ["a"], "max_tokens": 0}, "max_tokens must be between 1 and 4096 (got 0)"),
        ("/v1/completions", {"model": "m", "prompt": ["a"], "n": 0}, "n must be an integer between 1 and 64 (got 0)"),
        ("/v1/completions", {"model": "m", "prompt": ["a"], "stream": True}, "stream is not supported"),
        ("/v1/chat/completions", {"model": "m"}, "messages is required"),
        ("/v1/chat/completions", {"model": "m", "messages": "hi"}, "messages must be a list of {role, content} (got str)"),
        ("/v1/chat/completions", {"model": "m", "messages": [{"role": "bot", "content": "x"}]}, "messages[0].role must be one of"),
        ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": -1},
         "temperature must be >= 0"),
    ],
)
def test_bad_openai_requests_answer_400_with_an_openai_error_body(path: str, body: Any, message: str) -> None:
    async def check(session: aiohttp.ClientSession, url: str, app: web.Application) -> None:
        status, doc = await post(session, root(url) + path, body)
        assert status == 400
        assert doc["error"]["type"] == "BadRequestError" and doc["error"]["code"] == 400
        assert doc["error"]["message"].startswith(message), doc
        assert (app[STATS].rejected, app[STATS].requests) == (1, 0)

    run(check)


def test_a_prompt_past_the_context_fails_its_whole_request_as_vllm_does() -> None:
    async def body(session: aiohttp.ClientSession, url: str, app: web.Application) -> None:
        status, doc = await post(session, root(url) + "/v1/completions", {"model": "m", "prompt": ["short", "w " * 9]})
        assert status == 400
        assert doc["error"]["message"].startswith("This model's maximum context length is 8 tokens. However, you requested 9")
        assert (await post(session, root(url) + "/v1/completions", {"model": "m", "prompt": ["w " * 8]}))[0] == 200
        chat = {"model": "m", "messages": [{"role": "system", "content": "a b c d"}, {"role": "user", "content": "e f g h i"}]}
        assert (await post(session, root(url) + "/v1/chat/completions", chat))[0] == 400

    run(body, ServerOptions(max_prompt_tokens=8))


def test_a_body_over_the_limit_answers_413_in_openai_shape() -> None:
    async def body(session: aiohttp.ClientSession, url: str, app: web.Application) -> None:
        status, doc = await post(session, root(url) + "/v1/completions", {"model": "m", "prompt": ["x" * 2000]})
        assert (status, doc["error"]["code"], doc["error"]["message"]) == (413, 413, "body is larger than 1000 bytes")

    run(body, ServerOptions(max_body_bytes=1000))


# --- /v1/chat/completions and /v1/models ------------------------------------------------------------


def test_chat_answers_n_assistant_messages_for_the_conversation_with_its_usage() -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}]

    async def body(session: aiohttp.ClientSession, url: str, app: web.Application) -> None:
        status, doc = await post(session, root(url) + "/v1/chat/completions",
                                 {"model": MODEL, "messages": messages, "n": 2, "max_completion_tokens": 6})
        assert status == 200 and doc["object"] == "chat.completion" and doc["id"].startswith("chatcmpl-")
        texts = [toy_words(MODEL, read_messages(messages), {"max_tokens": 6}, s) for s in range(2)]
        assert doc["choices"] == [
            {"index": s, "message": {"role": "assistant", "content": t}, "logprobs": None, "finish_reason": finish(t, 6)}
            for s, t in enumerate(texts)
        ]
        assert doc["usage"]["prompt_tokens"] == 5 and doc["usage"]["completion_tokens"] == sum(map(toy_tokens, texts))
        assert app[STATS].prompts_seen == {"Capital of France?": 1}

    run(body, ServerOptions(tally_prompts=True))


def test_models_lists_the_served_model_and_the_custom_route_still_answers_elsewhere() -> None:
    async def body(session: aiohttp.ClientSession, url: str, app: web.Application) -> None:
        async with session.get(root(url) + "/v1/models") as resp:
            assert resp.status == 200
            assert await resp.json() == {
                "object": "list", "data": [{"id": "tiny", "object": "model", "created": 0, "owned_by": "batchrun"}]
            }
        status, doc = await post(session, root(url) + "/v1/generate", {"model": "m", "params": {"prompt": ["p"]}})
        assert (status, doc["message"], doc["data"][0]["output"]) == (200, "ok", toy_output("m", "p", {}))

    run(body, ServerOptions(served_model="tiny"))


# --- the codecs against the routes -------------------------------------------------------------------


def test_the_codecs_requests_get_answers_they_match_to_the_right_rows() -> None:
    prompts = [f"prompt number {i}" for i in range(10)] + ["prompt number 3"]

    async def body(session: aiohttp.ClientSession, url: str, app: web.Application) -> None:
        base = root(url) + "/v1"
        codec = CompletionsCodec(MODEL, {"max_tokens": 12, "temperature": 0, "n": 2, "seed": 7})
        async with session.post(base + "/completions", data=codec.build_request(prompts)) as resp:
            m = codec.match(await resp.read(), prompts)
        eff = {"max_tokens": 12, "temperature": 0}
        assert m.problem is None and m.usage is not None and m.usage.prompt_tokens == 33
        assert {i: a.output for i, a in m.answers.items()} == {
            i: [toy_words(MODEL, p, eff, 0), toy_words(MODEL, p, eff, 1)] for i, p in enumerate(prompts)
        }
        assert m.answers[0].params_json == '{"max_tokens":12,"n":2,"seed":7,"temperature":0}'

        chat = ChatCodec(MODEL, {"max_tokens": 4}, system="You are terse.")
        async with session.post(base + "/chat/completions", data=chat.build_request(["Hi?"])) as resp:
            m = chat.match(await resp.read(), ["Hi?"])
        conversation = read_messages([{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi?"}])
        text = toy_words(MODEL, conversation, {"max_tokens": 4})
        assert m.problem is None and m.answers[0].output == [text]
        assert m.answers[0][3:] == (4, toy_tokens(text)) and m.usage == Usage(4, toy_tokens(text))

        rows = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}, {"role": "user", "content": "q2"}]
        column = ChatCodec(MODEL, {}, messages_column=True)
        async with session.post(base + "/chat/completions", data=column.build_request([read_messages(rows)])) as resp:
            m = column.match(await resp.read(), ["ignored"])
        assert m.answers[0].output == [toy_words(MODEL, read_messages(rows), {})]

        error = b""
        async with session.post(base + "/completions", data=CompletionsCodec(MODEL, {"top_p": 0}).build_request(["x"])) as resp:
            assert resp.status == 400
            error = await resp.read()
        assert codec.error_reason(error) == "top_p must be in (0, 1] (got 0.0) (BadRequestError, 400)"
        assert CustomCodec(MODEL, {}).error_reason(error) is None

    run(body)


# --- the official openai client (optional; never a dependency of batchrun) ---------------------------

# The client runs in a script of its own, in a venv of its own (BATCHRUN_OPENAI_PYTHON, made by
# .ci/run), so its dependency tree never meets ours.
_OPENAI_CALLS = """
import json, sys
from openai import OpenAI
client = OpenAI(base_url=sys.argv[1], api_key="sk-test", max_retries=0)
done = client.completions.create(model="tiny", prompt=["a b", "c"], max_tokens=6, n=2, temperature=0)
chat = client.chat.completions.create(
    model="tiny", max_tokens=5,
    messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}],
)
try:
    client.completions.create(model="tiny", prompt=["x"], max_tokens=0)
    error = None
except Exception as exc:
    error = [type(exc).__name__, exc.status_code, exc.body]
print(json.dumps({
    "models": [m.id for m in client.models.list()],
    "completions": [[c.index, c.text, c.finish_reason] for c in done.choices],
    "usage": [done.usage.prompt_tokens, done.usage.completion_tokens],
    "chat": [chat.choices[0].message.content, chat.choices[0].finish_reason, chat.usage.prompt_tokens],
    "error": error,
}))
"""


def _openai_python() -> str:
    configured = os.environ.get("BATCHRUN_OPENAI_PYTHON")
    if configured and os.path.exists(configured):
        return configured
    if os.environ.get("CI"):
        pytest.fail("CI must provide the openai client: set BATCHRUN_OPENAI_PYTHON to a venv's python with openai")
    pytest.skip("the openai client is not installed here (set BATCHRUN_OPENAI_PYTHON to a venv's python with openai)")


def test_the_official_openai_client_gets_the_toy_answers_and_reads_the_errors() -> None:
    python = _openai_python()
    with server_in_thread(ServerOptions(served_model="tiny")) as (url, app):
        proc = subprocess.run([python, "-c", _OPENAI_CALLS, root(url) + "/v1"], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        got = json.loads(proc.stdout.strip().splitlines()[-1])
    eff = {"max_tokens": 6, "temperature": 0}
    texts = [toy_words("tiny", p, eff, s) for p in ("a b", "c") for s in range(2)]
    assert got["models"] == ["tiny"]
    assert got["completions"] == [[i, t, finish(t, 6)] for i, t in enumerate(texts)]
    assert got["usage"] == [3, sum(map(toy_tokens, texts))]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}]
    content = toy_words("tiny", read_messages(messages), {"max_tokens": 5})
    assert got["chat"] == [content, finish(content, 5), 5]
    name, status, body = got["error"]
    assert (name, status) == ("BadRequestError", 400)
    assert body["message"].startswith("max_tokens must be between 1 and 4096")


def test_requests_to_the_openai_routes_count_in_the_stats_like_custom_ones() -> None:
    hold = asyncio.Event()

    async def body(session: aiohttp.ClientSession, url: str, app: web.Application) -> None:
        stats = app[STATS]
        task = asyncio.create_task(post(session, root(url) + "/v1/completions", {"model": "m", "prompt": ["a", "b"]}))
        deadline = time.monotonic() + 10
        while stats.in_flight != 1:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.005)
        hold.set()
        assert (await task)[0] == 200
        assert (stats.requests, stats.prompts, stats.max_in_flight, stats.in_flight) == (1, 2, 1, 0)

    run(body, ServerOptions(hold=hold))
