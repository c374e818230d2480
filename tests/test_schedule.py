"""Scheduling (issue 6): what cron and other schedulers see of a run, against a live loopback endpoint.

Exit codes through the real command, overlapping runs, `status` and the summary against the output
file, the success marker, shards and their merge, off-terminal logging, and a cron-like loop.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import resource
import signal
import socket
import subprocess
import time
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow.parquet as pq
import pytest
from conftest import (
    BATCHRUN,
    MakeJob,
    assert_exact,
    cli,
    invoke,
    marker_of,
    output_of,
    prompt_rows,
    summary_of,
    wait_for,
    write_csv,
    write_job,
)
from endpoint import LiveEndpoint

from batchrun.checkpoint import RunState
from batchrun.inputcheck import open_job
from batchrun.server import ServerOptions

HOST = re.escape(socket.gethostname())
STAMP = "%Y-%m-%dT%H:%M:%S%z"


def start(*args: Any, cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [str(BATCHRUN), *map(str, args)], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def finish(proc: subprocess.Popen[str], timeout: float = 30) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return proc.returncode, out, err


class Gate:
    """Holds every request the endpoint receives until ``open()``: a run stays mid-way for as
    long as a test needs, without guessing how long a sleep would be enough."""

    def __init__(self, **kwargs: Any):
        self.event = asyncio.Event()
        self.ep = LiveEndpoint(ServerOptions(hold=self.event), **kwargs)

    def open(self) -> None:
        assert self.ep._loop is not None
        self.ep._loop.call_soon_threadsafe(self.event.set)

    def close(self) -> None:
        """Hold the requests that come from now on (call between runs, with none in flight)."""
        self.event = self.ep.options.hold = asyncio.Event()


def status_json(job: Path) -> dict[str, Any]:
    result = invoke("status", "--json", job)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def counts_in(output: Path) -> dict[str, Any]:
    """succeeded, failed (by class) and skipped (empty prompts) counted from the output file itself."""
    errors = pl.read_parquet(output)["error"].to_list()
    by_class = Counter(e.split(":", 1)[0] for e in errors if e is not None)
    skipped = by_class.pop("empty_prompt", 0)
    return {
        "rows": len(errors),
        "succeeded": sum(e is None for e in errors),
        "failed": sum(by_class.values()),
        "failed_by_class": dict(sorted(by_class.items())),
        "skipped": skipped,
    }


def rows_in(files: list[Path]) -> int:
    return sum(pq.read_metadata(f).num_rows for f in files)


def committed_rows(state: Path) -> set[int]:
    """Input positions of the rows in committed checkpoint segments."""
    return {r for f in state.glob("segments/seg-*.parquet") for r in pq.read_table(f, columns=["row"])["row"].to_pylist()}


def busy_line(pid: int, lock: Path) -> str:
    return (
        rf"batchrun: error: another run holds this job \(pid {pid} on {HOST} since [^)]+\); "
        rf"lock: {re.escape(str(lock))}\n"
    )


def nothing_to_do(folder: Path, n: int) -> str:
    return f"batchrun: nothing to do: all {n} rows are done ({output_of(folder)})\n"


# -- 1. the exit code table, one situation each --------------------------------------------------


def test_exit_0_when_every_row_succeeded(tmp_path: Path, make_job: MakeJob) -> None:
    with LiveEndpoint() as ep:
        job = make_job(url=ep.url)
        result = invoke(job.path)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("batchrun: complete: 10/10 rows succeeded;")
    assert job.summary()["exit_code"] == 0
    assert_exact(job.output(), job.rows)


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"run": {"batch_size": 0}}, "run.batch_size: must be >= 1 (got 0)"),
        ({"input": {"prompt_column": "nope"}}, "input.prompt_column: column 'nope' is not in the input"),
    ],
)
def test_exit_2_for_an_invalid_job_sending_nothing(tmp_path: Path, bad: dict[str, Any], message: str, make_job: MakeJob) -> None:
    with LiveEndpoint() as ep:
        job = make_job(url=ep.url, **bad)
        result = invoke(job.path)
        assert ep.log.requests == 0
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    assert message in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()


def test_exit_2_when_the_input_changed_and_there_is_no_id_column(tmp_path: Path, make_job: MakeJob) -> None:
    with LiveEndpoint() as ep:
        job = make_job(url=ep.url, input={"id_column": None})
        assert invoke(job.path).exit_code == 0
        before = job.output().read_bytes()
        write_csv(tmp_path / "input.csv", job.rows + prompt_rows(2, start=10))
        result = invoke(job.path)
        assert ep.log.requests == 3  # the first run's only
    assert result.exit_code == 2, result.output
    assert "the input files (names, sizes or contents) differ" in result.stderr
    assert "--restart" in result.stderr
    assert len(result.stderr.splitlines()) == 1
    assert job.output().read_bytes() == before


def test_exit_3_when_rows_failed_and_the_output_is_written(tmp_path: Path, make_job: MakeJob) -> None:
    poison = "Prompt number 4: say something"
    with LiveEndpoint(rule=lambda n, prompts: "400" if poison in prompts else None) as ep:
        job = make_job(url=ep.url)
        result = invoke(job.path)
    assert result.exit_code == 3, result.output
    assert result.stdout.startswith("batchrun: complete_with_failed_rows: 9/10 rows succeeded, 1 failed (rejected 1);")
    df = pl.read_parquet(job.output())
    assert df["id"].to_list() == [r["id"] for r in job.rows]
    assert [e is not None for e in df["error"]] == [i == 4 for i in range(10)]
    assert job.summary()["exit_code"] == 3


def test_exit_4_when_the_endpoint_refuses_the_credentials_keeping_no_failed_row(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make_job: MakeJob
) -> None:
    monkeypatch.setenv("BATCHRUN_SCHEDULE_KEY", "wrong")
    with LiveEndpoint(api_keys={"right"}) as ep:
        job = make_job(url=ep.url, endpoint={"api_key_env": "BATCHRUN_SCHEDULE_KEY"})
        result = invoke(job.path)
        assert 1 <= ep.log.requests <= 2
    assert result.exit_code == 4, result.output
    assert "refused the credentials (HTTP 401)" in result.stderr
    assert not job.output().exists()
    summary = job.summary()
    assert (summary["status"], summary["exit_code"], summary["failed"]) == ("credentials_refused", 4, 0)


def test_exit_4_when_the_endpoint_is_gone_stopping_early(tmp_path: Path, make_job: MakeJob) -> None:
    with LiveEndpoint() as gone:
        dead = gone.url  # nothing listens there once the block has closed it
    job = make_job(200, url=dead, run={"outage_after_failures": 3, "max_retries": 50})
    started = time.monotonic()
    result = invoke(job.path)
    assert result.exit_code == 4, result.output
    assert time.monotonic() - started < 10
    assert "failed 3 attempts in a row (last: connection: " in result.stderr
    assert not job.output().exists()
    assert job.summary()["status"] == "endpoint_unavailable"
    assert job.summary()["failed"] == 0


def test_exit_74_on_a_storage_error_leaves_nothing_half_written_and_the_rerun_completes(tmp_path: Path, make_job: MakeJob) -> None:
    """A file size limit (``ulimit -f``) makes the first checkpoint segment too large to write:
    EFBIG, as a full disk gives ENOSPC. Nothing half-written stays; without the limit it resumes."""

    def small_files() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of a kill
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

    with LiveEndpoint() as ep:
        job = make_job(40, url=ep.url, run={"checkpoint_rows": 10})
        failed = cli(job.path, cwd=tmp_path, preexec_fn=small_files)
        assert failed.returncode == 74, failed.stderr
        assert re.fullmatch(r"batchrun: storage_error: \d+/40 rows succeeded; .*; stopped \(exit 74\), "
                            r"progress kept: run the same command to resume\n", failed.stdout), failed.stdout
        assert re.search(
            r"^batchrun: error: cannot write \S+: file too large for this filesystem or limit; free space and "
            r"run the same command$",
            failed.stderr,
            re.M,
        ), failed.stderr
        assert "Traceback" not in failed.stderr
        assert not job.output().exists()
        assert [p for p in tmp_path.rglob("*") if ".tmp-" in p.name] == []
        assert (job.summary()["status"], job.summary()["exit_code"]) == ("storage_error", 74)

        again = cli(job.path, cwd=tmp_path)
        assert again.returncode == 0, again.stderr
    assert_exact(job.output(), job.rows)


@pytest.mark.parametrize("lock, shard", [("lock", None), ("lock.shard-2-of-4", "2/4")])
def test_exit_75_while_another_process_holds_the_job_or_shard_lock(
    tmp_path: Path, lock: str, shard: str | None, make_job: MakeJob
) -> None:
    with LiveEndpoint() as ep:
        job = make_job(40, url=ep.url, run={"checkpoint_rows": 5})
        spec = open_job(job.path)
        args = ["--shard", shard] if shard else []
        with RunState(spec.state_dir).lock(lock):
            result = invoke(job.path, *args)
            assert ep.log.requests == 0
            if shard:  # another shard has a lock of its own and runs meanwhile
                other = invoke(job.path, "--shard", "1/4")
                assert other.exit_code == 0, other.output
                assert other.stdout.startswith("batchrun: shard 1/4 complete: 10 rows succeeded;")
    assert result.exit_code == 75
    assert result.stdout == ""
    assert re.fullmatch(busy_line(os.getpid(), spec.state_dir / lock), result.stderr), result.stderr


def test_exit_75_for_a_merge_before_any_shard_has_run(tmp_path: Path, make_job: MakeJob) -> None:
    with LiveEndpoint() as ep:
        job = make_job(url=ep.url)
        result = invoke("merge", job.path)
        assert ep.log.requests == 0
    assert result.exit_code == 75
    assert result.stdout == ""
    assert result.stderr == f"batchrun: error: nothing to merge: no shard of {job.path} has run yet\n"
    assert not job.output().exists()


def test_exit_130_on_sigterm_with_progress_saved_and_the_rerun_resumes(tmp_path: Path, make_job: MakeJob) -> None:
    rows = prompt_rows(200)
    with LiveEndpoint(ServerOptions(latency_s=0.05)) as ep:
        job = make_job(rows, url=ep.url, run={"checkpoint_rows": 20, "checkpoint_interval_s": 0.2})
        proc = start(job.path, cwd=tmp_path)
        wait_for(lambda: proc.poll() is not None or any(job.state().glob("segments/seg-*.parquet")),
                 "a committed segment")
        assert proc.poll() is None, "the run ended before it could be stopped"
        proc.send_signal(signal.SIGTERM)
        code, out, err = finish(proc)
        assert code == 130, err
        # Even an interrupted run ends with its one summary line.
        assert re.fullmatch(
            r"batchrun: interrupted: \d+/200 rows succeeded; this run answered \d+ rows in \d+ requests "
            r"\(.*\) in [\d.]+s; stopped \(exit 130\), progress kept: run the same command to resume\n",
            out,
        ), out
        assert err.endswith(
            "batchrun: error: interrupted by SIGTERM: progress saved; run the same command to resume\n"
        ), err
        assert not job.output().exists()
        assert (job.summary()["status"], job.summary()["exit_code"]) == ("interrupted", 130)
        committed = committed_rows(job.state())
        assert 0 < len(committed) < 200

        sent_before = len(ep.log.prompts_received)
        again = invoke(job.path)
        assert again.exit_code == 0, again.output
        resent = set(ep.log.prompts_received[sent_before:])
    assert not resent & {rows[i]["prompt"] for i in committed}
    assert_exact(job.output(), rows)


# -- 2. overlapping runs ------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_three_runs_started_at_once_one_completes_and_two_exit_75_at_once_naming_it(tmp_path: Path, make_job: MakeJob) -> None:
    """As cron would start them on overlapping minutes (``--quiet``): the endpoint holds the
    winner's requests until both others have exited, so they demonstrably did not wait for it."""
    gate = Gate()
    with gate.ep as ep:
        job = make_job(40, url=ep.url, endpoint={"timeout_s": 60})
        procs = [start(job.path, "--quiet", cwd=tmp_path) for _ in range(3)]
        try:
            wait_for(lambda: sum(p.poll() is not None for p in procs) >= 2, "two runs to exit")
            running = [p for p in procs if p.poll() is None]
            assert len(running) == 1, [p.returncode for p in procs]
            winner = running[0]
            # Meanwhile `status` names the running process, and the runs turned away wrote no
            # summary over the one the running process will write.
            assert status_json(job.path)["running"]["lock"].startswith(f"pid {winner.pid} on ")
            assert not (tmp_path / "out" / "result.parquet.summary.json").exists()
        finally:
            gate.open()
        results = {p.pid: finish(p) for p in procs}
        assert Counter(ep.log.prompts_received) == Counter(r["prompt"] for r in job.rows)
    code, out, err = results[winner.pid]
    assert code == 0, err
    assert out.startswith("batchrun: complete: 40/40 rows succeeded;") and out.count("\n") == 1
    assert err == ""
    for pid, (code, out, err) in results.items():
        if pid != winner.pid:
            assert code == 75, err
            assert out == ""
            assert re.fullmatch(busy_line(winner.pid, job.state() / "lock"), err), err
    assert_exact(job.output(), job.rows)


