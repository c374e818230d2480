"""OpenAI protocols end to end (issue 14): job files with ``protocol = "openai-completions"`` or
``"openai-chat"`` run through the CLI and ``run_job`` against the reference endpoint's OpenAI
routes, with its faults; every row once, in order, with its own prompt's completion.

The reference model's completion for a prompt is ``toymodel.toy_words(model, prompt, params)``
(for chat, of the conversation's canonical JSON), so a test recomputes each row's output and
proves it landed on its own row.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import PARAMS, MakeJob, cli, prompt_rows, write_csv, write_job
from endpoint import LiveEndpoint, shared_faults
from test_faults import CAUSE, ONE_ITEM, WAITING

from batchrun import run_job
from batchrun.chat import read_messages
from batchrun.server import ServerOptions
from batchrun.toymodel import toy_words

MODEL = "meta-llama/Llama-3.1-8B-Instruct"  # sent as given: no prefix is stripped


def completion(prompt: str, params: dict[str, Any] | None = None, sample: int = 0) -> str:
    return toy_words(MODEL, prompt, dict(PARAMS if params is None else params), sample)


def chat_completion(prompt: str, system: str | None = None, params: dict[str, Any] | None = None) -> str:
    messages = ([{"role": "system", "content": system}] if system is not None else []) + [
        {"role": "user", "content": prompt}
    ]
    return toy_words(MODEL, read_messages(messages), dict(PARAMS if params is None else params))


def openai_job(
    make_job: MakeJob, ep: LiveEndpoint, rows: int | list[dict[str, Any]], protocol: str = "openai-completions",
    **sections: Any,
) -> Any:
    endpoint = {"protocol": protocol, "model": MODEL, **sections.pop("endpoint", {})}
    if protocol == "openai-chat":
        sections["run"] = {"batch_size": 1, **sections.get("run", {})}
    return make_job(rows, url=ep.openai_base, endpoint=endpoint, **sections)


def assert_exact_openai(output: Path, rows: list[dict[str, Any]], protocol: str, system: str | None = None) -> pl.DataFrame:
    df = pl.read_parquet(output)
    assert df["id"].to_list() == [r["id"] for r in rows]
    for got, r in zip(df.iter_rows(named=True), rows):
        assert got["error"] is None, got
        want = chat_completion(r["prompt"], system) if protocol == "openai-chat" else completion(r["prompt"])
        assert got["output"] == [want], got
        assert got["finish_reason"] == ["stop"] or got["finish_reason"] == ["length"]
    return df


# --- the fault suite on the OpenAI routes -----------------------------------------------------

# Faults that spoil the order or the second choice: only a packed answer has either.
PACKED_ONLY = {"reorder", "index_bool", "index_dup"}
OPENAI_FAULTS = [
    pytest.param(kind, protocol, id=f"{kind}-{protocol}")
    for kind in [*CAUSE, *sorted(PACKED_ONLY)]
    for protocol in ("openai-completions", "openai-chat")
    if kind not in ("hang", "slow") and not (protocol == "openai-chat" and kind in PACKED_ONLY)
]
# Prompts resent for one fault of a kind that spoils a choice or two (the rest resend the batch).
SPOILT = {**dict.fromkeys(ONE_ITEM, 1), "index_bool": 1, "index_dup": 2, "reorder": 0}


@pytest.mark.parametrize(("kind", "protocol"), OPENAI_FAULTS)
def test_each_fault_kind_on_the_openai_routes_costs_one_retry_and_puts_no_output_on_a_wrong_row(
    make_job: MakeJob, protocol: str, kind: str
) -> None:
    """A third of the first-time requests faulted with one kind: every row ends with its own
    completion, exactly once; a spoilt choice resends only its prompt (a duplicated index both
    prompts it could be), a reordered answer is matched by index and costs nothing."""
    rows = prompt_rows(24)
    batch = 4 if protocol == "openai-completions" else 1
    faults_of = shared_faults(1 / 3, [kind], seed=5, max_faults=2 if kind in WAITING else 4)

    def rule(n: int, prompts: list[str]) -> str | None:
        return faults_of(n, prompts) if len(prompts) == batch else None  # resends of a spoilt choice are spared
    with LiveEndpoint(rule=rule, huge_bytes=64 * 1024, retry_after_date_s=1.0) as ep:
        job = openai_job(
            make_job, ep, rows, protocol, endpoint={"max_response_mb": 0.01},
            run={"batch_size": batch, "concurrency": 4, "max_retries": 10},
        )
        summary = run_job(job.path)
    faults = ep.log.faults.get(kind, 0)
    assert faults >= 1, "the fault was never injected"
    assert (summary.status, summary.exit_code) == ("complete", 0)
    assert_exact_openai(job.output(), rows, protocol)
    free = kind == "reorder"
    assert summary.requests == ep.log.requests == len(rows) // batch + (0 if free else faults)
    assert summary.prompts_resent == faults * SPOILT.get(kind, batch)
    assert len(ep.log.prompts_received) == len(rows) + summary.prompts_resent


# --- completions -----------------------------------------------------------------------------------


def test_completions_pack_batch_size_prompts_a_request_keep_finish_reason_and_sum_usage(make_job: MakeJob) -> None:
    rows = prompt_rows(40)
    with LiveEndpoint() as ep:
        job = openai_job(make_job, ep, rows, run={"batch_size": 8, "concurrency": 2})
        result = cli(job.path)
    assert result.returncode == 0, result.stderr
    assert Counter(a.prompts for a in ep.log.arrivals) == {8: 5}
    assert all(a.path == "/v1/completions" for a in ep.log.arrivals)
    df = assert_exact_openai(job.output(), rows, "openai-completions")
    assert df.columns[-6:] == ["output", "params", "finish_reason", "error", "attempts", "latency_s"]
    assert df["params"][0] == PARAMS  # what was sent: these servers echo nothing
    summary = job.summary()
    words = sum(len(o[0].split()) for o in df["output"].to_list())
    assert summary["completion_tokens"] == words  # the toy server counts a token a word
    assert summary["prompt_tokens"] == sum(len(r["prompt"].split()) for r in rows)
    assert f"{summary['prompt_tokens']} prompt + {words} completion tokens" in result.stdout
    status = json.loads(cli("status", job.path, "--json").stdout)
    assert (status["prompt_tokens"], status["completion_tokens"]) == (summary["prompt_tokens"], words)


def test_any_param_is_sent_as_given_and_n_gives_each_row_its_samples_in_order(make_job: MakeJob) -> None:
    """stop, seed and n are passed through (they were refused before); with n = 2 each row gets
    its two samples, matched by index = prompt * n + sample."""
    rows = prompt_rows(12)
    params = {**PARAMS, "n": 2, "seed": 7, "stop": ["\n\n"], "presence_penalty": 0.5, "logit_bias": {"50256": -100}}
    with LiveEndpoint(rule=lambda n, p: "reorder" if n == 1 else None) as ep:
        job = openai_job(make_job, ep, rows, params=params, run={"batch_size": 4})
        assert run_job(job.path).exit_code == 0
    bodies = [json.loads(b) for b in ep.log.bodies]
    assert all({k: b[k] for k in params} == params for b in bodies)
    df = pl.read_parquet(job.output())
    for got, r in zip(df.iter_rows(named=True), rows):
        assert got["output"] == [completion(r["prompt"], params, 0), completion(r["prompt"], params, 1)]
        assert len(got["finish_reason"]) == 2
    # Scalars are typed fields of the params struct; lists and tables stay JSON text.
    assert df["params"][0]["seed"] == 7 and json.loads(df["params"][0]["stop"]) == ["\n\n"]


def test_a_prompt_longer_than_the_context_fails_alone_as_rejected_and_its_batch_mates_succeed(make_job: MakeJob) -> None:
    """vLLM answers a packed request holding one over-long prompt with 400 and an OpenAI error
    body; batchrun halves the batch until that prompt stands alone and keeps the server's reason."""
    rows = prompt_rows(16)
    rows[5]["prompt"] = "word " * 100
    with LiveEndpoint(ServerOptions(max_prompt_tokens=50)) as ep:
        job = openai_job(make_job, ep, rows, run={"batch_size": 8})
        summary = run_job(job.path)
    assert (summary.exit_code, summary.failed_by_class) == (3, {"rejected": 1})
    df = pl.read_parquet(job.output())
    for i, got in enumerate(df.iter_rows(named=True)):
        if i == 5:
            assert got["output"] is None
            assert got["error"].startswith("rejected: HTTP 400: This model's maximum context length is 50"), got
        else:
            assert got["output"] == [completion(rows[i]["prompt"])], got


