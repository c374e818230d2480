"""A real vLLM OpenAI-compatible server (issue 14): what batchrun's packed requests rely on.

One server for the whole run, started by the session fixture ``vllm`` (tests/conftest.py) with a
tiny random-weight model; vLLM lives in a venv of its own named by BATCHRUN_VLLM_PYTHON (see
tests/realvllm.py). Every test using the fixture runs on one xdist worker (``--dist loadgroup``;
conftest marks them), so the server starts once. Off CI without vLLM these tests are skipped; on
CI a missing vLLM is a failure.

These first tests talk to vLLM directly (urllib), to pin the server facts batchrun's
``openai-completions`` protocol builds on. batchrun's own end-to-end runs against the same server
go at the end of this file (see "batchrun against vLLM").
"""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from realvllm import MAX_MODEL_LEN, VllmServer

REPO = Path(__file__).parent.parent

# Every test here waits for the shared server on first use (60-100 s to start here, more on a
# busy machine) before its own work.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def post(vllm: VllmServer, path: str, body: dict[str, Any], timeout: float = 120) -> tuple[int, dict[str, Any]]:
    """POST JSON to the server; the status and the decoded body, for errors too."""
    req = urllib.request.Request(
        f"{vllm.api_base}{path}", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        with e:
            return e.code, json.loads(e.read())


def completions(vllm: VllmServer, prompt: str | list[str], **params: Any) -> list[str]:
    """The texts of a /v1/completions answer, ordered by each choice's ``index``."""
    status, doc = post(vllm, "/completions", {"model": vllm.model, "prompt": prompt, **params})
    assert status == 200, doc
    n = len(prompt) if isinstance(prompt, list) else 1
    by_index = {c["index"]: c["text"] for c in doc["choices"]}
    assert sorted(by_index) == list(range(n)), [c["index"] for c in doc["choices"]]
    return [by_index[i] for i in range(n)]


# Greedy outputs of the tiny model for these 32 prompts are pairwise distinct at 8 tokens (the model
# is the same on every machine: fixed seed, fixed tokenizer corpus). Not every prompt set is: with
# 8 tokens of a random model two prompts can share an output, so change these with care.
_WORDS = "river lantern quartz meadow falcon copper glacier orchid summit willow harbor ember".split()
PROMPTS = [f"Prompt {i}: write one line about {_WORDS[i % len(_WORDS)]}" for i in range(32)]
GREEDY = {"temperature": 0, "max_tokens": 8}


def test_a_packed_request_answers_each_prompt_exactly_as_that_prompt_alone(vllm: VllmServer) -> None:
    """32 prompts in one request (``"prompt": [list]``): choice ``index`` i carries prompt i's own
    greedy output, the same text as prompt i sent by itself; and the outputs are pairwise distinct,
    so a choice given to the wrong prompt could not go unseen."""
    assert len(set(PROMPTS)) == 32
    packed = completions(vllm, PROMPTS, **GREEDY)
    with ThreadPoolExecutor(8) as pool:
        alone = list(pool.map(lambda p: completions(vllm, p, **GREEDY)[0], PROMPTS))
    assert packed == alone
    assert len(set(packed)) == len(packed), packed
    assert all(packed), packed


def test_a_prompt_longer_than_the_context_fails_the_whole_packed_request_with_an_openai_error(vllm: VllmServer) -> None:
    """One prompt past ``--max-model-len`` in a packed request: 400 and an OpenAI-style
    ``{"error": {"message": ...}}`` body naming the context length, for the whole request (the
    poison prompt batchrun must isolate)."""
    poison = " ".join(f"word{i}" for i in range(2 * MAX_MODEL_LEN))
    status, doc = post(vllm, "/completions", {"model": vllm.model, "prompt": [PROMPTS[0], poison, PROMPTS[1]], **GREEDY})
    assert status == 400, doc
    assert isinstance(doc.get("error"), dict), doc
    assert "maximum context length" in doc["error"]["message"], doc
    assert str(MAX_MODEL_LEN) in doc["error"]["message"], doc
    assert "choices" not in doc


def test_chat_completions_answers_with_a_message(vllm: VllmServer) -> None:
    """``/v1/chat/completions`` works with the tiny model's chat template: one choice, an
    assistant message with text content."""
    status, doc = post(vllm, "/chat/completions", {
        "model": vllm.model, "messages": [{"role": "user", "content": PROMPTS[0]}], **GREEDY,
    })
    assert status == 200, doc
    [choice] = doc["choices"]
    assert choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str) and choice["message"]["content"], choice


def test_the_vllm_benchmark_runs_at_smoke_size_against_the_shared_server(vllm: VllmServer, tmp_path: Path) -> None:
    """``python -m tests.benchmarks vllm --smoke`` against this server: every contender answered
    every prompt and reported a rate (how fast is never asserted)."""
    import subprocess

    figures_path = tmp_path / "figures.json"
    ran = subprocess.run(
        [sys.executable, "-m", "tests.benchmarks", "vllm", "--smoke", "--vllm-api-base", vllm.api_base,
         "--workdir", str(tmp_path / "work"), "--json", str(figures_path)],
        cwd=REPO, capture_output=True, text=True, timeout=400,
    )
    print(ran.stdout)
    assert ran.returncode == 0, ran.stderr[-4000:]
    rows = json.loads(figures_path.read_text())["vllm"]
    assert {r["kind"] for r in rows} >= {"vllm-packed", "vllm-single"}
    for r in rows:
        assert r["prompts"] == r["expected_prompts"] and r["steady_rate"] > 0, r
    assert len({d for r in rows for d in r["outputs_sha"]}) == 1, "packed and single answered differently"
    assert "## vllm" in ran.stdout


# -- batchrun against vLLM ------------------------------------------------------------------------
# End-to-end runs of batchrun with protocol "openai-completions" go here: take the ``vllm``
# fixture, point a job at ``vllm.api_base`` with model ``vllm.model`` ("tiny"), and compare each
# row's output with ``completions(vllm, prompt, temperature=0, ...)`` of the same prompt alone
# (greedy outputs of the tiny model are deterministic and distinct per prompt).