# -- 3. status and the summary against the output file ------------------------------------------


def test_status_and_the_summary_report_the_counts_of_the_output_file(tmp_path: Path, make_job: MakeJob) -> None:
    """Rows rejected by the endpoint (poison), empty prompts never sent, and one 500 retried."""
    rows = prompt_rows(30)
    for i, empty in ((5, ""), (17, "   "), (29, "")):
        rows[i]["prompt"] = empty
    poison = {rows[9]["prompt"], rows[22]["prompt"]}
    injected = []

    def rule(n: int, prompts: list[str]) -> str | None:
        if poison.intersection(prompts):
            return "400"
        if not injected:
            injected.append(n)
            return "500"
        return None

    with LiveEndpoint(rule=rule) as ep:
        job = make_job(rows, url=ep.url)
        result = invoke(job.path)
        received = list(ep.log.prompts_received)
        requests = ep.log.requests
    assert result.exit_code == 3, result.output
    counts = counts_in(job.output())
    assert counts == {
        "rows": 30, "succeeded": 25, "failed": 2, "failed_by_class": {"rejected": 2}, "skipped": 3,
    }

    status = status_json(job.path)
    assert status["state"] == "complete"
    assert status["rows"] == status["done"] == counts["rows"]
    assert status["pending"] == 0
    assert status["saved_in_partials"] == 0
    assert status["running"] == {}
    assert status["success_marker"] is True
    for key in ("succeeded", "failed", "failed_by_class", "skipped"):
        assert status[key] == counts[key], key

    summary = job.summary()
    assert status["last_run"] == summary
    assert (summary["status"], summary["exit_code"], summary["total_rows"]) == ("complete_with_failed_rows", 3, 30)
    for key in ("succeeded", "failed", "failed_by_class", "skipped"):
        assert summary[key] == counts[key], key
    assert summary["rows_answered_this_run"] == counts["succeeded"]
    assert summary["requests"] == requests
    assert summary["prompts_sent"] == len(received)
    assert summary["prompts_resent"] == len(received) - len(set(received))  # every prompt is unique
    assert summary["prompts_resent"] > 0  # the halving around the poison prompts resends
    assert summary["retries_by_cause"] == {"http_500": 1}
    started = datetime.strptime(summary["started_at"], STAMP)
    finished = datetime.strptime(summary["finished_at"], STAMP)
    assert summary["duration_s"] > 0
    assert 0 <= (finished - started).total_seconds() <= summary["duration_s"] + 1  # whole-second stamps
    assert summary["rows_per_s"] == pytest.approx(summary["rows_answered_this_run"] / summary["duration_s"])

    marker = json.loads(job.marker().read_text())
    assert {k: marker[k] for k in counts} == counts
    assert marker["output"] == str(job.output())

    text = invoke("status", job.path)
    assert text.exit_code == 0
    assert "state:     complete\n" in text.stdout
    assert "rows:      30 total, 30 done (25 succeeded, 2 failed: rejected 2, 3 skipped), 0 pending\n" in text.stdout
    assert f"output:    {job.output()} (complete)\n" in text.stdout
    assert re.search(r"^last run:  complete_with_failed_rows \(exit 3\), ", text.stdout, re.M)


