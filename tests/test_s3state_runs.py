"""Whole runs with the run state on S3 (a real SeaweedFS on loopback): a kill -9 storm, and four
shards as four processes that share nothing but the bucket, merged into the output one process
would have written."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import BATCHRUN, assert_exact, expected_output, prompt_rows, tally, write_csv, write_job
from endpoint import LiveEndpoint
from pyarrow import fs
from s3server import SeaweedS3

from batchrun import run_job
from batchrun.s3state import S3RunState
from batchrun.s3store import S3Path
from batchrun.server import ServerOptions

BUCKET = "runs"
REPO = Path(__file__).resolve().parent.parent
EXACT = {"lost": 0, "duplicated": 0, "misplaced": 0}
KILLS = int(os.environ.get("BATCHRUN_S3_KILLS", 12))
KILL_SEED = int(os.environ.get("BATCHRUN_KILL_SEED", 4))
ROWS, SEGMENT, INTERVAL_S, BATCH, CONCURRENCY, LATENCY_S = 2000, 64, 0.2, 8, 4, 0.05
IN_FLIGHT = CONCURRENCY * BATCH
# The most rows the endpoint can answer in one checkpoint interval: each worker at most one
# request per LATENCY_S. A kill costs at most what was in flight and answered since the last save.
PER_INTERVAL = CONCURRENCY * BATCH * math.ceil(INTERVAL_S / LATENCY_S)


@pytest.fixture(scope="module")
def s3(s3_server: SeaweedS3) -> SeaweedS3:
    s3_server.make_bucket(BUCKET)
    return s3_server


def on_s3(s3: SeaweedS3, job: Path, state: str) -> Path:
    """The job file with its run state on S3 (``output.state_dir``) and the store named in
    ``[storage]``, as a user writes it (written once; a job started again keeps it)."""
    text = job.read_text(encoding="utf-8")
    if "state_dir" not in text:
        text = text.replace("[output]\n", f'[output]\nstate_dir = "{state}"\n', 1)
        text += f'\n[storage]\nendpoint_url = "{s3.endpoint_url}"\nregion = "{s3.region}"\n'
        job.write_text(text, encoding="utf-8")
    return job


def start(
    s3: SeaweedS3, job: Path, state: str, *args: str, tmp: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    """``batchrun JOB`` (``--shard I/N`` or ``--merge``: ``batchrun merge JOB``) in a process of
    its own, in the job's folder (with its own temporary folder), credentials in the environment."""
    base = {k: v for k, v in os.environ.items() if k != "BATCHRUN_CRASH_AT" and not k.startswith("AWS_")}
    env = {**base, **s3.env, **(env or {})}
    if tmp is not None:
        env["TMPDIR"] = str(tmp)
    on_s3(s3, job, state)
    command = ["merge", str(job)] if "--merge" in args else ["run", str(job), "--quiet", *args]
    return subprocess.Popen(
        [str(BATCHRUN), *command], cwd=job.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def last_summary(job: Path) -> dict[str, Any]:
    """The summary the job's last run wrote beside its (local) output."""
    doc: dict[str, Any] = json.loads((job.parent / "out" / "result.parquet.summary.json").read_text())
    return doc


def state_of(s3: SeaweedS3, uri: str) -> S3RunState:
    return S3RunState(S3Path.parse(uri), s3.filesystem())


def check_state_readable(s3: SeaweedS3, uri: str, rows: list[dict[str, Any]]) -> int:
    """What must hold at any instant: every segment and partial object reads back whole, with
    only its own rows' answers. Returns how many rows are saved."""
    return len(saved_rows(s3, uri, rows))


def saved_rows(s3: SeaweedS3, uri: str, rows: list[dict[str, Any]] | None = None) -> set[int]:
    """Rows whose answer a segment or partial object holds (each checked to be its own row's)."""
    filesystem = s3.filesystem()
    base = S3Path.parse(uri)
    saved: set[int] = set()
    for folder in ("segments", "partial"):
        selector = fs.FileSelector(f"{base.fs_path}/{folder}", allow_not_found=True)
        for info in filesystem.get_file_info(selector):
            if info.type != fs.FileType.File:
                continue
            with filesystem.open_input_file(info.path) as f:
                table = pq.read_table(f, columns=["row", "output", "error"], page_checksum_verification=True)
            for r in table.to_pylist():
                if r["error"] is None:
                    if rows is not None:
                        assert r["output"] == expected_output(rows[r["row"]]["prompt"]), (info.path, r["row"])
                    saved.add(r["row"])
    return saved


@pytest.mark.slow
@pytest.mark.timeout(max(300, KILLS * 25))
def test_kill_9_at_random_moments_with_the_state_on_s3_loses_duplicates_and_misplaces_nothing(
    s3: SeaweedS3, tmp_path: Path
) -> None:
    """The kill -9 harness of test_crash with the run state on S3: start the job, SIGKILL it
    after a random delay, check that every object of the state reads back whole, repeat; when a
    run gets through, check its output and start a fresh job, until the kills have landed."""
    rng = random.Random(KILL_SEED)
    rows = prompt_rows(ROWS)
    landed = starts = jobs = resent = counted = measured_all = 0
    totals = Counter({"lost": 0, "duplicated": 0, "misplaced": 0})
    started = time.monotonic()
    while landed < KILLS:
        jobs += 1
        folder = tmp_path / f"job-{jobs}"
        folder.mkdir()
        write_csv(folder / "input.csv", rows)
        state = f"s3://{BUCKET}/storm-{uuid.uuid4().hex[:8]}/state"
        with LiveEndpoint(ServerOptions(latency_s=LATENCY_S)) as ep:
            job = write_job(folder, ep.url, run={"batch_size": BATCH, "concurrency": CONCURRENCY,
                                                 "checkpoint_rows": SEGMENT, "checkpoint_interval_s": INTERVAL_S})
            kills_here = 0
            while True:
                starts += 1
                assert starts <= 4 * KILLS + 10, "runs keep finishing before the kill; the job is too small"
                finishing = landed >= KILLS
                mark = len(ep.log.prompts_received)
                proc = start(s3, job, state)
                try:
                    out, err = proc.communicate(timeout=180 if finishing else rng.uniform(0.5, 6.0))
                except subprocess.TimeoutExpired:
                    proc.kill()
                    out, err = proc.communicate()
                if proc.returncode == -signal.SIGKILL:
                    landed += 1
                    kills_here += 1
                    check_state_readable(s3, state, rows)
                    continue
                assert proc.returncode == 0, err
                break
            output = folder / "out" / "result.parquet"
            got = tally(output, rows)
            totals.update(got)
            assert got == EXACT, got
            assert_exact(output, rows)
            counts = Counter(ep.log.prompts_received)
            assert set(counts) == {r["prompt"] for r in rows}
            resent_here = sum(c - 1 for c in counts.values())
            assert resent_here <= kills_here * (IN_FLIGHT + PER_INTERVAL), (resent_here, kills_here)
            resent += resent_here
            before = Counter(ep.log.prompts_received[:mark])
            measured = sum(1 for p in ep.log.prompts_received[mark:] if before[p])
        summary = last_summary(job)
        # The journal on S3 is uploaded with partial saves: the count misses what was sent since
        # the last upload; it exceeds only by rows journaled but not yet on the wire (as locally).
        assert summary["prompts_resent"] <= measured + kills_here * IN_FLIGHT, (summary["prompts_resent"], measured)
        counted += summary["prompts_resent"]
        measured_all += measured
        leftover = state_of(s3, state)
        assert leftover.holders() == {} and leftover.partial_rows() == 0
    print(
        f"\n{landed} kills landed in {starts} starts over {jobs} jobs of {ROWS} rows: {totals['lost']} lost, "
        f"{totals['duplicated']} duplicated, {totals['misplaced']} misplaced; {resent} prompts sent more than "
        f"once (bound {landed * (IN_FLIGHT + PER_INTERVAL)}); the finishing runs resent {measured_all}, their journals counted {counted}; "
        f"{time.monotonic() - started:.0f} s"
    )
    assert dict(totals) == EXACT


def comparable(path: Path) -> pl.DataFrame:
    return pl.read_parquet(path).drop("latency_s")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_four_shards_in_four_processes_sharing_only_the_bucket_merge_to_the_one_process_output(
    s3: SeaweedS3, tmp_path: Path
) -> None:
    """Pods share nothing but the bucket: input, output and run state are on S3, and each of the
    four shard processes (then the merge) runs in an empty folder of its own with its own
    temporary folder, holding only the job file. The merged output is the one a single process
    writes from the same input."""
    rows = prompt_rows(700)
    where = f"{BUCKET}/shards-{uuid.uuid4().hex[:8]}"
    table = pa.Table.from_pylist(rows)
    with s3.filesystem().open_output_stream(f"{where}/in/prompts.parquet") as f:
        pq.write_table(table, f, row_group_size=100)
    output = f"s3://{where}/out/answers.parquet"  # its state: s3://.../answers.parquet.batchrun
    run = {"batch_size": 8, "concurrency": 2, "checkpoint_rows": 32, "checkpoint_interval_s": 0.1}
    started = time.monotonic()
    with LiveEndpoint(ServerOptions(latency_s=0.01)) as ep:

        def pod(name: str) -> Path:
            """An empty working folder and temporary folder of its own, and the job file."""
            folder = tmp_path / name
            (folder / "tmp").mkdir(parents=True)
            job = write_job(folder, ep.url, input_path=f"s3://{where}/in/prompts.parquet", output_path=output, run=run)
            job.write_text(job.read_text(encoding="utf-8")
                           + f'\n[storage]\nendpoint_url = "{s3.endpoint_url}"\nregion = "{s3.region}"\n')
            return job

        def launch(job: Path, *command: str) -> subprocess.Popen[str]:
            env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
            env.update(s3.env, TMPDIR=str(job.parent / "tmp"))
            return subprocess.Popen([str(BATCHRUN), *command, str(job), *(["--quiet"] if command == ("run",) else [])],
                                    cwd=job.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

        procs = [(i, launch(pod(f"pod-{i}"), "run", "--shard", f"{i}/4")) for i in range(1, 5)]
        for i, proc in procs:
            out, err = proc.communicate(timeout=240)
            assert proc.returncode == 0, (i, err)
        sharded_s = time.monotonic() - started
        summaries = {i: json.loads(download(s3, f"{output}.shard-{i}-of-4.summary.json")) for i in range(1, 5)}
        merger = pod("merger")
        proc = launch(merger, "merge")
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        merged = tmp_path / "merged.parquet"
        merged.write_bytes(download(s3, output))
        assert_exact(merged, rows)
        assert tally(merged, rows) == EXACT
        assert Counter(ep.log.prompts_received) == Counter(r["prompt"] for r in rows), "a prompt sent twice"

        pq.write_table(table, tmp_path / "alone-input.parquet")
        alone = write_job(tmp_path, ep.url, input_path="alone-input.parquet", output_path="alone/out.parquet",
                          run=run, name="alone.toml")
        summary = run_job(alone)
        assert summary.exit_code == 0
    one = tmp_path / "alone" / "out.parquet"
    assert comparable(merged).equals(comparable(one))
    assert pq.read_schema(merged).equals(pq.read_schema(one))
    statuses = sorted(s["status"] for s in summaries.values())
    print(f"\nfour shards in {sharded_s:.1f} s ({statuses}); merged output equals the one-process run's "
          f"({len(rows)} rows)")
    for i in range(1, 5):
        folder = tmp_path / f"pod-{i}"
        assert sorted(p.name for p in folder.iterdir()) == ["job.toml", "tmp"], f"pod {i} wrote beside its job"
        assert not any((folder / "tmp").iterdir()), f"pod {i} left files in its temporary folder"


def download(s3: SeaweedS3, url: str) -> bytes:
    with s3.filesystem().open_input_stream(url.removeprefix("s3://")) as f:
        data: bytes = f.read()
    return data


@pytest.mark.parametrize("step", ["carry:written", "carry:renamed", "plan:carried", "plan:renamed", None])
def test_an_incremental_plan_on_s3_crashed_at_each_step_then_rerun_sends_only_new_and_changed_rows(
    s3: SeaweedS3, tmp_path: Path, step: str | None
) -> None:
    """Incremental runs read the previous answers through the store (downloaded to the scratch
    folder) and publish the carry as one object: a crash at any step only repeats the step."""
    from test_crash import edited_input

    v1 = prompt_rows(120)
    state = f"s3://{BUCKET}/incr-{uuid.uuid4().hex[:8]}/state"
    write_csv(tmp_path / "input.csv", v1)
    with LiveEndpoint() as ep:
        job = write_job(tmp_path, ep.url, run={"batch_size": 4, "concurrency": 2, "checkpoint_rows": 32})
        first = start(s3, job, state)
        assert first.wait(120) == 0, first.communicate()[1]
        first.communicate()
        v2, to_send = edited_input(v1)
        write_csv(tmp_path / "input.csv", v2)
        mark = len(ep.log.prompts_received)
        if step is not None:
            crashed = start(s3, job, state, env={"BATCHRUN_CRASH_AT": step})
            crashed.communicate(timeout=120)
            assert crashed.returncode == -signal.SIGKILL, f"{step} was never reached"
        rerun = start(s3, job, state)
        out, err = rerun.communicate(timeout=120)
        assert rerun.returncode == 0, err
        sent = Counter(ep.log.prompts_received[mark:])
    assert_exact(tmp_path / "out" / "result.parquet", v2)
    assert sent == Counter(to_send), "the crash cost the answers of unchanged rows"
    assert last_summary(job)["incremental"] == {"reused": len(v1) - 1 - 3, "changed": 3, "new": 20}
    assert not state_of(s3, state).has_carry(), "the carry outlived the run that used it"


@pytest.mark.parametrize(
    "step",
    ["plan:written", "plan:renamed", "partial:renamed", "segment:written", "segment:renamed", "segment:published",
     "segment:renamed@3", "outputs:renamed", "finished:renamed"],
)
def test_a_crash_right_after_each_commit_step_on_s3_then_the_rerun_is_exact_without_resending_saved_rows(
    s3: SeaweedS3, tmp_path: Path, step: str
) -> None:
    rows = prompt_rows(240)
    state = f"s3://{BUCKET}/steps-{uuid.uuid4().hex[:8]}/state"
    write_csv(tmp_path / "input.csv", rows)
    # A slower endpoint keeps segments open across checkpoint ticks, so partial saves happen.
    with LiveEndpoint(ServerOptions(latency_s=0.05 if step.startswith("partial") else 0.01)) as ep:
        job = write_job(tmp_path, ep.url, run={"batch_size": 4, "concurrency": 2, "checkpoint_rows": 32,
                                               "checkpoint_interval_s": 0.05})
        crashed = start(s3, job, state, env={"BATCHRUN_CRASH_AT": step})
        crashed.communicate(timeout=120)
        assert crashed.returncode == -signal.SIGKILL, f"{step} was never reached: exit {crashed.returncode}"
        saved = saved_rows(s3, state, rows)
        mark = len(ep.log.prompts_received)
        rerun = start(s3, job, state)
        out, err = rerun.communicate(timeout=120)
        assert rerun.returncode == 0, err
        again = set(ep.log.prompts_received[mark:])
    output = tmp_path / "out" / "result.parquet"
    assert tally(output, rows) == EXACT
    assert_exact(output, rows)
    assert [i for i in sorted(saved) if rows[i]["prompt"] in again] == [], "saved answers were sent again"
    assert json.loads((tmp_path / "out" / "result.parquet.SUCCESS").read_text())["rows"] == len(rows)