def test_protocol_and_every_param_are_pinned_for_resume(make_job: MakeJob) -> None:
    rows = prompt_rows(8)
    with LiveEndpoint() as ep:
        job = openai_job(make_job, ep, rows, params={**PARAMS, "seed": 1})
        assert cli(job.path).returncode == 0
        write_job(job.folder, ep.openai_base, endpoint={"protocol": "openai-completions", "model": MODEL},
                  params={**PARAMS, "seed": 2})
        changed = cli(job.path)
        assert changed.returncode == 2
        assert "'seed': 1" in changed.stderr and "'seed': 2" in changed.stderr
        write_job(job.folder, ep.url, endpoint={"model": MODEL}, params={**PARAMS, "seed": 1})
        custom = cli(job.path)
    assert custom.returncode == 2
    assert "protocol: 'openai-completions' -> 'custom'" in custom.stderr


# --- chat ------------------------------------------------------------------------------------------


def test_chat_sends_one_conversation_a_request_with_the_system_message_and_keeps_tokens(make_job: MakeJob) -> None:
    rows = prompt_rows(10)
    with LiveEndpoint() as ep:
        job = openai_job(make_job, ep, rows, "openai-chat", input={"system": "You are terse."},
                         run={"concurrency": 3})
        result = cli(job.path)
    assert result.returncode == 0, result.stderr
    assert ep.log.requests == 10 and all(a.path == "/v1/chat/completions" for a in ep.log.arrivals)
    first = json.loads(ep.log.bodies[0])
    assert first["messages"][0] == {"role": "system", "content": "You are terse."}
    assert first["messages"][1]["role"] == "user" and first["model"] == MODEL
    df = assert_exact_openai(job.output(), rows, "openai-chat", system="You are terse.")
    assert df.columns[-2:] == ["prompt_tokens", "completion_tokens"]
    for got in df.iter_rows(named=True):
        assert got["completion_tokens"] == len(got["output"][0].split())
        assert got["prompt_tokens"] == len(got["prompt"].split()) + 3