def test_status_of_an_interrupted_run_shows_pending_rows_and_agrees_with_its_summary(tmp_path: Path, make_job: MakeJob) -> None:
    rows = prompt_rows(200)
    with LiveEndpoint(ServerOptions(latency_s=0.05)) as ep:
        job = make_job(rows, url=ep.url, run={"checkpoint_rows": 20, "checkpoint_interval_s": 0.1})
        proc = start(job.path, cwd=tmp_path)
        wait_for(lambda: proc.poll() is not None or any(job.state().glob("segments/seg-*.parquet")),
                 "a committed segment")
        assert proc.poll() is None, "the run ended before it could be stopped"
        proc.send_signal(signal.SIGTERM)
        code, _, err = finish(proc)
    assert code == 130, err

    committed = rows_in(sorted(job.state().glob("segments/seg-*.parquet")))
    partial = rows_in(sorted(job.state().glob("partial/seg-*.parquet")))
    status = status_json(job.path)
    assert status["state"] == "in progress"
    assert status["rows"] == 200
    assert status["done"] == status["succeeded"] == committed
    assert 0 < status["pending"] == 200 - committed
    assert status["saved_in_partials"] == partial
    assert status["failed"] == 0
    assert status["running"] == {}
    assert status["success_marker"] is False
    last = status["last_run"]
    assert last == job.summary()
    assert (last["status"], last["exit_code"]) == ("interrupted", 130)
    assert last["rows_answered_this_run"] >= committed

    text = invoke("status", job.path).stdout
    assert f"rows:      200 total, {committed} done ({committed} succeeded, 0 failed), {200 - committed} pending" in text
    assert re.search(r"^last run:  interrupted \(exit 130\), ", text, re.M)

    # The summary a scheduler reads after exit 130 reports the job's counts as status does (a
    # complete run's summary does: succeeded/failed are the job's, not this run's).
    assert (last["succeeded"], last["failed"], last["failed_by_class"]) == (
        status["succeeded"], status["failed"], status["failed_by_class"]
    )


