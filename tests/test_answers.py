"""Answers that can never validate (issue 12): the endpoint's fault, not the rows', and echo_match.

Each test runs the CLI (or ``run_job``) against the live loopback endpoint, which is told to spoil
its answers, and asserts the exit code and the first line a user reads.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from conftest import (
    MakeJob,
    assert_exact,
    cli,
    committed_results,
    invoke,
    output_of,
    prompt_rows,
    state_of,
    summary_of,
    write_csv,
    write_job,
)
from endpoint import LiveEndpoint

from batchrun import run_job


def error_line(stderr: str) -> str:
    """The message the CLI gives for an error (log lines may come before it)."""
    return next(line for line in stderr.splitlines() if line.startswith("batchrun: error: "))


def assert_stopped_keeping_progress(tmp_path: Path) -> None:
    """Exit 4's promise: no row marked failed, no output, no success marker."""
    errors = committed_results(state_of(tmp_path)).column("error")
    assert errors.null_count == len(errors), "rows were marked failed for the endpoint's fault"
    assert not output_of(tmp_path).exists()
    assert not (tmp_path / "out" / "result.parquet.SUCCESS").exists()
    summary = summary_of(tmp_path)
    assert (summary["status"], summary["exit_code"], summary["failed"]) == ("endpoint_unavailable", 4, 0)


# --- 1. answers that never validate are an outage ------------------------------------------------