def test_chat_refuses_a_batch_size_other_than_1_saying_why(make_job: MakeJob) -> None:
    with LiveEndpoint() as ep:
        job = openai_job(make_job, ep, 4, "openai-chat", run={"batch_size": 16})
        result = cli("validate", job.path)
    assert result.returncode == 2
    assert 'run.batch_size: must be 1 with protocol "openai-chat" (got 16): a chat request carries one conversation' in result.stderr
    assert ep.log.requests == 0


def _messages_rows() -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for i in range(8):
        rows.append({"id": f"m{i}", "messages": [
            {"role": "system", "content": f"Persona {i}"},
            {"role": "user", "content": f"Question {i}?"},
        ]})
    rows[3]["messages"] = None  # not sent: skipped
    rows[6]["messages"] = [{"role": "wizard", "content": "?"}]  # malformed: fails its row
    return rows


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_a_messages_column_is_sent_as_given_null_rows_are_skipped_and_malformed_ones_fail_alone(
    tmp_path: Path, fmt: str
) -> None:
    rows = _messages_rows()
    if fmt == "parquet":
        struct = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
        pq.write_table(pa.table({"id": [r["id"] for r in rows], "messages": pa.array([r["messages"] for r in rows], struct)}),
                       tmp_path / "input.parquet")
    else:
        write_csv(tmp_path / "input.csv", [
            {"id": r["id"], "messages": "" if r["messages"] is None else json.dumps(r["messages"])} for r in rows
        ])
    with LiveEndpoint() as ep:
        job = write_job(
            tmp_path, ep.openai_base, input_path=f"input.{fmt}",
            input={"prompt_column": None, "messages_column": "messages"},
            endpoint={"protocol": "openai-chat", "model": MODEL}, run={"batch_size": 1},
        )
        result = cli(job)
    assert result.returncode == 3, result.stderr
    assert ep.log.requests == 6
    df = pl.read_parquet(tmp_path / "out" / "result.parquet")
    for got, r in zip(df.iter_rows(named=True), rows):
        if r["id"] == "m3":
            assert got["output"] is None and got["error"].startswith("empty_prompt: messages is")
        elif r["id"] == "m6":
            assert got["output"] is None
            assert got["error"] == "invalid_input: messages: messages[0].role must be one of system, user, assistant, tool (got 'wizard'); not sent"
        else:
            assert got["output"] == [toy_words(MODEL, read_messages(r["messages"]), PARAMS)], got
    summary = json.loads((tmp_path / "out" / "result.parquet.summary.json").read_text())
    assert (summary["succeeded"], summary["failed"], summary["skipped"]) == (6, 1, 1)


# --- headers, keys, TLS ---------------------------------------------------------------------------