def test_status_names_the_processes_holding_the_job_and_shard_locks(tmp_path: Path, make_job: MakeJob) -> None:
    job = make_job(url="http://127.0.0.1:9/inference")
    state = RunState(open_job(job.path).state_dir)
    with state.lock(), state.lock("lock.shard-2-of-4"):
        status = status_json(job.path)
        text = invoke("status", job.path).stdout
    assert set(status["running"]) == {"lock", "lock.shard-2-of-4"}
    for holder in status["running"].values():
        assert re.fullmatch(rf"pid {os.getpid()} on {HOST} since \S+", holder), holder
    assert re.search(rf"^running:   pid {os.getpid()} on {HOST} since \S+ \(lock\)$", text, re.M), text
    assert re.search(rf"^running:   pid {os.getpid()} .*\(lock.shard-2-of-4\)$", text, re.M), text
    assert status_json(job.path)["running"] == {}  # released


def test_status_of_a_job_never_run_says_not_started_and_writes_nothing(tmp_path: Path, make_job: MakeJob) -> None:
    job = make_job(url="http://127.0.0.1:9/inference")
    status = status_json(job.path)
    assert status["state"] == "not started"
    assert (status["rows"], status["done"], status["pending"]) == (None, 0, None)
    assert (status["running"], status["last_run"], status["shards"]) == ({}, None, {})
    assert status["success_marker"] is False
    text = invoke("status", job.path)
    assert text.exit_code == 0
    assert text.stdout == f"job:       {job.path}\nstate:     not started\noutput:    {job.output()}\n"
    assert not (tmp_path / "out").exists()


