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
# batchrun's own runs (the CLI, as cron runs it) against the same server: each row's output is
# compared with ``completions(vllm, prompt, temperature=0, ...)`` of the same prompt alone (greedy
# outputs of the tiny model are deterministic and distinct per prompt).


def _job(folder: Path, vllm: VllmServer, rows: list[dict[str, str]], protocol: str, run: str, extra: str = "") -> Path:
    import csv

    with open(folder / "input.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["id", "prompt"])
        w.writeheader()
        w.writerows(rows)
    job = folder / "job.toml"
    job.write_text(
        "[input]\npath = \"input.csv\"\nprompt_column = \"prompt\"\nid_column = \"id\"\n" + extra
        + f"\n[endpoint]\nprotocol = \"{protocol}\"\napi_base = \"{vllm.api_base}\"\nmodel = \"{vllm.model}\"\n"
        + "timeout_s = 300\n\n[params]\ntemperature = 0\nmax_tokens = 8\n\n[run]\n" + run
        + "\nmax_retries = 3\n\n[output]\npath = \"out/result.parquet\"\n",
        encoding="utf-8",
    )
    return job


def _cli(job: Path) -> Any:
    import subprocess

    return subprocess.run([str(Path(sys.executable).with_name("batchrun")), str(job)], cwd=job.parent,
                          capture_output=True, text=True, timeout=500)


def test_batchrun_packs_prompts_to_vllm_every_row_gets_its_prompts_own_output_and_a_too_long_one_fails_alone(
    vllm: VllmServer, tmp_path: Path
) -> None:
    """33 rows through ``openai-completions`` at 8 prompts a request: each of the 32 ordinary rows
    holds the greedy output of its prompt sent alone (pairwise distinct, so a choice on the wrong
    row would show); the prompt past the model's context fails alone as ``rejected`` with vLLM's
    reason, and the rows packed beside it succeed."""
    import polars as pl

    rows = [{"id": f"v{i:02d}", "prompt": p} for i, p in enumerate(PROMPTS)]
    poison = " ".join(f"word{i}" for i in range(2 * MAX_MODEL_LEN))
    rows.insert(13, {"id": "too-long", "prompt": poison})
    job = _job(tmp_path, vllm, rows, "openai-completions", "batch_size = 8\nconcurrency = 2")
    ran = _cli(job)
    print(ran.stdout, ran.stderr[-2000:])
    assert ran.returncode == 3, ran.stderr
    with ThreadPoolExecutor(8) as pool:
        alone = dict(zip(PROMPTS, pool.map(lambda p: completions(vllm, p, **GREEDY)[0], PROMPTS)))
    df = pl.read_parquet(tmp_path / "out" / "result.parquet")
    assert df["id"].to_list() == [r["id"] for r in rows]
    for got in df.iter_rows(named=True):
        if got["id"] == "too-long":
            assert got["output"] is None
            assert got["error"].startswith("rejected: HTTP 400: "), got["error"]
            assert "maximum context length" in got["error"], got["error"]
        else:
            assert got["error"] is None, got
            assert got["output"] == [alone[got["prompt"]]], got
            assert got["finish_reason"] in (["length"], ["stop"]), got
    summary = json.loads((tmp_path / "out" / "result.parquet.summary.json").read_text())
    assert (summary["succeeded"], summary["failed_by_class"]) == (32, {"rejected": 1})
    assert summary["prompt_tokens"] > 0 and summary["completion_tokens"] > 0


def test_batchrun_chat_against_vllm_gives_each_row_the_answer_to_its_own_conversation(
    vllm: VllmServer, tmp_path: Path
) -> None:
    import polars as pl

    rows = [{"id": f"c{i}", "prompt": p} for i, p in enumerate(PROMPTS[:6])]
    job = _job(tmp_path, vllm, rows, "openai-chat", "concurrency = 3", extra='system = "You are terse."\n')
    ran = _cli(job)
    assert ran.returncode == 0, ran.stderr
    df = pl.read_parquet(tmp_path / "out" / "result.parquet")
    for got in df.iter_rows(named=True):
        status, doc = post(vllm, "/chat/completions", {"model": vllm.model, **GREEDY, "messages": [
            {"role": "system", "content": "You are terse."}, {"role": "user", "content": got["prompt"]},
        ]})
        assert status == 200, doc
        assert got["output"] == [doc["choices"][0]["message"]["content"]], got
        assert got["prompt_tokens"] == doc["usage"]["prompt_tokens"] and got["completion_tokens"] > 0
