"""Endpoint faults (issues 3 and 12): retries, timeouts, throttling, poison prompts, credentials,
outages, the retry log, and stopping on a signal.

Every figure is taken inside the live endpoint on 127.0.0.1 (requests, prompts, arrival times,
headers), never from batchrun's own word alone. Backoffs are tiny (conftest's ``write_job``), so
the slow parts are the waits a test is about: a ``Retry-After``, a rate limit, a timeout.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import shutil
import signal
import subprocess
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from conftest import (
    BATCHRUN,
    MakeJob,
    StderrWatch,
    assert_exact,
    cli,
    committed_results,
    expected_output,
    output_of,
    prompt_rows,
    state_of,
    wait_for,
    write_csv,
    write_job,
)
from endpoint import Arrival, LiveEndpoint, shared_faults

from batchrun import admission, run_job
from batchrun.errors import OutageError
from batchrun.fleet import Fleet
from batchrun.retry import RetryLog, RetryPolicy
from batchrun.server import ServerOptions

KEY_ENV = "BATCHRUN_FAULTS_TEST_KEY"

# The retry cause each fault must be counted under: the class the issue gives it.
CAUSE = {
    "reset": "connection",
    "cut": "connection",
    "hang": "timeout",
    "slow": "timeout",
    **{s: f"http_{s[:3]}" for s in ("408", "409", "425", "429", "429ra", "429date")},
    **{s: f"http_{s[:3]}" for s in ("500", "502", "503", "503ra", "503date")},
    **dict.fromkeys(
        ("invalid_json", "empty_body", "top_list", "wrong_shape", "not_ok", "drop", "extra", "alter",
         "output_string", "output_numbers", "output_empty", "html200", "huge", "huge_chunked"),
        "invalid_response",
    ),
}
# Faults that spoil one item of an answer: the other items are kept and only one prompt is resent.
ONE_ITEM = {"drop", "extra", "alter", "output_string", "output_numbers", "output_empty"}
# Faults that cost about a second of waiting each (Retry-After): injected at most twice.
WAITING = {"429ra", "429date", "503ra", "503date"}
FAULT_KINDS = [*CAUSE, "reorder"]


def error_line(stderr: str) -> str:
    """The message the CLI gives for an error (log lines may come before it)."""
    return next(line for line in stderr.splitlines() if line.startswith("batchrun: error: "))


def arrivals_between(arrivals: list[Arrival], start: float, end: float) -> list[Arrival]:
    return [a for a in arrivals if start < a.at < end]


def only_failed(df: pl.DataFrame) -> pl.DataFrame:
    return df.filter(pl.col("error").is_not_null())


def poisoned(rows: list[dict[str, Any]], positions: list[int]) -> list[str]:
    """Make the prompts at ``positions`` poison (rejected by ``shared_faults``); return them."""
    for i in positions:
        rows[i]["prompt"] = f"POISON {i}: the endpoint always refuses this one"
    return [rows[i]["prompt"] for i in positions]


# --- 1. each fault kind on a share of requests ----------------------------------------------------


@pytest.mark.parametrize("kind", FAULT_KINDS)
def test_each_fault_kind_on_a_third_of_requests_is_retried_under_its_class_and_the_output_is_exact(
    tmp_path: Path, kind: str
) -> None:
    """No row lost, none duplicated, none with another prompt's output; each fault costs exactly
    one retry counted under its class; status and connection faults resend the batch whole (never
    split); a spoilt item resends only that prompt; a reordered answer is matched, not retried."""
    rows = prompt_rows(48)
    write_csv(tmp_path / "input.csv", rows)
    rule = shared_faults(1 / 3, [kind], seed=11, max_faults=2 if kind in WAITING else None)
    with LiveEndpoint(rule=rule, huge_bytes=64 * 1024, retry_after_date_s=1.0) as ep:
        job = write_job(
            tmp_path, ep.url,
            endpoint={"timeout_s": 0.5 if CAUSE.get(kind) == "timeout" else 10, "max_response_mb": 0.01},
            run={"batch_size": 4, "concurrency": 4, "max_retries": 10},
        )
        summary = run_job(job)
    faults = ep.log.faults.get(kind, 0)
    assert faults >= 1, "the fault was never injected"
    assert (summary.status, summary.exit_code) == ("complete", 0)
    assert summary.duration_s < 15, "a fault held the run up"
    df = assert_exact(output_of(tmp_path), rows)
    assert ep.log.max_batch <= 4 and ep.log.max_in_flight <= 4
    assert summary.requests == ep.log.requests == 12 + (0 if kind == "reorder" else faults)
    resent_per_fault = 0 if kind == "reorder" else 1 if kind in ONE_ITEM else 4
    assert summary.prompts_resent == faults * resent_per_fault
    assert summary.prompts_sent == len(ep.log.prompts_received) == 48 + faults * resent_per_fault
    if kind == "reorder":
        assert summary.retries_by_cause == {}
        assert df["attempts"].to_list() == [1] * 48
    else:
        assert summary.retries_by_cause == {CAUSE[kind]: faults}
        assert df["attempts"].max() > 1
    if kind not in ONE_ITEM:
        assert Counter(a.prompts for a in ep.log.arrivals) == {4: ep.log.requests}, "a batch was split"


# --- 2. Retry-After --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "at_least_s", "at_most_s"),
    [("429ra", 1.0, 1.6), ("503ra", 1.0, 1.6), ("429date", 1.0, 2.6), ("503date", 1.0, 2.6)],
)
def test_retry_after_in_seconds_or_as_an_http_date_delays_the_next_request_that_long(
    tmp_path: Path, kind: str, at_least_s: float, at_most_s: float, make_job: MakeJob
) -> None:
    """``Retry-After: 1``, or a date 1-2 s ahead, on the first request only: the next request
    arrives at least that long after the answer went out, and not much later."""
    rows = prompt_rows(8)
    with LiveEndpoint(rule=lambda n, p: kind if n == 1 else None, retry_after="1", retry_after_date_s=2.0) as ep:
        job = make_job(rows, url=ep.url, run={"batch_size": 4, "concurrency": 1})
        summary = run_job(job.path)
    first, second = ep.log.arrivals[:2]
    assert first.fault == kind and first.answered_at is not None
    waited = second.at - first.answered_at
    print(f"{kind}: next request {waited:.3f}s after the answer")
    assert at_least_s - 0.01 <= waited <= at_most_s
    assert summary.retries_by_cause == {CAUSE[kind]: 1}
    assert_exact(job.output(), rows)


def test_a_retry_after_longer_than_retry_after_max_s_is_capped(tmp_path: Path, make_job: MakeJob) -> None:
    """``Retry-After: 30`` with ``retry_after_max_s = 0.3``: the run waits about 0.3 s, not 30."""
    rows = prompt_rows(8)
    with LiveEndpoint(rule=lambda n, p: "429ra" if n == 1 else None, retry_after="30") as ep:
        job = make_job(rows, url=ep.url, run={"batch_size": 4, "concurrency": 1, "retry_after_max_s": 0.3})
        started = time.monotonic()
        summary = run_job(job.path)
        took = time.monotonic() - started
    first, second = ep.log.arrivals[:2]
    assert first.answered_at is not None
    waited = second.at - first.answered_at
    print(f"Retry-After 30 capped at 0.3: waited {waited:.3f}s; run took {took:.2f}s")
    assert 0.29 <= waited < 1.0
    assert took < 5
    assert summary.exit_code == 0
    assert_exact(job.output(), rows)


# --- 3. a 429 slows the whole run -----------------------------------------------------------------


def test_a_429_with_retry_after_pauses_every_worker_not_only_the_request_that_got_it(tmp_path: Path, make_job: MakeJob) -> None:
    """Concurrency 4, answers taking 0.2 s, ``Retry-After: 1`` on request 6: no request at all
    arrives from just after that answer until about 1 s later; then the run goes on."""
    rows = prompt_rows(64)
    with LiveEndpoint(ServerOptions(latency_s=0.2), rule=lambda n, p: "429ra" if n == 6 else None) as ep:
        job = make_job(rows, url=ep.url, run={"batch_size": 2, "concurrency": 4})
        summary = run_job(job.path)
    arrivals = ep.log.arrivals
    hit = arrivals[5]
    assert hit.fault == "429ra" and hit.answered_at is not None
    # 50 ms for the 429 to reach the client: requests sent before it knew are not its fault.
    during = arrivals_between(arrivals, hit.answered_at + 0.05, hit.answered_at + 0.95)
    after = [a.at - hit.answered_at for a in arrivals if a.at > hit.answered_at + 0.05]
    print(f"first request after the 429: {min(after):.3f}s later; during the pause: {len(during)}")
    assert during == [], f"{len(during)} requests arrived during the shared pause"
    assert len(after) > 8
    assert summary.exit_code == 0
    assert_exact(job.output(), rows)


def test_a_429_pause_also_holds_requests_already_queued_on_the_rate_limit(tmp_path: Path) -> None:
    """With ``requests_per_minute`` set, workers wait their turn on the limiter; a 429 answered
    meanwhile must hold them too: nothing arrives during its ``Retry-After: 1``."""
    rows = prompt_rows(48)
    write_csv(tmp_path / "input.csv", rows)
    with LiveEndpoint(rule=lambda n, p: "429ra" if n == 6 else None) as ep:
        job = write_job(
            tmp_path, ep.url, run={"batch_size": 2, "concurrency": 4, "requests_per_minute": 1200}
        )
        summary = run_job(job)
    arrivals = ep.log.arrivals
    hit = arrivals[5]
    assert hit.fault == "429ra" and hit.answered_at is not None
    during = arrivals_between(arrivals, hit.answered_at + 0.05, hit.answered_at + 0.95)
    print(f"requests during the shared pause under a rate limit: {[round(a.at - hit.answered_at, 3) for a in during]}")
    assert during == [], f"{len(during)} requests arrived during the shared pause"
    assert summary.exit_code == 0
    assert_exact(output_of(tmp_path), rows)


# --- 4. other 4xx: poison prompts --------------------------------------------------------------


@pytest.mark.parametrize("status", [400, 413, 422])
def test_poison_prompts_fail_alone_as_rejected_and_halving_costs_two_requests_per_level(
    tmp_path: Path, status: int, make_job: MakeJob
) -> None:
    """Five prompts the endpoint always refuses, each in its own batch of 16: each fails alone
    ("rejected: HTTP <status>"), its 15 neighbours succeed, and finding it costs exactly
    2 * log2(16) = 8 extra requests (both halves at each of 4 levels), never a retry."""
    rows = prompt_rows(160)
    positions = [5, 40, 77, 100, 159]  # batches 0, 2, 4, 6 and 9
    poison = poisoned(rows, positions)
    with LiveEndpoint(rule=shared_faults(0, [], seed=0, always_reject=poison, reject_status=status)) as ep:
        job = make_job(rows, url=ep.url, run={"batch_size": 16, "concurrency": 4})
        summary = run_job(job.path)
    levels = int(math.log2(16))
    print(f"HTTP {status}: {ep.log.requests} requests for 10 batches with 5 poison prompts")
    assert ep.log.requests == summary.requests == 10 + 5 * 2 * levels
    received = Counter(ep.log.prompts_received)
    assert [received[p] for p in poison] == [levels + 1] * 5  # sent at 16, 8, 4, 2 and 1
    assert len(ep.log.prompts_received) == 160 + 5 * (16 + 8 + 4 + 2)
    assert summary.retries_by_cause == {}
    assert (summary.exit_code, summary.failed, summary.failed_by_class) == (3, 5, {"rejected": 5})
    df = pl.read_parquet(job.output())
    assert df["id"].to_list() == [r["id"] for r in rows]
    for i, (got, r) in enumerate(zip(df.iter_rows(named=True), rows)):
        if i in positions:
            assert got["output"] is None
            assert got["error"].startswith(f"rejected: HTTP {status}: "), got
        else:
            assert got["error"] is None, got
            assert got["output"] == expected_output(r["prompt"])


# --- 5. credentials refused --------------------------------------------------------------------


@pytest.mark.timeout(30)
@pytest.mark.parametrize("status", [401, 403])
def test_a_refused_key_stops_the_cli_at_once_with_exit_4_and_the_fixed_key_completes(
    tmp_path: Path, status: int, monkeypatch: pytest.MonkeyPatch, make_job: MakeJob
) -> None:
    """A wrong key: exit 4 with a message naming the key, no more requests than workers, no
    output, no row marked failed. The right key in the variable: the same job completes."""
    rows = prompt_rows(200)
    with LiveEndpoint(api_keys={"the-right-key"}, refuse_status=status) as ep:
        job = make_job(rows, url=ep.url, endpoint={"api_key_env": KEY_ENV}, run={"concurrency": 4})
        started = time.monotonic()
        refused = cli(job.path, cwd=tmp_path, env={KEY_ENV: "a-wrong-key"})
        took = time.monotonic() - started
        assert refused.returncode == 4, refused.stderr
        assert f"batchrun: error: the endpoint refused the credentials (HTTP {status}): check the API key" in refused.stderr
        assert ep.log.faults == {str(status): ep.log.requests}
        assert 1 <= ep.log.requests <= 4, "requests went on after the key was refused"
        assert took < 10
        assert not job.output().exists()
        errors = committed_results(job.state()).column("error")
        assert errors.null_count == len(errors), "a row was marked failed because of the key"

        first = ep.log.requests
        monkeypatch.setenv(KEY_ENV, "the-right-key")
        assert run_job(job.path).exit_code == 0
        assert all(a.headers["Authorization"] == "Bearer the-right-key" for a in ep.log.arrivals[first:])
        assert Counter(ep.log.prompts_received[-200:]) == Counter(r["prompt"] for r in rows)
    assert_exact(job.output(), rows)


# --- 6. outage ---------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_connection_refused_stops_the_cli_early_with_exit_4_and_a_new_api_base_completes(tmp_path: Path, make_job: MakeJob) -> None:
    """An endpoint that is gone (its port refuses connections): the run stops within a few seconds
    with exit 4 and says progress is kept; pointed at the endpoint's new address (api_base is not
    pinned), the same job completes, each prompt sent once."""
    rows = prompt_rows(2000)
    with LiveEndpoint() as gone:
        dead_url = gone.url
    job = make_job(rows, url=dead_url, run={"batch_size": 16, "concurrency": 8, "outage_after_failures": 10})
    started = time.monotonic()
    stopped = cli(job.path, cwd=tmp_path)
    took = time.monotonic() - started
    print(f"connection refused: stopped after {took:.2f}s: {stopped.stderr.strip().splitlines()[-1]}")
    assert stopped.returncode == 4, stopped.stderr
    assert "failed 10 attempts in a row (last: connection: " in stopped.stderr
    assert "stopped early with progress kept" in stopped.stderr
    assert took < 10
    assert not job.output().exists()
    assert committed_results(job.state()).num_rows == 0

    with LiveEndpoint() as back:
        write_job(tmp_path, back.url, run={"batch_size": 16, "concurrency": 8, "outage_after_failures": 10})
        assert run_job(job.path).exit_code == 0
        assert Counter(back.log.prompts_received) == Counter(r["prompt"] for r in rows)
    assert_exact(job.output(), rows)


@pytest.mark.timeout(60)
def test_an_endpoint_that_turns_to_503_stops_the_run_keeping_progress_and_the_rerun_resends_none_of_it(
    tmp_path: Path,
) -> None:
    """Serves 30 requests, then answers 503 to everything: ``run_job`` raises ``OutageError``
    after ``outage_after_failures`` failures in a row (requests bounded by that times the workers:
    503s to requests in flight when the endpoint was last paused are a burst's tail and not counted),
    no row is marked failed, every answered row is kept (segments and partials); once the endpoint
    is back, the same job sends exactly the rows not yet kept."""
    rows = prompt_rows(400)
    write_csv(tmp_path / "input.csv", rows)
    outage_after, concurrency, served = 6, 4, 30
    broken = {"on": True}
    with LiveEndpoint(rule=lambda n, p: "503" if broken["on"] and n > served else None) as ep:
        job = write_job(
            tmp_path, ep.url,
            run={"batch_size": 4, "concurrency": concurrency, "checkpoint_rows": 16,
                 "max_retries": 12, "outage_after_failures": outage_after},
        )
        started = time.monotonic()
        with pytest.raises(OutageError, match=f"failed {outage_after} attempts in a row .*stopped early with progress kept"):
            run_job(job)
        took = time.monotonic() - started
        print(f"503 outage: stopped after {took:.2f}s and {ep.log.requests} requests")
        assert took < 10
        assert served < ep.log.requests <= served + outage_after * concurrency
        answered = {p for a, p in _prompts_by_arrival(ep.log) if a.fault is None}
        kept = committed_results(state_of(tmp_path)).to_pylist()
        assert [r for r in kept if r["error"] is not None] == [], "the outage marked rows failed"
        kept_prompts = {rows[r["row"]]["prompt"] for r in kept}
        print(f"answered {len(answered)} rows before the outage, kept {len(kept_prompts)}")
        assert kept_prompts <= answered
        # Only answers still on their way when the run stopped may be lost.
        assert len(answered - kept_prompts) <= 4 * concurrency
        assert not output_of(tmp_path).exists()

        broken["on"] = False
        first = len(ep.log.prompts_received)
        summary = run_job(job)
        resent = Counter(ep.log.prompts_received[first:])
    assert resent == Counter(r["prompt"] for r in rows if r["prompt"] not in kept_prompts)
    assert (summary.status, summary.rows_reused) == ("complete", len(kept_prompts))
    assert_exact(output_of(tmp_path), rows)


def _prompts_by_arrival(log: Any) -> list[tuple[Arrival, str]]:
    """Pair each received prompt with the request that carried it (both lists are in order)."""
    out, prompts = [], iter(log.prompts_received)
    for a in log.arrivals:
        out += [(a, next(prompts)) for _ in range(a.prompts)]
    return out


@pytest.mark.timeout(60)
def test_a_5000_row_job_against_an_endpoint_down_from_the_start_marks_no_row_failed(tmp_path: Path, make_job: MakeJob) -> None:
    """503 to everything with the default outage threshold (20): the run stops well within a few
    seconds, with not one row marked failed. A 503 is overload: it pauses the endpoint, and 503s
    to requests already in flight when it did (the burst's tail) do not count, so the run sends
    20 counted requests plus at most concurrency - 1 tails for each."""
    rows = prompt_rows(5000)
    with LiveEndpoint(rule=lambda n, p: "503") as ep:
        job = make_job(rows, url=ep.url, run={"batch_size": 16, "concurrency": 8, "max_retries": 5})
        started = time.monotonic()
        with pytest.raises(OutageError):
            run_job(job.path)
        took = time.monotonic() - started
    print(f"down from the start: {ep.log.requests} requests, {took:.2f}s")
    assert 20 <= ep.log.requests <= 20 * 8
    assert took < 10
    errors = committed_results(job.state()).column("error")
    assert errors.null_count == len(errors), "rows were marked failed by an outage"


@pytest.mark.timeout(60)
def test_rows_that_failed_in_the_run_up_to_an_outage_are_retried_when_the_endpoint_is_back(tmp_path: Path) -> None:
    """One worker, 3 attempts a batch, outage after 10 failures: the endpoint answers the first
    request, then 503s, so batches give up (their rows end failed) before the outage is called.
    Whatever they recorded, the rerun once the endpoint is back completes exactly."""
    rows = prompt_rows(200)
    write_csv(tmp_path / "input.csv", rows)
    broken = {"on": True}
    with LiveEndpoint(rule=lambda n, p: "503" if broken["on"] and n > 1 else None) as ep:
        job = write_job(
            tmp_path, ep.url,
            run={"batch_size": 4, "concurrency": 1, "max_retries": 2, "outage_after_failures": 10, "checkpoint_rows": 8},
        )
        with pytest.raises(OutageError):
            run_job(job)
        assert ep.log.requests == 1 + 10
        recorded = committed_results(state_of(tmp_path)).to_pylist()
        assert sorted(r["row"] for r in recorded if r["error"]) == list(range(4, 16))  # three batches gave up
        broken["on"] = False
        first = len(ep.log.prompts_received)
        summary = run_job(job)
        assert Counter(ep.log.prompts_received[first:]) == Counter(r["prompt"] for r in rows[4:])
    assert (summary.status, summary.exit_code, summary.failed) == ("complete", 0, 0)
    assert_exact(output_of(tmp_path), rows)


# A dead endpoint, however it is dead -> the first line the CLI gives (2 batches of 16).
DEAD = {
    "refused": r"cannot connect to the endpoint \(ClientConnectorError: Cannot connect to host 127\.0\.0\.1:\d+ .*\); "
               r"stopped early with progress kept: run the same command when the endpoint is back",
    "503": r"the endpoint failed (6|7|8|9|10|11|12) attempts in a row and has not answered this job once "
           r'\(last: http_503: HTTP 503: \{"message": "injected HTTP 503", "data": \[\]\}\); stopped early with progress kept: .*',
    "hang": r"the endpoint failed (6|7|8|9|10|11|12) attempts in a row and has not answered this job once "
            r"\(last: timeout: no complete answer within endpoint\.timeout_s\); stopped early with progress kept: .*",
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("dead", list(DEAD))
def test_a_20_row_job_against_a_dead_endpoint_exits_4_with_no_row_failed_no_output_and_no_success_marker(
    tmp_path: Path, dead: str
) -> None:
    """Two batches of 16 make 2 x 6 = 12 attempts, fewer than ``outage_after_failures`` (20): a
    closed port used to end exit 3 after 13 s with every row failed ``connection`` and the
    output and ``.SUCCESS`` written. A refused connection, or no answer at all in the run, is an
    outage: exit 4, progress kept, nothing failed or written; ``status`` says in progress."""
    rows = prompt_rows(20)
    write_csv(tmp_path / "input.csv", rows)
    run = {"batch_size": 16, "concurrency": 8, "max_retries": 5}
    endpoint = {"timeout_s": 0.2}
    if dead == "refused":
        with LiveEndpoint() as gone:
            url = gone.url
        job = write_job(tmp_path, url, run=run, endpoint=endpoint)
        started = time.monotonic()
        result = cli(job, cwd=tmp_path)
    else:
        with LiveEndpoint(rule=lambda n, p: dead) as ep:
            job = write_job(tmp_path, ep.url, run=run, endpoint=endpoint)
            started = time.monotonic()
            result = cli(job, cwd=tmp_path)
        assert ep.log.requests <= 12
    took = time.monotonic() - started
    print(f"{dead}: {took:.2f}s: {error_line(result.stderr)}")
    assert result.returncode == 4, result.stderr
    assert re.fullmatch("batchrun: error: " + DEAD[dead], error_line(result.stderr)), result.stderr
    assert took < 10
    errors = committed_results(state_of(tmp_path)).column("error")
    assert errors.null_count == len(errors), "rows were marked failed for the endpoint's fault"
    assert not output_of(tmp_path).exists()
    assert not output_of(tmp_path).with_name("result.parquet.SUCCESS").exists()
    status = cli("status", job, "--json", cwd=tmp_path)
    info = json.loads(status.stdout)
    assert (info["state"], info["failed"], info["last_run"]["exit_code"]) == ("in progress", 0, 4)


@pytest.mark.timeout(60)
def test_an_endpoint_gone_mid_run_is_an_outage_even_after_it_answered_others(tmp_path: Path, make_job: MakeJob) -> None:
    """The endpoint answers some requests, then its port closes. ``outage_after_failures`` is out
    of reach (1000), so only the rule stops the run: a batch whose last attempt could not connect
    at all is the endpoint's fault (exit 4), not its rows'. Answered rows are kept; the rerun
    against the endpoint's new address sends only the others."""
    rows = prompt_rows(400)
    run = {"batch_size": 4, "concurrency": 2, "max_retries": 2, "outage_after_failures": 1000,
           "checkpoint_rows": 16, "checkpoint_interval_s": 0.2}
    with LiveEndpoint(ServerOptions(latency_s=0.05)) as ep:
        job = make_job(rows, url=ep.url, run=run)
        proc = subprocess.Popen([str(BATCHRUN), str(job.path)], cwd=tmp_path, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        try:
            wait_for(lambda: ep.log.requests >= 10 or proc.poll() is not None, "ten requests")
        except BaseException:
            proc.kill()
            raise
    try:
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 4, err
    assert error_line(err).startswith("batchrun: error: cannot connect to the endpoint (ClientConnectorError: ")
    kept = committed_results(job.state()).to_pylist()
    assert [r for r in kept if r["error"] is not None] == [], "rows were marked failed for the endpoint's fault"
    assert len(kept) >= 8
    assert not job.output().exists()

    with LiveEndpoint() as back:
        write_job(tmp_path, back.url, run=run)
        assert run_job(job.path).exit_code == 0
        assert Counter(back.log.prompts_received) == Counter(
            r["prompt"] for i, r in enumerate(rows) if i not in {k["row"] for k in kept}
        )
    assert_exact(job.output(), rows)


# --- 7. rows that exhaust their retries ------------------------------------------------------------


def test_rows_that_exhaust_retries_keep_class_and_last_reason_exit_3_and_a_rerun_sends_only_them(
    tmp_path: Path,
) -> None:
    """One prompt always gets an altered echo, one batch always hangs past ``timeout_s``, one
    always gets a 503: after 3 attempts those rows end with ``error`` = class, last reason and
    attempts; the CLI exits 3 with the classes in its summary; the rerun sends those rows only."""
    rows = prompt_rows(32)
    alter, hang, down = rows[8]["prompt"], rows[17]["prompt"], rows[26]["prompt"]  # first of a batch; inside others

    def rule(n: int, prompts: list[str]) -> str | None:
        if prompts and prompts[0] == alter:
            return "alter"  # spoils the first item's echo
        return "hang" if hang in prompts else "503" if down in prompts else None

    write_csv(tmp_path / "input.csv", rows)
    with LiveEndpoint(rule=rule) as ep:
        job = write_job(
            tmp_path, ep.url, endpoint={"timeout_s": 0.3}, run={"batch_size": 4, "concurrency": 2, "max_retries": 2}
        )
        first = cli(job, cwd=tmp_path)
        assert first.returncode == 3, first.stderr
        assert "batchrun: complete_with_failed_rows: 23/32 rows succeeded, 9 failed (http_503 4, invalid_response 1, timeout 4)" in first.stdout
        df = pl.read_parquet(output_of(tmp_path))
        failed = only_failed(df)
        assert failed["id"].to_list() == [rows[i]["id"] for i in (8, 16, 17, 18, 19, 24, 25, 26, 27)]
        errors = dict(zip(failed["id"].to_list(), failed["error"].to_list()))
        assert errors[rows[8]["id"]].startswith("invalid_response: invalid response: item 0: echoed prompt matches no prompt sent")
        assert errors[rows[17]["id"]] == "timeout: no complete answer within endpoint.timeout_s (gave up after 3 attempts)"
        assert errors[rows[26]["id"]].startswith("http_503: HTTP 503: ")
        assert "injected HTTP 503" in errors[rows[26]["id"]]
        assert all(e.endswith("(gave up after 3 attempts)") for e in errors.values())
        assert set(failed["attempts"].to_list()) == {3}
        assert failed["output"].null_count() == 9

        ep.rule = None
        sent = len(ep.log.prompts_received)
        assert run_job(job).exit_code == 0
        assert Counter(ep.log.prompts_received[sent:]) == Counter(
            rows[i]["prompt"] for i in (8, 16, 17, 18, 19, 24, 25, 26, 27)
        )
    assert_exact(output_of(tmp_path), rows)


# --- 8. throttling -------------------------------------------------------------------------------


def steady_rate(arrivals: list[Arrival], weight: str) -> float:
    """Requests (or prompts) per second from the second arrival to the last: the first request
    passes an empty bucket at once, and each later one pays for itself before it is sent."""
    ordered = sorted(arrivals, key=lambda a: a.at)
    span = ordered[-1].at - ordered[1].at
    paid = sum(1 if weight == "requests" else a.prompts for a in ordered[2:])
    return paid / span


@pytest.mark.parametrize(
    ("key", "per_minute", "batch_size", "checkpoint_rows", "rows"),
    [
        ("requests_per_minute", 600, 2, 2048, 62),  # 10 requests/s: 31 requests over 3 s
        ("prompts_per_minute", 2400, 4, 10, 130),  # 40 prompts/s in batches of 4, 4 and 2: 3.25 s
    ],
)
def test_a_rate_limit_holds_within_5_percent_at_concurrency_8_measured_in_the_endpoint(
    tmp_path: Path, key: str, per_minute: int, batch_size: int, checkpoint_rows: int, rows: int
) -> None:
    """Eight workers and answers taking 0.25 s, so several requests are in flight: the arrival rate
    over the run is the limit within 5%, with no burst (no two requests closer than half a turn)."""
    data = prompt_rows(rows)
    write_csv(tmp_path / "input.csv", data)
    with LiveEndpoint(ServerOptions(latency_s=0.25)) as ep:
        job = write_job(
            tmp_path, ep.url,
            run={"batch_size": batch_size, "concurrency": 8, "checkpoint_rows": checkpoint_rows, key: per_minute},
        )
        summary = run_job(job)
    weight = "requests" if key == "requests_per_minute" else "prompts"
    limit = per_minute / 60
    rate = steady_rate(ep.log.arrivals, weight)
    ordered = sorted(ep.log.arrivals, key=lambda a: a.at)
    gaps = [b.at - a.at for a, b in zip(ordered, ordered[1:])]
    print(
        f"{key} = {per_minute}: measured {rate:.3f} {weight}/s against {limit:.3f} "
        f"({100 * (rate / limit - 1):+.2f}%), {len(ordered)} requests, smallest gap {min(gaps):.3f}s, "
        f"max in flight {ep.log.max_in_flight}, throttled {summary.throttle_wait_s:.1f}s"
    )
    assert abs(rate / limit - 1) <= 0.05
    smallest_turn = (1 if weight == "requests" else min(a.prompts for a in ordered)) / limit
    assert min(gaps) >= smallest_turn / 2, "requests were sent in a burst"
    assert ep.log.max_in_flight >= 2, "the limit was not tested against concurrency"
    assert summary.throttle_wait_s > 0
    assert_exact(output_of(tmp_path), data)


# --- 9. safety -----------------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_a_307_redirect_is_not_followed_the_target_gets_nothing_and_the_cli_exits_4(tmp_path: Path, make_job: MakeJob) -> None:
    rows = prompt_rows(40)
    canary = f"sk-canary-{uuid.uuid4().hex}"
    with LiveEndpoint() as target, LiveEndpoint(rule=lambda n, p: "redirect", redirect_to=target.url) as redirector:
        job = make_job(rows, url=redirector.url, endpoint={"api_key_env": KEY_ENV}, run={"concurrency": 2})
        result = cli(job.path, cwd=tmp_path, env={KEY_ENV: canary})
        assert result.returncode == 4, result.stderr
        assert "redirected (HTTP 307)" in result.stderr and "redirects are not followed" in result.stderr
        assert target.log.requests == 0, "the redirect was followed"
        assert 1 <= redirector.log.requests <= 2
    assert canary not in result.stdout + result.stderr
    assert not job.output().exists()
    errors = committed_results(job.state()).column("error")
    assert errors.null_count == len(errors)


def files_holding(root: Path, secret: str) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]


@pytest.mark.timeout(60)
def test_the_api_key_is_sent_as_bearer_and_is_in_no_file_log_line_or_message(tmp_path: Path) -> None:
    """A canary key, through a refused run (401, with --debug) and a run with faults, failed rows
    and retries: every request carried ``Authorization: Bearer <key>``; nothing the runs wrote
    under tmp_path nor printed holds the key."""
    rows = prompt_rows(120)
    poison = poisoned(rows, [7])
    write_csv(tmp_path / "input.csv", rows)
    canary = f"sk-canary-{uuid.uuid4().hex}"
    kinds = ["500", "invalid_json", "reset", "drop", "429", "hang"]
    with LiveEndpoint(api_keys={"another-key"}, rule=shared_faults(0.3, kinds, seed=5, always_reject=poison)) as ep:
        job = write_job(
            tmp_path, ep.url, endpoint={"api_key_env": KEY_ENV, "timeout_s": 0.3},
            run={"concurrency": 4, "max_retries": 8, "checkpoint_rows": 16},
        )
        refused = cli(job, "--debug", cwd=tmp_path, env={KEY_ENV: canary})
        assert refused.returncode == 4, refused.stderr
        ep.api_keys = {canary}
        first = ep.log.requests
        done = cli(job, "--debug", cwd=tmp_path, env={KEY_ENV: canary})
        assert done.returncode == 3, done.stderr
        assert ep.log.requests > first and set(ep.log.faults) - {"401", "400"}, "no fault was injected"
        assert {a.headers.get("Authorization") for a in ep.log.arrivals} == {f"Bearer {canary}"}
    printed = refused.stdout + refused.stderr + done.stdout + done.stderr
    assert canary not in printed
    assert files_holding(tmp_path, canary) == []
    assert len(list(tmp_path.rglob("*.parquet"))) > 1  # the search did cover checkpoint files


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["401echo", "500echo"])
def test_an_endpoint_quoting_the_key_in_its_error_body_does_not_leak_it_into_messages_or_output(
    tmp_path: Path, kind: str
) -> None:
    """Some servers answer "invalid credentials: Bearer <key>". batchrun quotes error bodies in
    its messages and in failed rows' ``error``, so it must keep the key out of what it quotes."""
    rows = prompt_rows(12)
    write_csv(tmp_path / "input.csv", rows)
    leaky = rows[5]["prompt"]
    canary = f"sk-canary-{uuid.uuid4().hex}"
    with LiveEndpoint(rule=lambda n, p: kind if leaky in p else None) as ep:
        job = write_job(
            tmp_path, ep.url, endpoint={"api_key_env": KEY_ENV}, run={"batch_size": 1, "concurrency": 1, "max_retries": 1}
        )
        result = cli(job, cwd=tmp_path, env={KEY_ENV: canary})
        assert ep.log.faults.get(kind, 0) >= 1
    assert result.returncode == (4 if kind == "401echo" else 3), result.stderr
    assert canary not in result.stdout + result.stderr, "the key was printed"
    assert files_holding(tmp_path, canary) == [], "the key was written to disk"


@pytest.mark.timeout(60)
def test_tls_verification_stays_on_a_self_signed_endpoint_gets_no_request_until_trusted(tmp_path: Path, make_job: MakeJob) -> None:
    """https to an endpoint with a self-signed certificate: no request reaches it and the CLI
    stops with exit 4 naming the certificate; trusting the certificate (SSL_CERT_FILE) makes the
    same job complete, so the refusal was verification and nothing else."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a certificate")
    import ssl

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    rows = prompt_rows(20)
    with LiveEndpoint(ssl_context=context) as ep:
        assert ep.url.startswith("https://")
        job = make_job(rows, url=ep.url, run={"concurrency": 2, "max_retries": 1, "outage_after_failures": 3})
        refused = cli(job.path, cwd=tmp_path)
        assert refused.returncode == 4, refused.stderr
        assert "certificate verify failed" in refused.stderr
        assert ep.log.requests == 0
        trusted = cli(job.path, cwd=tmp_path, env={"SSL_CERT_FILE": str(cert)})
        assert trusted.returncode == 0, trusted.stderr
        assert ep.log.requests > 0
    assert_exact(job.output(), rows)


# --- 10. accounting --------------------------------------------------------------------------------


def test_the_summary_accounting_matches_the_counts_taken_inside_the_endpoint(tmp_path: Path) -> None:
    """Requests, prompts sent and resent, retries by cause (one per injected fault, under its
    class), rows failed by class, and time spent throttled under a rate limit."""
    rows = prompt_rows(200)
    poison = poisoned(rows, [50])
    write_csv(tmp_path / "input.csv", rows)
    kinds = ["500", "drop", "429", "reset", "invalid_json", "503"]
    with LiveEndpoint(rule=shared_faults(0.25, kinds, seed=7, always_reject=poison)) as ep:
        job = write_job(
            tmp_path, ep.url,
            run={"batch_size": 4, "concurrency": 4, "max_retries": 10, "requests_per_minute": 3000},
        )
        summary = run_job(job)
    received = ep.log.prompts_received
    injected = {k: n for k, n in ep.log.faults.items() if k != "400"}
    print(summary.line())
    print(f"endpoint: {ep.log.requests} requests, {len(received)} prompts, faults {ep.log.faults}")
    assert set(injected) == set(kinds)
    assert summary.requests == ep.log.requests
    assert summary.prompts_sent == len(received)
    assert summary.prompts_resent == len(received) - len(set(received)) > 0
    expected_retries: Counter[str] = Counter()
    for kind, n in injected.items():
        expected_retries[CAUSE[kind]] += n
    assert summary.retries_by_cause == dict(expected_retries)
    assert (summary.failed, summary.failed_by_class, summary.succeeded) == (1, {"rejected": 1}, 199)
    assert summary.rows_answered_this_run == 199
    assert summary.throttle_wait_s > 0
    assert f"in {summary.requests} requests ({sum(expected_retries.values())} retries: " in summary.line()
    assert f"{summary.prompts_resent} prompts resent" in summary.line()


# --- 11. the "done when" -------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_5000_rows_with_a_quarter_of_requests_faulted_every_kind_and_5_poison_prompts_end_exact(
    tmp_path: Path,
) -> None:
    """Batch 16, concurrency 8, about 25% of requests faulted, every kind taking turns, five
    prompts always rejected: every other row exact, exactly the poison rows failed, and the
    endpoint never saw more than 16 prompts in a request nor more than 8 requests at once."""
    rows = prompt_rows(5000)
    positions = [3, 1111, 2500, 3999, 4999]
    poison = poisoned(rows, positions)
    write_csv(tmp_path / "input.csv", rows)
    kinds = [k for k in FAULT_KINDS]
    rule = shared_faults(0.25, kinds, seed=2024, always_reject=poison)
    # Answers take 30 ms, so all eight workers are busy at once and the limit is really tested.
    with LiveEndpoint(ServerOptions(latency_s=0.03), rule=rule, huge_bytes=256 * 1024) as ep:
        job = write_job(
            tmp_path, ep.url,
            endpoint={"timeout_s": 0.5, "max_response_mb": 0.05},
            run={"batch_size": 16, "concurrency": 8, "max_retries": 12, "retry_after_max_s": 0.3,
                 "checkpoint_rows": 512},
        )
        started = time.monotonic()
        summary = run_job(job)
        wall = time.monotonic() - started
    log = ep.log
    random_faults = sum(n for k, n in log.faults.items() if k != "400")
    print(
        f"\nmixed run: {wall:.1f}s wall, {log.requests} requests ({summary.requests} by batchrun), "
        f"{random_faults} faulted ({random_faults / log.requests:.0%}) + {log.faults.get('400', 0)} poison rejections, "
        f"{len(log.prompts_received)} prompts sent, {summary.prompts_resent} resent, "
        f"max batch {log.max_batch}, max in flight {log.max_in_flight}"
    )
    print(f"faults by kind: {dict(sorted(log.faults.items()))}")
    print(f"retries by cause: {dict(sorted(summary.retries_by_cause.items()))}")
    print(summary.line())
    assert set(log.faults) == set(kinds) | {"400"}, "a fault kind was never injected"
    assert 0.2 <= random_faults / log.requests <= 0.3
    assert log.max_batch == 16
    assert log.max_in_flight == 8
    assert summary.requests == log.requests and summary.prompts_sent == len(log.prompts_received)
    assert summary.prompts_resent == len(log.prompts_received) - len(rows)
    expected_retries: Counter[str] = Counter()
    for kind, n in log.faults.items():
        if kind not in ("400", "reorder"):  # a rejection splits, a reordered answer is matched
            expected_retries[CAUSE[kind]] += n
    assert summary.retries_by_cause == dict(expected_retries)
    assert (summary.status, summary.exit_code) == ("complete_with_failed_rows", 3)
    assert (summary.failed, summary.failed_by_class) == (5, {"rejected": 5})
    df = pl.read_parquet(output_of(tmp_path))
    assert df["id"].to_list() == [r["id"] for r in rows]
    assert df["prompt"].to_list() == [r["prompt"] for r in rows]
    assert only_failed(df)["id"].to_list() == [rows[i]["id"] for i in positions]
    assert all(e.startswith("rejected: HTTP 400") for e in only_failed(df)["error"].to_list())
    wrong = [
        r["id"] for r, got in zip(rows, df["output"].to_list())
        if r["prompt"] not in poison and got != expected_output(r["prompt"])
    ]
    assert wrong == [], f"{len(wrong)} rows carry a wrong output"


# --- 12. failed attempts logged as they happen ----------------------------------------------------


def test_the_retry_log_gives_the_first_failure_at_once_then_one_line_per_interval_summing_what_failed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A clock the test moves: failures within 30 s of the last line are summed, not logged; the
    first failure after the interval logs the sum by class (most first) with the last reason; a
    tick logs a sum whose interval has passed; the end of the run flushes what is left."""
    now = [1000.0]
    retry_log = RetryLog(30.0, clock=lambda: now[0])

    def fail(at: float, cause: str, reason: str) -> None:
        now[0] = at
        retry_log.failed(cause, reason)

    def messages() -> list[str]:
        return [r.getMessage() for r in caplog.records]

    with caplog.at_level(logging.WARNING, logger="batchrun"):
        fail(1000.0, "timeout", "no complete answer within endpoint.timeout_s")
        assert messages() == ["retrying: first failed attempt: timeout: no complete answer within endpoint.timeout_s"]
        for i in range(11):
            fail(1001.0 + i, "timeout", "no complete answer within endpoint.timeout_s")
        for i in range(3):
            fail(1020.0 + i, "http_503", f"HTTP 503: busy {i}")
        now[0] = 1029.9
        retry_log.tick()
        assert len(messages()) == 1, "a line within the interval"
        fail(1030.0, "timeout", "no complete answer within endpoint.timeout_s")
        assert messages()[1:] == [
            "retrying: 12 timeout, 3 http_503 in the last 30 s; last: timeout: no complete answer within endpoint.timeout_s"
        ]
        fail(1045.0, "http_503", "HTTP 503: busy 3")
        now[0] = 1060.0
        retry_log.tick()  # a successful attempt: the interval since the last line has passed
        assert messages()[2:] == ["retrying: 1 http_503 in the last 30 s; last: http_503: HTTP 503: busy 3"]
        fail(1061.5, "invalid_response", "invalid response: 4 items: output is an empty list (first: item 0)")
        retry_log.flush()
        retry_log.flush()
        assert messages()[3:] == [
            "retrying: 1 invalid_response in the last 1.5 s; last: invalid_response: 4 items: output is an empty list (first: item 0)"
        ]
    assert {(r.name, r.levelno) for r in caplog.records} == {("batchrun", logging.WARNING)}


@pytest.mark.timeout(60)
def test_off_a_terminal_failed_attempts_are_logged_as_they_happen_and_never_carry_the_key(tmp_path: Path, make_job: MakeJob) -> None:
    """The CLI with stderr a pipe (cron): an endpoint failing three attempts with an error body
    quoting the key. The first failure is logged at once, the rest summed when the run ends; the
    key is redacted in both lines and appears nowhere in what was printed."""
    rows = prompt_rows(40)
    canary = f"sk-canary-{uuid.uuid4().hex}"
    with LiveEndpoint(rule=lambda n, p: "500echo" if n <= 3 else None) as ep:
        job = make_job(rows, url=ep.url, endpoint={"api_key_env": KEY_ENV}, run={"concurrency": 1})
        result = cli(job.path, cwd=tmp_path, env={KEY_ENV: canary})
    assert result.returncode == 0, result.stderr
    body = re.escape('{"message": "invalid credentials: Bearer [redacted]", "data": []}')
    warnings = [line for line in result.stderr.splitlines() if " WARNING " in line]
    print("\n".join(warnings))
    assert len(warnings) == 2, result.stderr
    assert re.fullmatch(rf"\d\d:\d\d:\d\d batchrun WARNING retrying: first failed attempt: http_500: HTTP 500: {body}", warnings[0])
    assert re.fullmatch(
        rf"\d\d:\d\d:\d\d batchrun WARNING retrying: 2 http_500 in the last \d+\.\d s; last: http_500: HTTP 500: {body}",
        warnings[1],
    )
    assert canary not in result.stdout + result.stderr
    assert_exact(job.output(), rows)


# --- 13. after Ctrl-C or SIGTERM nothing new is sent ------------------------------------------------


def assert_stopped_and_nothing_sent_after(
    child: StderrWatch, ep: LiveEndpoint, signalled_at: float, within_s: float
) -> str:
    code, err = child.finish()
    took = time.monotonic() - signalled_at
    late = [a.n for a in ep.log.arrivals if a.at > signalled_at]
    print(f"stopped {took:.2f}s after the signal; requests after it: {late}")
    assert code == 130, err
    assert error_line(err) == "batchrun: error: interrupted by SIGINT: progress saved; run the same command to resume"
    assert late == [], "a request was sent after the signal"
    assert took < within_s, "a wait went on after the signal"
    return err


@pytest.mark.timeout(60)
def test_after_ctrl_c_a_worker_waiting_to_retry_sends_nothing_and_the_rows_its_batch_answered_are_kept(
    tmp_path: Path, make_job: MakeJob
) -> None:
    """One worker. Requests 1-3 are answered (rows 0-11); request 4 (rows 12-15) has its first
    echo altered, so 13-15 are answered and row 12 is retried; request 5 gets 503 with
    ``Retry-After: 4``. Ctrl-C then: exit 130 well before the 4 s wait would end, no request
    after the signal, rows 0-11 and 13-15 kept, row 12 unresolved (not failed); the rerun sends
    exactly row 12 and the rows never sent."""
    rows = prompt_rows(64)
    rule = lambda n, p: None if n <= 3 else "alter" if n == 4 else "503ra"  # noqa: E731
    with LiveEndpoint(rule=rule, retry_after="4") as ep:
        job = make_job(rows, url=ep.url, run={"batch_size": 4, "concurrency": 1, "checkpoint_rows": 16})
        child = StderrWatch(job.path)
        wait_for(lambda: ep.log.faults.get("503ra") == 1 and ep.log.in_flight == 0 or child.proc.poll() is not None,
                 "the 503 that starts a 4 s wait")
        signalled_at = time.monotonic()
        child.proc.send_signal(signal.SIGINT)
        assert_stopped_and_nothing_sent_after(child, ep, signalled_at, within_s=3)
        kept = committed_results(job.state()).to_pylist()
        assert sorted(r["row"] for r in kept) == [*range(12), 13, 14, 15]
        assert [r for r in kept if r["error"] is not None] == [], "a row was marked failed by the stop"

        ep.rule = None
        first = len(ep.log.prompts_received)
        assert run_job(job.path).exit_code == 0
        assert Counter(ep.log.prompts_received[first:]) == Counter(r["prompt"] for r in [rows[12], *rows[16:]])
    assert_exact(job.output(), rows)


@pytest.mark.timeout(60)
def test_after_ctrl_c_workers_held_by_a_429_pause_send_nothing_more(tmp_path: Path, make_job: MakeJob) -> None:
    """Two workers. The faster request gets 429 with ``Retry-After: 4`` at once: its worker waits
    to retry and the whole run pauses. The slower one (0.5 s) is answered meanwhile, so its
    worker's next request waits for the pause to end. Ctrl-C: both waits end at once (exit 130,
    no third request), the answered rows are kept and none is failed."""
    rows = prompt_rows(40)
    with LiveEndpoint(ServerOptions(latency_s=0.5), rule=lambda n, p: "429ra" if n == 2 else None,
                      retry_after="4") as ep:
        job = make_job(rows, url=ep.url, run={"batch_size": 4, "concurrency": 2, "checkpoint_rows": 8})
        child = StderrWatch(job.path)
        wait_for(lambda: ep.log.requests == 2 and ep.log.in_flight == 0 and any(
            "retrying: first failed attempt: http_429" in line for line in child.lines
        ) or child.proc.poll() is not None, "a 429 and the other request answered")
        signalled_at = time.monotonic()
        child.proc.send_signal(signal.SIGINT)
        assert_stopped_and_nothing_sent_after(child, ep, signalled_at, within_s=3)
        answered = ep.log.arrivals[0]
        assert (ep.log.requests, answered.fault) == (2, None)
        kept = committed_results(job.state()).to_pylist()
        assert len(kept) == 4 and [r for r in kept if r["error"] is not None] == []


def test_a_stop_ends_a_wait_for_a_rate_limit_turn_at_once() -> None:
    """``requests_per_minute = 1``: the second request's turn is a minute away. Setting the
    run's stop event ends that wait at once, with nothing acquired."""

    async def main() -> float:
        stop = asyncio.Event()
        throttle = Fleet.single("http://a", RetryPolicy(0, 1.0, 60.0), 8, rate=admission.RateGate(1, None, 4))
        await throttle.admit(4, stop)  # the first turn is free
        waiting = asyncio.ensure_future(throttle.admit(4, stop))
        await asyncio.sleep(0)  # let it start waiting
        assert not waiting.done()
        started = time.monotonic()
        stop.set()
        with pytest.raises(admission.Stopping):
            await asyncio.wait_for(waiting, 5)
        return time.monotonic() - started

    assert asyncio.run(main()) < 1


def test_a_batch_that_fails_before_any_answer_is_not_an_outage_when_its_neighbours_then_answer(
    tmp_path: Path, make_job: MakeJob
) -> None:
    """First run, three requests in flight: the batch holding row 0 is refused with 500 at once,
    twice, while the others are still being answered. "Never answered this job" is judged only
    once nothing in flight can answer it: the others succeed, so its rows fail (exit 3) and the
    run is no outage (found by the crash model as a rare exit 4)."""
    rows = prompt_rows(12)
    first = rows[0]["prompt"]
    with LiveEndpoint(ServerOptions(latency_s=0.3), rule=lambda n, p: "500" if first in p else None) as ep:
        job = make_job(rows, url=ep.url, run={"batch_size": 4, "concurrency": 3, "max_retries": 1})
        result = cli(job.path)
    assert result.returncode == 3, result.stderr
    assert "outage" not in result.stderr and "has not answered" not in result.stderr
    df = pl.read_parquet(job.output())
    assert df["error"].to_list()[:4] == [df["error"][0]] * 4 and df["error"][0].startswith("http_500")
    assert df["error"][4:].null_count() == 8