# -- 4. the success marker ----------------------------------------------------------------------


def test_the_success_marker_appears_when_complete_and_is_gone_while_a_restart_rewrites_the_output(
    tmp_path: Path, make_job: MakeJob
) -> None:
    gate = Gate()
    with gate.ep as ep:
        job = make_job(url=ep.url, endpoint={"timeout_s": 60}, run={"grace_s": 0.2})
        assert not job.marker().exists()
        gate.open()
        assert invoke(job.path).exit_code == 0
        marker = json.loads(job.marker().read_text())
        assert marker["rows"] == 10 and marker["succeeded"] == 10 and marker["failed"] == 0
        assert marker["output"] == str(job.output())
        assert status_json(job.path)["success_marker"] is True

        gate.close()
        sent = ep.log.requests
        proc = start(job.path, "--restart", cwd=tmp_path)
        wait_for(lambda: proc.poll() is not None or ep.log.requests > sent, "the restarted run's first request")
        assert proc.poll() is None
        assert not job.marker().exists()  # mid-way: the output is being replaced
        assert status_json(job.path)["success_marker"] is False
        proc.send_signal(signal.SIGTERM)
        code, _, err = finish(proc)
        assert code == 130, err
        assert not job.marker().exists()  # interrupted: still not complete
        assert status_json(job.path)["state"] == "in progress"

        gate.open()
        assert invoke(job.path).exit_code == 0
    again = json.loads(job.marker().read_text())
    assert again["rows"] == 10 and again["succeeded"] == 10
    assert_exact(job.output(), job.rows)


