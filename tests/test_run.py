"""End-to-end runs against a live endpoint on 127.0.0.1: counts are taken inside the endpoint."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import (
    PARAMS,
    MakeJob,
    assert_exact,
    cli,
    committed_results,
    expected_output,
    prompt_rows,
    state_of,
    wait_for,
    write_csv,
    write_job,
)
from endpoint import LiveEndpoint

from batchrun import run_job
from batchrun.errors import AuthError, JobError, StateError
from batchrun.server import ServerOptions, effective_params

BATCHRUN = Path(sys.executable).with_name("batchrun")
OUTPUT_COLUMNS = ["output", "params", "error", "attempts", "latency_s"]


def fault_every_third(kind: str) -> Callable[[int, list[str]], str | None]:
    """Fault every third request, but never the same list of prompts twice, so every batch can
    finish within its retries whatever order the requests arrive in."""
    faulted: set[tuple[str, ...]] = set()

    def rule(n: int, prompts: list[str]) -> str | None:
        key = tuple(prompts)
        if n % 3 == 0 and key not in faulted:
            faulted.add(key)
            return kind
        return None

    return rule


# --- 1. the "done when" -----------------------------------------------------------------


def test_3000_rows_batch_8_concurrency_4_make_375_requests_bounded_and_exact(tmp_path: Path, make_job: MakeJob) -> None:
    """375 requests, never more than 8 prompts in one nor 4 in flight, each row its own output,
    in input order, with every input column and the typed result columns."""
    rows = prompt_rows(3000)
    with LiveEndpoint(ServerOptions(latency_s=0.005)) as ep:
        job = make_job(rows, url=ep.url, run={"batch_size": 8, "concurrency": 4})
        summary = run_job(job.path)
    log = ep.log
    assert log.requests == 375
    assert summary.requests == 375 and summary.prompts_sent == 3000 and summary.prompts_resent == 0
    assert log.max_batch == 8
    assert log.max_in_flight == 4
    assert Counter(log.prompts_received) == Counter(r["prompt"] for r in rows)
    assert (summary.status, summary.exit_code, summary.succeeded, summary.failed) == ("complete", 0, 3000, 0)

    df = assert_exact(tmp_path / "out" / "result.parquet", rows)
    assert df.columns == ["id", "topic", "prompt", *OUTPUT_COLUMNS]
    assert df["topic"].to_list() == [r["topic"] for r in rows]
    assert df.schema["output"] == pl.List(pl.String)
    assert isinstance(df.schema["params"], pl.Struct)
    assert df.schema["error"] == pl.String
    assert df.schema["attempts"].is_integer()
    assert df.schema["latency_s"] == pl.Float64
    assert set(df["params"].to_list()[0]) == {"max_tokens", "temperature", "top_p", "top_k"}
    assert df["params"].unique().to_list() == [effective_params(PARAMS)]
    assert df["attempts"].to_list() == [1] * 3000
    assert df["latency_s"].null_count() == 0 and df["latency_s"].min() > 0


# --- 2. a complete job rerun ------------------------------------------------------------------


def test_rerun_of_a_complete_job_sends_nothing_and_says_nothing_to_do(tmp_path: Path, endpoint: LiveEndpoint, make_job: MakeJob) -> None:
    rows = prompt_rows(40)
    job = make_job(rows, url=endpoint.url)
    assert run_job(job.path).status == "complete"
    out = tmp_path / "out" / "result.parquet"
    before, bytes_before = endpoint.log.requests, out.read_bytes()

    again = run_job(job.path)

    assert again.status == "nothing_to_do"
    assert again.exit_code == 0
    assert (again.total_rows, again.succeeded, again.failed) == (40, 40, 0)
    assert endpoint.log.requests == before
    assert out.read_bytes() == bytes_before
    assert_exact(out, rows)


def test_rerun_after_the_output_was_deleted_rewrites_it_from_the_checkpoint_without_sending(
    tmp_path: Path, endpoint: LiveEndpoint, make_job: MakeJob
) -> None:
    rows = prompt_rows(40)
    job = make_job(rows, url=endpoint.url)
    run_job(job.path)
    (tmp_path / "out" / "result.parquet").unlink()
    before = endpoint.log.requests

    again = run_job(job.path)

    assert endpoint.log.requests == before
    assert (again.status, again.exit_code, again.rows_answered_this_run) == ("complete", 0, 0)
    assert_exact(tmp_path / "out" / "result.parquet", rows)


# --- 3. Ctrl-C and resume ----------------------------------------------------------------------


def interrupt_once_progress_is_saved(job: Path, state: Path) -> tuple[int, str]:
    """Start ``batchrun JOB`` as a user would, press Ctrl-C once a partial or segment file exists,
    and return its exit code and stderr."""
    proc = subprocess.Popen(
        [str(BATCHRUN), str(job)], cwd=job.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        wait_for(
            lambda: proc.poll() is not None
            or any(state.glob("partial/seg-*.parquet"))
            or any(state.glob("segments/seg-*.parquet")),
            "a partial or segment file",
        )
        assert proc.poll() is None, "the run ended before it could be interrupted"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, err


def test_ctrl_c_saves_progress_and_the_same_command_finishes_without_resending_committed_rows(
    tmp_path: Path,
) -> None:
    rows = prompt_rows(400)
    write_csv(tmp_path / "input.csv", rows)
    state = state_of(tmp_path)
    with LiveEndpoint(ServerOptions(latency_s=0.05)) as ep:
        job = write_job(
            tmp_path, ep.url, run={"batch_size": 4, "concurrency": 2, "checkpoint_interval_s": 0.2}
        )
        code, err = interrupt_once_progress_is_saved(job, state)
        assert code == 130, err
        assert "progress saved" in err
        assert ep.log.requests < 100, "the first run was not interrupted mid-way"
        assert not (tmp_path / "out" / "result.parquet").exists()

        done = committed_results(state).to_pylist()
        committed = {r["row"] for r in done if r["error"] is None}
        assert 0 < len(committed) < 400
        for r in done:  # what was committed is already right
            assert r["output"] == expected_output(rows[r["row"]]["prompt"])
        first_run = len(ep.log.prompts_received)

        second = cli(job)
        resent = Counter(ep.log.prompts_received[first_run:])

    assert second.returncode == 0, second.stderr
    assert [rows[i]["prompt"] for i in sorted(committed) if resent[rows[i]["prompt"]]] == []
    assert set(ep.log.prompts_received) == {r["prompt"] for r in rows}
    assert_exact(tmp_path / "out" / "result.parquet", rows)


# --- 4. duplicate and empty prompts --------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_duplicate_prompts_are_all_answered_and_empty_ones_are_skipped_never_sent_nor_failed(
    tmp_path: Path, endpoint: LiveEndpoint, fmt: str
) -> None:
    prompts = ["What is 2+2?", "", "Name a colour", "What is 2+2?", "   ", "\t", "What is 2+2?",
               "Name a colour", "unique one"]
    if fmt == "parquet":
        prompts.append(None)  # only Parquet can say null; a CSV empty field is ""
    rows = [{"id": f"r{i}", "prompt": p} for i, p in enumerate(prompts)]
    if fmt == "csv":
        write_csv(tmp_path / "input.csv", rows)
    else:
        pl.DataFrame(rows, schema={"id": pl.String, "prompt": pl.String}).write_parquet(tmp_path / "input.parquet")
    job = write_job(tmp_path, endpoint.url, input_path=f"input.{fmt}", run={"batch_size": 3})
    empty = [r for r in rows if r["prompt"] is None or not r["prompt"].strip()]

    summary = run_job(job)

    assert endpoint.log.prompts_received, "nothing was sent"
    assert set(endpoint.log.prompts_received) == {r["prompt"] for r in rows if r not in empty}
    assert (summary.status, summary.exit_code) == ("complete", 0)
    assert (summary.failed, summary.skipped, summary.succeeded) == (0, len(empty), len(rows) - len(empty))
    df = pl.read_parquet(tmp_path / "out" / "result.parquet")
    assert df["id"].to_list() == [r["id"] for r in rows]
    for got, r in zip(df.iter_rows(named=True), rows):
        if r in empty:
            assert got["output"] is None
            assert got["error"] is not None and got["error"].startswith("empty_prompt: "), got
            assert "empty prompt" not in got["error"], got  # the class is said once
        else:
            assert got["error"] is None, got
            assert got["output"] == expected_output(r["prompt"])

    requests = endpoint.log.requests
    again = run_job(job)
    assert endpoint.log.requests == requests, "a rerun resent something"
    assert (again.status, again.exit_code, again.skipped) == ("nothing_to_do", 0, len(empty))


# --- 5. endpoint faults -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind",
    ["reorder", "drop", "alter", "extra", "invalid_json", "not_ok", "output_string", "500", "429", "reset", "hang"],
)
def test_faults_on_some_requests_still_give_an_exact_output(tmp_path: Path, kind: str) -> None:
    rows = prompt_rows(48)
    write_csv(tmp_path / "input.csv", rows)
    with LiveEndpoint(rule=fault_every_third(kind)) as ep:
        job = write_job(
            tmp_path,
            ep.url,
            endpoint={"timeout_s": 0.5 if kind == "hang" else 10},
            run={"batch_size": 4, "concurrency": 2, "max_retries": 5},
        )
        summary = run_job(job)
    assert ep.log.faults.get(kind, 0) >= 1, "the fault was never injected"
    assert ep.log.max_batch <= 4
    assert (summary.status, summary.exit_code) == ("complete", 0)
    df = assert_exact(tmp_path / "out" / "result.parquet", rows)
    if kind == "reorder":  # items in another order are matched by prompt, not retried
        assert df["attempts"].to_list() == [1] * len(rows)
    else:
        assert df["attempts"].max() > 1


def test_a_prompt_always_answered_500_ends_failed_after_its_retries_and_a_rerun_retries_only_it(
    tmp_path: Path, make_job: MakeJob
) -> None:
    rows = prompt_rows(12)
    rows[5]["prompt"] = "FLAKY prompt"
    broken = {"on": True}
    with LiveEndpoint(rule=lambda n, p: "500" if broken["on"] and "FLAKY prompt" in p else None) as ep:
        job = make_job(rows, url=ep.url, run={"batch_size": 1, "max_retries": 3})
        summary = run_job(job.path)
        assert ep.log.prompts_received.count("FLAKY prompt") == 4
        assert (summary.exit_code, summary.failed, summary.failed_by_class) == (3, 1, {"http_500": 1})
        assert summary.prompts_resent == 3
        df = pl.read_parquet(tmp_path / "out" / "result.parquet")
        flaky = df.row(5, named=True)
        assert flaky["output"] is None
        assert flaky["error"].startswith("http_500") and "500" in flaky["error"], flaky
        assert flaky["attempts"] == 4
        assert df.filter(pl.col("error").is_not_null()).height == 1

        broken["on"] = False
        first = len(ep.log.prompts_received)
        again = run_job(job.path)
        assert ep.log.prompts_received[first:] == ["FLAKY prompt"]
    assert (again.status, again.exit_code) == ("complete", 0)
    assert_exact(tmp_path / "out" / "result.parquet", rows)


# --- 6. a poisoned prompt ---------------------------------------------------------------------


def test_a_prompt_rejected_with_400_fails_alone_and_a_rerun_retries_only_that_row(tmp_path: Path, make_job: MakeJob) -> None:
    rows = prompt_rows(40)
    poison = 13
    rows[poison]["prompt"] = "Prompt with POISON inside"
    with LiveEndpoint(rule=lambda n, prompts: "400" if any("POISON" in p for p in prompts) else None) as ep:
        job = make_job(rows, url=ep.url, run={"batch_size": 8, "concurrency": 2})
        summary = run_job(job.path)
        assert (summary.status, summary.exit_code) == ("complete_with_failed_rows", 3)
        assert (summary.succeeded, summary.failed) == (39, 1)
        df = pl.read_parquet(tmp_path / "out" / "result.parquet")
        assert df["id"].to_list() == [r["id"] for r in rows]
        for i, (got, r) in enumerate(zip(df.iter_rows(named=True), rows)):
            if i == poison:
                assert got["output"] is None
                assert got["error"] is not None and got["error"].startswith("rejected"), got
            else:  # its batch neighbours (rows 8..15) included
                assert got["error"] is None, got
                assert got["output"] == expected_output(r["prompt"])

        first = len(ep.log.prompts_received)
        again = run_job(job.path)
        assert ep.log.prompts_received[first:] == ["Prompt with POISON inside"]
    assert again.exit_code == 3 and again.failed == 1


# --- 7. credentials refused -------------------------------------------------------------------


@pytest.mark.timeout(20)  # a hang here is a bug, not a slow run
def test_401_raises_auth_error_writes_no_output_and_marks_no_row_failed(tmp_path: Path, make_job: MakeJob) -> None:
    rows = prompt_rows(20)
    refusing = {"on": True}
    with LiveEndpoint(rule=lambda n, p: "401" if refusing["on"] else None) as ep:
        job = make_job(rows, url=ep.url)
        with pytest.raises(AuthError):
            run_job(job.path)
        assert ep.log.requests >= 1
        assert not (tmp_path / "out" / "result.parquet").exists()
        errors = committed_results(job.state()).column("error").to_pylist()
        assert [e for e in errors if e is not None] == [], "a row was marked failed because of the credentials"

        refusing["on"] = False  # the key is fixed: the same job now completes
        summary = run_job(job.path)
    assert (summary.status, summary.exit_code) == ("complete", 0)
    assert_exact(tmp_path / "out" / "result.parquet", rows)


# --- 8. ids and templates -----------------------------------------------------------------------


def test_duplicate_ids_are_refused_naming_them_before_anything_is_sent(tmp_path: Path, endpoint: LiveEndpoint, make_job: MakeJob) -> None:
    rows = prompt_rows(10)
    rows[4]["id"] = rows[2]["id"]
    rows[9]["id"] = rows[7]["id"]
    job = make_job(rows, url=endpoint.url)
    with pytest.raises(JobError) as info:
        run_job(job.path)
    assert "r000002" in str(info.value) and "r000007" in str(info.value)
    assert endpoint.log.requests == 0
    assert not (tmp_path / "out" / "result.parquet").exists()


@pytest.mark.parametrize("duplicated", [True, False])
def test_the_id_check_spilled_to_disk_for_a_big_input_finds_duplicates_across_files_and_cleans_up(
    tmp_path: Path, endpoint: LiveEndpoint, monkeypatch: pytest.MonkeyPatch, duplicated: bool
) -> None:
    """Past ``_IDS_IN_MEMORY`` ids the digests go to temporary partition files: a duplicate in
    the first and the last of three files is still found, unique ids still pass, and the
    temporary files are gone either way."""
    from batchrun import iddigests

    monkeypatch.setattr(iddigests, "_IDS_IN_MEMORY", 500)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(scratch))
    rows = prompt_rows(3000)
    if duplicated:
        rows[2999]["id"] = rows[17]["id"]
    (tmp_path / "in").mkdir()
    for part in range(3):
        write_csv(tmp_path / "in" / f"part-{part}.csv", rows[part * 1000 : (part + 1) * 1000])
    job = write_job(tmp_path, endpoint.url, input_path="in/*.csv", run={"batch_size": 64, "concurrency": 4})
    if duplicated:
        with pytest.raises(JobError, match="must be unique; duplicated: 'r000017'$"):
            run_job(job)
        assert endpoint.log.requests == 0
    else:
        assert run_job(job).exit_code == 0
        assert_exact(tmp_path / "out" / "result.parquet", rows)
    assert list(scratch.iterdir()) == []


def test_a_template_sends_the_rendered_text_and_each_row_gets_its_output(tmp_path: Path, endpoint: LiveEndpoint) -> None:
    rows = prompt_rows(30)
    write_csv(tmp_path / "input.csv", rows)
    job = write_job(
        tmp_path, endpoint.url, input={"prompt_column": None, "template": "Tell me about {topic}"}
    )
    summary = run_job(job)
    rendered = [f"Tell me about {r['topic']}" for r in rows]
    assert summary.exit_code == 0
    assert Counter(endpoint.log.prompts_received) == Counter(rendered)
    df = pl.read_parquet(tmp_path / "out" / "result.parquet")
    assert df.columns == ["id", "topic", "prompt", *OUTPUT_COLUMNS]
    assert df["id"].to_list() == [r["id"] for r in rows]
    assert df["error"].null_count() == len(rows)
    assert df["output"].to_list() == [expected_output(t) for t in rendered]


# --- 9. input formats


def test_without_an_id_column_rows_are_keyed_by_position_and_answered_in_order(
    tmp_path: Path, endpoint: LiveEndpoint, make_job: MakeJob
) -> None:
    rows = prompt_rows(30)
    rows[20]["prompt"] = rows[3]["prompt"]  # a duplicate prompt too: position, not text, is the key
    job = make_job(rows, url=endpoint.url, input={"id_column": None}, run={"checkpoint_rows": 8})
    assert run_job(job.path).exit_code == 0
    assert_exact(tmp_path / "out" / "result.parquet", rows)


def test_parquet_input_is_answered_in_order_keeping_its_column_types(tmp_path: Path, endpoint: LiveEndpoint) -> None:
    rows = [{**r, "n": i} for i, r in enumerate(prompt_rows(50))]
    pl.DataFrame(rows).write_parquet(tmp_path / "input.parquet")
    job = write_job(tmp_path, endpoint.url, input_path="input.parquet", run={"checkpoint_rows": 16})
    assert run_job(job).exit_code == 0
    df = assert_exact(tmp_path / "out" / "result.parquet", rows)
    assert df["n"].dtype == pl.Int64
    assert df["n"].to_list() == list(range(50))


def test_a_glob_over_two_csv_files_keeps_input_order_across_the_files(tmp_path: Path, endpoint: LiveEndpoint) -> None:
    parts = tmp_path / "parts"
    parts.mkdir()
    first, second = prompt_rows(30), prompt_rows(25, start=30)
    write_csv(parts / "part-b.csv", second)  # written first, sorts second
    write_csv(parts / "part-a.csv", first)
    # Segments of 16 rows straddle the boundary between the files.
    job = write_job(tmp_path, endpoint.url, input_path="parts/part-*.csv", run={"checkpoint_rows": 16})
    assert run_job(job).exit_code == 0
    assert_exact(tmp_path / "out" / "result.parquet", first + second)


# --- 10. changed input ----------------------------------------------------------------------------


def test_changed_input_after_a_partial_run_is_refused_until_restart(tmp_path: Path) -> None:
    """Without an id column rows are keyed by position, so a changed input cannot be resumed."""
    rows = prompt_rows(200)
    write_csv(tmp_path / "input.csv", rows)
    with LiveEndpoint(ServerOptions(latency_s=0.05)) as ep:
        job = write_job(
            tmp_path, ep.url, input={"id_column": None},
            run={"batch_size": 4, "concurrency": 1, "checkpoint_rows": 8},
        )
        code, err = interrupt_once_progress_is_saved(job, state_of(tmp_path))
        assert code == 130, err

        rows[3]["prompt"] = "A changed prompt"
        write_csv(tmp_path / "input.csv", rows)
        requests = ep.log.requests
        with pytest.raises(StateError, match="--restart"):
            run_job(job)
        assert ep.log.requests == requests
        assert not (tmp_path / "out" / "result.parquet").exists()

        first = len(ep.log.prompts_received)
        ep.options.latency_s = 0.0
        summary = run_job(job, restart=True)
        assert Counter(ep.log.prompts_received[first:]) == Counter(r["prompt"] for r in rows)
    assert (summary.status, summary.exit_code) == ("complete", 0)
    assert_exact(tmp_path / "out" / "result.parquet", rows)


# --- 11. segments -------------------------------------------------------------------------------


def test_small_checkpoint_rows_commit_many_segments_and_leave_no_temporary_files(
    tmp_path: Path, endpoint: LiveEndpoint, make_job: MakeJob
) -> None:
    rows = prompt_rows(1000)
    job = make_job(rows, url=endpoint.url, run={"batch_size": 8, "concurrency": 4, "checkpoint_rows": 64})
    assert run_job(job.path).exit_code == 0
    assert_exact(tmp_path / "out" / "result.parquet", rows)
    segments = sorted(p.name for p in job.state().glob("segments/*.parquet"))
    assert segments == [f"seg-{k:08d}.parquet" for k in range(16)]  # ceil(1000 / 64)
    assert list(job.state().glob("partial/*")) == []
    assert [p for p in tmp_path.rglob("*") if ".tmp-" in p.name] == []
    assert endpoint.log.max_batch <= 8 and endpoint.log.max_in_flight <= 4


def test_the_output_gathers_segments_into_row_groups_of_bounded_rows(
    tmp_path: Path, endpoint: LiveEndpoint, monkeypatch: pytest.MonkeyPatch, make_job: MakeJob
) -> None:
    """Sixteen 64-row segments become row groups of 256 rows (four segments each), not one per
    segment: a 10M-row output then carries a small footer, not thousands of row groups."""
    from batchrun import sink

    monkeypatch.setattr(sink, "ROW_GROUP_ROWS", 250)
    rows = prompt_rows(1000)
    job = make_job(rows, url=endpoint.url, run={"batch_size": 8, "concurrency": 4, "checkpoint_rows": 64})
    assert run_job(job.path).exit_code == 0
    assert_exact(tmp_path / "out" / "result.parquet", rows)
    meta = pq.read_metadata(tmp_path / "out" / "result.parquet")
    assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == [256, 256, 256, 232]
    # Min/max statistics for the id and numbers, none for free text (they would fill the footer).
    group = meta.row_group(0)
    with_stats = {group.column(i).path_in_schema for i in range(group.num_columns) if group.column(i).is_stats_set}
    assert with_stats == {"id", "attempts", "latency_s", *(f"params.{k}" for k in PARAMS)}, with_stats


# --- 12. awkward text ---------------------------------------------------------------------------


def test_prompts_with_newlines_quotes_and_unicode_round_trip_exactly(tmp_path: Path, endpoint: LiveEndpoint, make_job: MakeJob) -> None:
    texts = [
        "line one\nline two",
        "windows\r\nline break",
        'She said "hi", then left',
        "comma, separated, text",
        "héllo wörld — 世界 🎉",
        "tab\there",
        "trailing spaces   ",
        "   leading spaces",
        "'single' and `back` quotes",
        "back\\slash",
        '"',
        "=1+1",
        "\u200bzero width",
    ]
    rows: list[dict[str, Any]] = [{"id": f"r{i}", "topic": "t", "prompt": t} for i, t in enumerate(texts)]
    job = make_job(rows, url=endpoint.url)
    assert run_job(job.path).exit_code == 0
    assert set(endpoint.log.prompts_received) == set(texts)
    assert_exact(tmp_path / "out" / "result.parquet", rows)


# --- 13. hostile input ----------------------------------------------------------------------------


def test_a_field_longer_than_csv_max_row_mb_is_refused_naming_the_key_and_raising_it_processes_it(
    tmp_path: Path, endpoint: LiveEndpoint
) -> None:
    """A 3 MB prompt is longer than ``csv_max_row_mb = 1``: a clear refusal before anything is
    sent, never a silent drop; with the default (16) the reader grows its block for this file
    and the row, and every row around it, is answered exactly once."""
    rows = prompt_rows(3000)
    rows[2011]["prompt"] = "long " * (600 * 1024)
    write_csv(tmp_path / "input.csv", rows)
    job = write_job(tmp_path, endpoint.url, input={"csv_max_row_mb": 1})
    with pytest.raises(JobError) as info:
        run_job(job)
    assert str(info.value) == (
        "input.csv: a CSV row is longer than input.csv_max_row_mb (1 MB); raise it for this input "
        "(memory use grows about 40 times as much)"
    )
    assert endpoint.log.requests == 0
    job = write_job(tmp_path, endpoint.url, run={"batch_size": 64, "concurrency": 4})
    assert run_job(job).exit_code == 0
    assert sorted(endpoint.log.prompts_received) == sorted(r["prompt"] for r in rows)
    assert_exact(tmp_path / "out" / "result.parquet", rows)


def test_a_first_csv_row_longer_than_the_first_block_is_read_by_growing_the_block(
    tmp_path: Path, endpoint: LiveEndpoint, make_job: MakeJob
) -> None:
    """Opening pyarrow's reader already parses the first block: a 1 MB first row failed there,
    outside the retry with a larger block, and was refused as longer than csv_max_row_mb (16)."""
    rows = prompt_rows(20)
    rows[0]["prompt"] = "long " * (200 * 1024)
    job = make_job(rows, url=endpoint.url)
    assert run_job(job.path).exit_code == 0
    assert_exact(tmp_path / "out" / "result.parquet", rows)


def test_invalid_utf8_in_a_csv_row_is_refused_with_exit_2_and_no_output(tmp_path: Path, endpoint: LiveEndpoint) -> None:
    rows = prompt_rows(30)
    write_csv(tmp_path / "input.csv", rows)
    raw = (tmp_path / "input.csv").read_bytes().replace(b"Prompt number 17", b"Prompt \xff\xfe 17")
    (tmp_path / "input.csv").write_bytes(raw)
    job = write_job(tmp_path, endpoint.url, run={"checkpoint_rows": 8})
    with pytest.raises(JobError, match=r"^cannot read input\.csv as csv: .*UTF8") as info:
        run_job(job)
    assert info.value.exit_code == 2
    assert not (tmp_path / "out" / "result.parquet").exists()
    assert "Prompt \ufffd" not in " ".join(endpoint.log.prompts_received), "a mangled prompt was sent"


def test_an_input_with_a_header_and_no_rows_is_refused_with_exit_2(tmp_path: Path, endpoint: LiveEndpoint) -> None:
    (tmp_path / "input.csv").write_text("id,topic,prompt\n", encoding="utf-8")
    job = write_job(tmp_path, endpoint.url)
    with pytest.raises(JobError, match="input.path: the input has no rows$"):
        run_job(job)
    assert endpoint.log.requests == 0


def test_a_resumed_parquet_run_reads_from_its_first_unfinished_segment(
    tmp_path: Path, endpoint: LiveEndpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With every segment but the last two committed, the rerun's reader starts at row group
    of the first unfinished one: the rows before it are never decoded."""

    rows = prompt_rows(400)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "input.parquet", row_group_size=50)
    job = write_job(tmp_path, endpoint.url, input_path="input.parquet", run={"checkpoint_rows": 50})
    assert run_job(job).exit_code == 0
    state = tmp_path / "out" / "result.parquet.batchrun"
    for k in (6, 7):
        (state / "segments" / f"seg-{k:08d}.parquet").unlink()
    decoded: list[int] = []
    real = pq.ParquetFile.iter_batches

    def counting(self: pq.ParquetFile, *args: Any, **kwargs: Any) -> Any:
        for batch in real(self, *args, **kwargs):
            decoded.append(batch.num_rows)
            yield batch

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", counting)
    mark = len(endpoint.log.prompts_received)
    assert run_job(job).exit_code == 0
    assert sorted(endpoint.log.prompts_received[mark:]) == sorted(r["prompt"] for r in rows[300:])
    # The engine decoded the last two row groups (100 rows) only; the finish reads all 400.
    assert decoded == [100, 400], decoded
    assert_exact(tmp_path / "out" / "result.parquet", rows)