# Fault kind -> what the message must say is wrong with the answers (batches of 16).
NEVER_VALID = {
    "every_alter": "16 items: echoed prompt matches no prompt sent (first: item 0, 'Prompt number ",
    "every_output_string": "16 items: output is not a list of strings (first: item 0, got str)",
    "every_output_empty": "16 items: output is an empty list (first: item 0)",
    "html200": "response is HTML, not JSON (b'<!DOCTYPE html>",
    "not_ok": 'response message is not "ok" (got \'error: model overloaded\')',
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", list(NEVER_VALID))
def test_answers_that_never_validate_stop_the_run_with_exit_4_saying_what_is_wrong_with_them(
    tmp_path: Path, kind: str, make_job: MakeJob
) -> None:
    """Every answer spoilt the same way: the run stops after ``outage_after_failures`` (20)
    attempts in a row, not after every row's retries; no row is failed and nothing is written."""
    rows = prompt_rows(320)  # 20 batches of 16
    with LiveEndpoint(rule=lambda n, p: kind) as ep:
        job = make_job(rows, url=ep.url, run={"batch_size": 16, "concurrency": 8, "max_retries": 5})
        result = cli(job.path, cwd=tmp_path)
    first = error_line(result.stderr)
    print(f"{kind}: {ep.log.requests} requests: {first}")
    assert result.returncode == 4, result.stderr
    assert re.match(r"batchrun: error: the endpoint's answers failed validation \d+ attempts in a row", first), first
    assert f"(last: {NEVER_VALID[kind]}" in first
    assert first.endswith(
        "; stopped early with progress kept: run the same command once the endpoint's answers are fixed "
        "(or endpoint.echo_match set)"
    )
    assert ep.log.requests <= 20 + 7, "requests went on after the outage verdict"
    assert_stopped_keeping_progress(tmp_path)


@pytest.mark.timeout(60)
def test_cost_answers_whose_echoes_never_match_stop_a_2000_row_job_after_a_few_hundred_prompts(
    tmp_path: Path, make_job: MakeJob
) -> None:
    """The issue's figure: 2,000 rows, batch 16, concurrency 8, ``max_retries`` 5, the default
    outage threshold (20), every echo altered. It sent 12,000 prompts and exited 3 with every
    row failed; now it stops within 20 failed attempts plus the 7 other requests in flight."""
    rows = prompt_rows(2000)
    with LiveEndpoint(rule=lambda n, p: "every_alter") as ep:
        job = make_job(rows, url=ep.url, run={"batch_size": 16, "concurrency": 8, "max_retries": 5})
        started = time.monotonic()
        result = cli(job.path, cwd=tmp_path)
        took = time.monotonic() - started
    sent = len(ep.log.prompts_received)
    print(
        f"\necho never matches, 2000 rows (batch 16, concurrency 8, outage_after_failures 20, max_retries 5): "
        f"{sent} prompts in {ep.log.requests} requests, exit {result.returncode}, {took:.1f}s "
        f"(before: 12000 prompts, exit 3)\n{error_line(result.stderr)}"
    )
    assert result.returncode == 4, result.stderr
    assert sent <= (20 + 7) * 16
    assert job.summary()["prompts_sent"] == sent
    assert_stopped_keeping_progress(tmp_path)


@pytest.mark.timeout(60)
def test_a_job_too_small_to_reach_the_outage_threshold_still_stops_with_exit_4_when_nothing_validates(
    tmp_path: Path, make_job: MakeJob
) -> None:
    """20 rows in batches of 16 make 12 attempts, fewer than the threshold of 20: the first batch
    out of attempts with no answer validated in the run is an outage, not 20 failed rows."""
    rows = prompt_rows(20)
    with LiveEndpoint(rule=lambda n, p: "every_output_empty") as ep:
        job = make_job(rows, url=ep.url, run={"batch_size": 16, "concurrency": 8, "max_retries": 5})
        result = cli(job.path, cwd=tmp_path)
    assert result.returncode == 4, result.stderr
    assert re.fullmatch(
        r"batchrun: error: the endpoint's answers failed validation (6|7|8|9|10|11|12) attempts in a row and "
        r"none has validated for this job \(last: (16|4) items: output is an empty list \(first: item 0\)\); "
        r"stopped early with progress kept: .*",
        error_line(result.stderr),
    ), result.stderr
    assert ep.log.requests <= 12
    assert_stopped_keeping_progress(tmp_path)


def test_one_valid_answer_resets_the_outage_count_so_answers_failing_now_and_then_never_stop_the_run(
    tmp_path: Path,
) -> None:
    """Outage after 2 attempts in a row without a valid answer, one worker. Odd requests validate
    nothing; even ones are valid except (for more than one prompt) the first item's echo, so
    each attempt with some valid answer comes between two that have none: the run completes."""
    rows = prompt_rows(40)
    write_csv(tmp_path / "input.csv", rows)

    def rule(n: int, prompts: list[str]) -> str | None:
        if n % 2:
            return "every_alter"
        return "alter" if len(prompts) > 1 else None

    with LiveEndpoint(rule=rule) as ep:
        job = write_job(
            tmp_path, ep.url, run={"batch_size": 4, "concurrency": 1, "max_retries": 5, "outage_after_failures": 2}
        )
        summary = run_job(job)
    assert ep.log.faults == {"every_alter": 20, "alter": 10}
    assert (summary.status, summary.exit_code) == ("complete", 0)
    assert_exact(output_of(tmp_path), rows)


# --- 2. output: [] -------------------------------------------------------------------------------


def test_an_output_list_that_is_always_empty_for_one_prompt_fails_that_row_only_with_the_reason(
    tmp_path: Path, make_job: MakeJob
) -> None:
    """``output: []`` is no answer: the prompt is retried, and once the endpoint has answered
    others, the row ends failed saying so (exit 3); an empty list is never written as a success."""
    rows = prompt_rows(16)
    empty_for = rows[8]["prompt"]  # the first of its batch, whose first item the fault spoils
    with LiveEndpoint(rule=lambda n, p: "output_empty" if p[0] == empty_for else None) as ep:
        job = make_job(rows, url=ep.url, run={"batch_size": 4, "concurrency": 1, "max_retries": 2})
        result = invoke(job.path)
    assert result.exit_code == 3, result.output
    assert result.stdout.startswith(
        "batchrun: complete_with_failed_rows: 15/16 rows succeeded, 1 failed (invalid_response 1);"
    )
    df = pl.read_parquet(job.output())
    failed = df.filter(pl.col("error").is_not_null())
    assert failed["id"].to_list() == [rows[8]["id"]]
    assert failed["error"].to_list() == [
        "invalid_response: invalid response: item 0: output is an empty list (gave up after 3 attempts)"
    ]
    assert failed["output"].to_list() == [None]
    assert Counter(ep.log.prompts_received)[empty_for] == 3


# --- 3. echo_match ---------------------------------------------------------------------------------


def whitespace_rows(n: int) -> list[dict[str, Any]]:
    """Prompts with CRLF line breaks and surrounding whitespace, as spreadsheets export them."""
    return [{"id": f"r{i:04d}", "prompt": f"  Question {i}:\r\nanswer briefly.\r\n"} for i in range(n)]


@pytest.mark.timeout(60)
def test_echoes_trimmed_by_the_endpoint_are_named_as_such_and_echo_match_trimmed_completes(tmp_path: Path) -> None:
    """The endpoint strips the echoes and turns CRLF into LF. With ``exact`` the run stops
    (exit 4) saying the echoes differ only in whitespace and naming the setting; with
    ``echo_match = "trimmed"`` the same job completes, each row with its own prompt's output."""
    rows = whitespace_rows(48)
    pl.DataFrame(rows).write_parquet(tmp_path / "input.parquet")
    run = {"batch_size": 4, "concurrency": 2, "max_retries": 5}
    with LiveEndpoint(rule=lambda n, p: "echo_trimmed") as ep:
        job = write_job(tmp_path, ep.url, input_path="input.parquet", run=run)
        refused = cli(job, cwd=tmp_path)
        assert refused.returncode == 4, refused.stderr
        # 12 batches of 4, two at a time: a batch may run out of its 6 attempts before 20 in a row.
        assert re.match(
            r"batchrun: error: the endpoint's answers failed validation \d+ attempts in a row"
            r"( and none has validated for this job)? \(last: echoed prompts differ from those sent only in "
            r'surrounding whitespace or newlines; set endpoint.echo_match = "trimmed"; ',
            error_line(refused.stderr),
        ), refused.stderr
        assert_stopped_keeping_progress(tmp_path)

        write_job(tmp_path, ep.url, input_path="input.parquet", run=run, endpoint={"echo_match": "trimmed"})
        done = cli(job, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.rstrip("\n").endswith(
        'output: ' + str(output_of(tmp_path)) + '; echoes compared without surrounding whitespace (echo_match = "trimmed")'
    )
    assert_exact(output_of(tmp_path), rows)


@pytest.mark.timeout(60)
def test_echo_match_position_places_answers_without_echoes_and_every_summary_says_so(tmp_path: Path, make_job: MakeJob) -> None:
    """An endpoint that echoes no prompt cannot be matched by echo (exit 4, "no echoed
    prompt"); with ``echo_match = "position"`` an answer with one item per prompt is placed by
    position, a short answer (one item dropped) is retried whole, and the summary line and JSON
    say outputs were matched by position."""
    rows = prompt_rows(48)
    run = {"batch_size": 4, "concurrency": 2, "max_retries": 5}
    with LiveEndpoint(rule=lambda n, p: "echo_none") as ep:
        job = make_job(rows, url=ep.url, run=run)
        refused = cli(job.path, cwd=tmp_path)
        assert refused.returncode == 4, refused.stderr
        assert "(last: 4 items: no echoed prompt (first: item 0)); " in error_line(refused.stderr)

        ep.rule = lambda n, p: "drop" if n % 5 == 0 else "echo_none"
        write_job(tmp_path, ep.url, run=run, endpoint={"echo_match": "position"})
        done = cli(job.path, cwd=tmp_path)
        dropped = ep.log.faults.get("drop", 0)
    assert done.returncode == 0, done.stderr
    assert dropped >= 1
    assert done.stdout.rstrip("\n").endswith(
        '; outputs matched by position (echo_match = "position"): echoes not checked'
    )
    assert job.summary()["echo_match"] == "position"
    assert job.summary()["retries_by_cause"] == {"invalid_response": dropped}
    assert_exact(job.output(), rows)


def test_an_unknown_echo_match_is_refused_naming_the_modes(tmp_path: Path, make_job: MakeJob) -> None:
    job = make_job(2, url="http://127.0.0.1:9/inference", endpoint={"echo_match": "fuzzy"})
    result = invoke("validate", job.path)
    assert result.exit_code == 2, result.output
    assert result.stderr == (
        f"batchrun: error: {job.path}: endpoint.echo_match: must be one of 'exact', 'trimmed' or 'position' (got 'fuzzy')\n"
    )