def test_the_success_marker_is_removed_while_a_rerun_retries_failed_rows_and_rewritten_after(
    tmp_path: Path, make_job: MakeJob
) -> None:
    poison = {"Prompt number 3: say something"}
    gate = Gate(rule=lambda n, prompts: "400" if poison.intersection(prompts) else None)
    with gate.ep as ep:
        job = make_job(url=ep.url, endpoint={"timeout_s": 60})
        gate.open()
        assert invoke(job.path).exit_code == 3
        marker = json.loads(job.marker().read_text())
        assert (marker["succeeded"], marker["failed"], marker["failed_by_class"]) == (9, 1, {"rejected": 1})

        poison.clear()  # the endpoint now answers it
        gate.close()
        sent, prompts = ep.log.requests, len(ep.log.prompts_received)
        proc = start(job.path, cwd=tmp_path)
        wait_for(lambda: proc.poll() is not None or ep.log.requests > sent, "the rerun's first request")
        assert proc.poll() is None
        assert not job.marker().exists()
        gate.open()
        code, out, err = finish(proc)
        assert code == 0, err
        assert ep.log.prompts_received[prompts:] == ["Prompt number 3: say something"]  # only the failed row
    marker = json.loads(job.marker().read_text())
    assert (marker["succeeded"], marker["failed"], marker["failed_by_class"]) == (10, 0, {})
    assert_exact(job.output(), job.rows)


# -- 5. shards ----------------------------------------------------------------------------------


# Segments of 10 rows (8 segments for 80): shard I of 4 owns segments I-1 and I+3.
SHARDED = {"endpoint": {"timeout_s": 60}, "run": {"checkpoint_rows": 10, "concurrency": 1}}


def test_four_shards_run_one_after_another_the_last_writes_the_output_and_merge_names_unfinished(
    tmp_path: Path, make_job: MakeJob
) -> None:
    with LiveEndpoint() as ep:
        job = make_job(80, url=ep.url, **SHARDED)
        unfinished = [1, 2, 3, 4]
        for i in (1, 3, 4):
            result = invoke(job.path, "--shard", f"{i}/4")
            unfinished.remove(i)
            assert result.exit_code == 0, result.output
            assert result.stdout == (
                f"batchrun: shard {i}/4 complete: 20 rows succeeded; this run answered 20 rows in 6 requests; "
                f"{2 * len(unfinished)} segments of other shards are not done yet\n"
            )
            summary = job.summary(f"{i}/4")
            assert (summary["status"], summary["exit_code"], summary["shard"]) == ("shard_complete", 0, f"{i}/4")
            assert (summary["succeeded"], summary["rows_answered_this_run"]) == (20, 20)
            assert not job.output().exists()
            assert not job.marker().exists()

            merge = invoke("merge", job.path)
            assert merge.exit_code == 75
            assert merge.stdout == ""
            assert merge.stderr == (
                f"batchrun: error: cannot merge yet: {2 * len(unfinished)} of 8 segments are not done; "
                f"unfinished shard(s): {', '.join(f'{u}/4' for u in unfinished)}\n"
            )
            assert not job.output().exists()

        last = invoke(job.path, "--shard", "2/4")
        assert last.exit_code == 0, last.output
        assert re.fullmatch(
            r"batchrun: complete: 80/80 rows succeeded; this run answered 20 rows in 6 requests \(0 retries, "
            rf"0 prompts resent\) in \d+\.\ds; output: {re.escape(str(job.output()))}\n",
            last.stdout,
        ), last.stdout
        summary = job.summary("2/4")
        assert (summary["status"], summary["exit_code"], summary["succeeded"]) == ("complete", 0, 80)
        assert json.loads(job.marker().read_text())["rows"] == 80

        requests = ep.log.requests
        merge = invoke("merge", job.path)
        assert merge.exit_code == 0, merge.output
        assert merge.stdout == nothing_to_do(tmp_path, 80)
        assert ep.log.requests == requests
        assert Counter(ep.log.prompts_received) == Counter(r["prompt"] for r in job.rows)
    assert_exact(job.output(), job.rows)
    status = status_json(job.path)
    assert sorted(status["shards"]) == ["1-of-4", "2-of-4", "3-of-4", "4-of-4"]
    assert (status["state"], status["done"], status["pending"]) == ("complete", 80, 0)