def test_extra_headers_and_headers_from_the_environment_are_sent_and_never_written_or_logged(
    make_job: MakeJob,
) -> None:
    token = "gw-SECRET-4711"
    with LiveEndpoint(rule=lambda n, p: "500echo" if n == 1 else None) as ep:
        job = openai_job(make_job, ep, 8, endpoint={
            "headers": {"X-Team": "search"}, "headers_env": {"X-Gateway-Token": "BATCHRUN_GW_TOKEN"},
        })
        result = cli(job.path, "--log-format", "json", env={"BATCHRUN_GW_TOKEN": token})
    assert result.returncode == 0, result.stderr
    assert all(a.headers.get("X-Team") == "search" and a.headers.get("X-Gateway-Token") == token
               for a in ep.log.arrivals)
    assert token not in result.stderr + result.stdout
    for f in job.folder.rglob("*"):
        if f.is_file():
            assert token.encode() not in f.read_bytes(), f


@pytest.mark.parametrize(
    ("headers", "said"),
    [
        ({"Authorization": "Bearer sk-123"}, "endpoint.headers.Authorization: a credential never sits in a job file"),
        ({"X-Api-Key": "abc"}, "endpoint.headers.X-Api-Key: a credential never sits in a job file"),
        ({"X-Team": "Bearer abc"}, "endpoint.headers.X-Team: a credential never sits in a job file"),
        ({"Bad Name": "x"}, "endpoint.headers: 'Bad Name' is not a valid header name"),
    ],
)
def test_credentials_in_header_literals_are_refused_without_echoing_them(
    make_job: MakeJob, headers: dict[str, str], said: str
) -> None:
    with LiveEndpoint() as ep:
        job = openai_job(make_job, ep, 4, endpoint={"headers": headers})
        result = cli("validate", job.path)
    assert result.returncode == 2 and said in result.stderr
    for value in headers.values():
        if value != "x":
            assert value not in result.stderr


def test_an_unset_header_variable_and_an_unreadable_ca_bundle_stop_before_any_request(make_job: MakeJob) -> None:
    with LiveEndpoint() as ep:
        job = openai_job(make_job, ep, 4, endpoint={"headers_env": {"X-Gateway-Token": "BATCHRUN_UNSET_VAR"}})
        unset = cli(job.path, unset=("BATCHRUN_UNSET_VAR",))
        job = openai_job(make_job, ep, 4, endpoint={"ca_bundle": "missing-ca.pem"})
        bundle = cli(job.path)
    assert unset.returncode == 2
    assert "endpoint.headers_env.X-Gateway-Token: environment variable BATCHRUN_UNSET_VAR is not set" in unset.stderr
    assert bundle.returncode == 2 and "endpoint.ca_bundle: cannot load" in bundle.stderr
    assert ep.log.requests == 0


@pytest.mark.parametrize(
    ("protocol", "params", "said"),
    [
        ("openai-completions", {"prompt": "x"}, "params.prompt: batchrun sets 'prompt' itself"),
        ("openai-completions", {"stream": True}, "params.stream: batchrun sets 'stream' itself"),
        ("openai-chat", {"messages": []}, "params.messages: batchrun sets 'messages' itself"),
        ("openai-completions", {"n": 0}, "params.n: must be an integer >= 1"),
        ("custom", {"n": 2}, "params.n: the custom protocol answers one output list per prompt"),
    ],
)
def test_params_a_request_sets_itself_are_refused(make_job: MakeJob, protocol: str, params: dict[str, Any], said: str) -> None:
    with LiveEndpoint() as ep:
        job = make_job(4, url=ep.url if protocol == "custom" else ep.openai_base,
                       endpoint={"protocol": protocol, "model": MODEL}, params={**PARAMS, **params})
        result = cli("validate", job.path)
    assert result.returncode == 2, result.stderr
    assert said in result.stderr


def test_the_example_openai_job_runs_on_the_builtin_endpoint(tmp_path: Path) -> None:
    repo = Path(__file__).resolve().parents[1]
    text = (repo / "jobs" / "example-openai.toml").read_text()
    job = tmp_path / "jobs" / "example-openai.toml"
    job.parent.mkdir()
    job.write_text(text.replace("../sample_data/capitals.csv", str(repo / "sample_data" / "capitals.csv")))
    result = cli(job, env={"PATH": os.environ["PATH"]})
    assert result.returncode == 0, result.stderr
    df = pl.read_parquet(tmp_path / "out" / "example-openai.parquet")
    assert df.height == 20 and df["error"].null_count() == 20
    assert all(len(o) == 1 and o[0] for o in df["output"].to_list())