@pytest.mark.timeout(60)
def test_four_shards_at_once_all_exit_0_and_every_prompt_is_sent_exactly_once(tmp_path: Path, make_job: MakeJob) -> None:
    """The endpoint holds requests until all four shards have one in flight: they truly overlap."""
    gate = Gate()
    with gate.ep as ep:
        job = make_job(80, url=ep.url, **SHARDED)
        procs = [start(job.path, "--shard", f"{i}/4", cwd=tmp_path) for i in range(1, 5)]
        try:
            wait_for(lambda: ep.stats.in_flight == 4 or any(p.poll() is not None for p in procs),
                     "a request in flight from each shard")
            assert all(p.poll() is None for p in procs), [p.returncode for p in procs]
        finally:
            gate.open()
        results = [finish(p) for p in procs]
        assert Counter(ep.log.prompts_received) == Counter(r["prompt"] for r in job.rows)
        assert ep.log.max_batch <= 4
    for code, _, err in results:
        assert code == 0, err
    outs = [out for _, out, _ in results]
    assert any(o.startswith("batchrun: complete: 80/80 rows succeeded;") for o in outs), outs
    for i in range(1, 5):
        assert job.summary(f"{i}/4")["exit_code"] == 0
    assert_exact(job.output(), job.rows)
    assert json.loads(job.marker().read_text())["rows"] == 80


def test_a_shard_run_twice_sends_nothing_new_and_duplicates_no_row(tmp_path: Path, make_job: MakeJob) -> None:
    with LiveEndpoint() as ep:
        job = make_job(80, url=ep.url, **SHARDED)
        assert invoke(job.path, "--shard", "1/4").exit_code == 0
        requests = ep.log.requests
        twice = invoke(job.path, "--shard", "1/4")
        assert twice.exit_code == 0, twice.output
        assert twice.stdout == (
            "batchrun: shard 1/4 complete: 20 rows succeeded; this run answered 0 rows in 0 requests; "
            "6 segments of other shards are not done yet\n"
        )
        assert ep.log.requests == requests
        for i in (2, 3, 4):
            assert invoke(job.path, "--shard", f"{i}/4").exit_code == 0
        requests = ep.log.requests
        after = invoke(job.path, "--shard", "1/4")
        assert after.exit_code == 0
        assert after.stdout == nothing_to_do(tmp_path, 80)
        assert ep.log.requests == requests
        assert Counter(ep.log.prompts_received) == Counter(r["prompt"] for r in job.rows)
    assert_exact(job.output(), job.rows)


@pytest.mark.parametrize("value", ["0/4", "5/4", "x", "1/0", "2/4/8", "1/"])
def test_a_bad_shard_value_exits_2_before_anything_is_sent_or_written(tmp_path: Path, value: str, make_job: MakeJob) -> None:
    with LiveEndpoint() as ep:
        job = make_job(url=ep.url)
        result = invoke(job.path, "--shard", value)
        assert ep.log.requests == 0
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    assert result.stderr.startswith(f"batchrun: error: --shard {value}") or result.stderr.startswith(
        f"batchrun: error: --shard must look like 2/8 (got {value!r})"
    ), result.stderr
    assert len(result.stderr.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_restart_with_shard_exits_2_and_keeps_every_shards_progress(tmp_path: Path, make_job: MakeJob) -> None:
    with LiveEndpoint() as ep:
        job = make_job(80, url=ep.url, **SHARDED)
        assert invoke(job.path, "--shard", "1/4").exit_code == 0
        segments = sorted(job.state().glob("segments/*.parquet"))
        requests = ep.log.requests
        result = invoke(job.path, "--restart", "--shard", "2/4")
        assert ep.log.requests == requests
    assert result.exit_code == 2
    assert result.stderr == (
        "batchrun: error: --restart discards the progress of every shard; run it once without --shard\n"
    )
    assert sorted(job.state().glob("segments/*.parquet")) == segments


def test_a_shard_refuses_an_input_changed_since_the_plan_with_exit_2(tmp_path: Path, make_job: MakeJob) -> None:
    """Even with an id column: the new plan must be made by one run without --shard."""
    with LiveEndpoint() as ep:
        job = make_job(40, url=ep.url, **SHARDED)
        assert invoke(job.path, "--shard", "1/2").exit_code == 0
        write_csv(tmp_path / "input.csv", job.rows + prompt_rows(4, start=40))
        requests = ep.log.requests
        result = invoke(job.path, "--shard", "2/2")
        assert ep.log.requests == requests
    assert result.exit_code == 2, result.output
    assert "(an incremental plan is made by a run without --shard)" in result.stderr
    assert len(result.stderr.splitlines()) == 1


# -- 6. off a terminal ------------------------------------------------------------------------


def test_json_log_format_gives_one_json_object_per_line_with_progress_counts(tmp_path: Path, make_job: MakeJob) -> None:
    poison = "Prompt number 0: say something"
    rule = lambda n, prompts: "400" if poison in prompts else None  # noqa: E731
    with LiveEndpoint(ServerOptions(latency_s=0.05), rule=rule) as ep:
        # 20 rows, 2 a request, one at a time: ten requests at least 50 ms apart; row 0 fails.
        job = make_job(20, url=ep.url, run={"batch_size": 2, "concurrency": 1})
        result = invoke(job.path, "--log-format", "json", "--log-interval", "0.1")
    assert result.exit_code == 3, result.output
    # Every line is JSON, the summary line too: its message is the text line, its fields the summary.
    [last] = [json.loads(line) for line in result.stdout.splitlines()]
    assert last["level"] == "info"
    assert last["message"].startswith("batchrun: complete_with_failed_rows: 19/20 rows succeeded, 1 failed")
    assert (last["summary"]["exit_code"], last["summary"]["failed"], last["summary"]["total_rows"]) == (3, 1, 20)
    docs = [json.loads(line) for line in result.stderr.splitlines()]
    for doc in docs:
        assert {"time", "level", "message"} <= set(doc), doc
        datetime.strptime(doc["time"], STAMP)
    progress = [d for d in docs if d["message"].startswith("progress: ")]
    assert len(progress) >= 2, docs
    for doc in progress:
        assert doc["level"] == "info"
        assert doc["total"] == 20
        assert 0 <= doc["done"] <= 20 and doc["failed"] in (0, 1)
        assert isinstance(doc["rows_per_s"], float | int) and doc["rows_per_s"] >= 0
        assert doc["message"].startswith(
            f"progress: {doc['done']}/20 rows done, {doc['failed']} failed, {doc['rows_per_s']:.1f} rows/s, eta "
        ), doc
    assert [d["done"] for d in progress] == sorted(d["done"] for d in progress)
    assert progress[-1]["failed"] == 1


# -- 7. cron ------------------------------------------------------------------------------------


def test_a_cron_loop_after_completion_says_nothing_to_do_once_each_time_and_exits_0_quickly(
    tmp_path: Path,
) -> None:
    """The README's crontab line: `cd /data && batchrun jobs/daily.toml --quiet`."""
    (tmp_path / "jobs").mkdir()
    rows = prompt_rows(30)
    write_csv(tmp_path / "input.csv", rows)
    with LiveEndpoint() as ep:
        job = write_job(tmp_path / "jobs", ep.url, input_path="../input.csv", output_path="../out/result.parquet",
                        name="daily.toml")
        assert invoke(job, "--quiet").exit_code == 0
        output_stat = output_of(tmp_path).stat()
        marker = marker_of(tmp_path).read_bytes()
        requests = ep.log.requests
        for _ in range(3):
            started = time.monotonic()
            tick = cli("jobs/daily.toml", "--quiet", cwd=tmp_path, timeout=30)
            took = time.monotonic() - started
            assert tick.returncode == 0, tick.stderr
            assert tick.stdout == nothing_to_do(tmp_path, 30)
            assert tick.stderr == ""
            assert took < 10
            assert summary_of(tmp_path)["status"] == "nothing_to_do"
        assert ep.log.requests == requests
    assert output_of(tmp_path).stat().st_mtime_ns == output_stat.st_mtime_ns
    assert marker_of(tmp_path).read_bytes() == marker
    assert_exact(output_of(tmp_path), rows)
