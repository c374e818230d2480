"""Crash-proof runs (issue 4): kill -9 at random moments, a crash right after every step of the
commit path, SIGTERM, and a full disk. Every time: nothing unreadable under a final name, and
the same command then finishes with every row exactly once, its own output, in input order.

Runs are CLI processes (``batchrun JOB``) against a live endpoint on 127.0.0.1, so counts are
taken inside the endpoint. ``BATCHRUN_KILLS`` sets how many kills the harness lands (20 in CI).
"""

from __future__ import annotations

import ast
import fcntl
import json
import math
import os
import random
import resource
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from conftest import (
    BATCHRUN,
    MakeJob,
    StderrWatch,
    assert_exact,
    assert_final_files_readable,
    cli,
    expected_output,
    marker_of,
    output_of,
    prompt_rows,
    state_of,
    tally,
    wait_for,
    write_csv,
    write_job,
)
from endpoint import LiveEndpoint

from batchrun import run_job
from batchrun.server import ServerOptions

EXACT = {"lost": 0, "duplicated": 0, "misplaced": 0}
SOURCE = Path(__file__).parent.parent / "batchrun"


# --- helpers -----------------------------------------------------------------------------------


def saved_rows(folder: Path, rows: list[dict[str, Any]]) -> set[int]:
    """Rows whose answer is saved in a segment or partial file; each saved answer must already be
    its own row's (what is saved is never wrong, only possibly incomplete)."""
    saved: set[int] = set()
    state = state_of(folder)
    for f in sorted(state.glob("segments/seg-*.parquet")) + sorted(state.glob("partial/seg-*.parquet")):
        table = pq.read_table(f, columns=["row", "output", "error"], page_checksum_verification=True)
        for r in table.to_pylist():
            if r["error"] is None:
                assert r["output"] == expected_output(rows[r["row"]]["prompt"]), (f.name, r["row"])
                saved.add(r["row"])
    return saved


def tmp_files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if ".tmp-" in p.name)


def check_after_a_crash(folder: Path, versions: list[list[dict[str, Any]]]) -> None:
    """What must hold at any instant: every final-named file reads back whole; an output, if
    there, is exact for an input it could have been made from; a success marker means the output
    is there and complete."""
    assert_final_files_readable(folder / "out")
    output = output_of(folder)
    if output.exists():
        tallies = [tally(output, v) for v in versions]
        assert EXACT in tallies, f"the output is not exact for any input version: {tallies}"
    if marker_of(folder).exists():
        marker = json.loads(marker_of(folder).read_text(encoding="utf-8"))
        assert output.exists(), "a success marker without the output"
        assert pq.read_metadata(output).num_rows == marker["rows"]


class OutputReader(threading.Thread):
    """Reads the output over and over while a run may be replacing it, as a downstream reader
    would: every read that finds the file must read it whole, with the rows of a known input."""

    def __init__(self, path: Path, versions: list[list[dict[str, Any]]]):
        super().__init__(name="output-reader", daemon=True)
        self.path = path
        self.ids = [[r["id"] for r in v] for v in versions]
        self.reads = 0
        self.bad: list[str] = []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            try:
                table = pq.read_table(self.path, columns=["id"])
            except FileNotFoundError:
                self.done.wait(0.002)
                continue
            except Exception as exc:  # a half-written file under the final name
                self.bad.append(repr(exc))
                continue
            self.reads += 1
            if table.column("id").to_pylist() not in self.ids:
                self.bad.append(f"rows of no known input ({table.num_rows} rows)")

    def __enter__(self) -> OutputReader:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        if self.is_alive():
            self.join(10)


# --- 1. kill -9 at random moments ---------------------------------------------------------------

KILLS = int(os.environ.get("BATCHRUN_KILLS", 20))
KILL_SEED = int(os.environ.get("BATCHRUN_KILL_SEED", 4))
HARNESS_ROWS, SEGMENT, INTERVAL_S, BATCH, CONCURRENCY, LATENCY_S = 2000, 64, 0.1, 8, 4, 0.01
IN_FLIGHT = CONCURRENCY * BATCH
# The most rows the endpoint can answer in one checkpoint interval: each worker at most one
# request per LATENCY_S.
PER_INTERVAL = CONCURRENCY * BATCH * math.ceil(INTERVAL_S / LATENCY_S)


@pytest.mark.slow
@pytest.mark.timeout(max(180, KILLS * 12))
def test_kill_9_at_random_moments_then_the_same_command_loses_duplicates_and_misplaces_nothing(tmp_path: Path) -> None:
    """The kill -9 harness: start the job, SIGKILL it after a random delay, check what is on disk,
    repeat; when a run gets through, check its output and start a fresh job. Resends are bounded
    by what was in flight or answered since the last checkpoint, per kill."""
    rng = random.Random(KILL_SEED)
    rows = prompt_rows(HARNESS_ROWS)
    landed = starts = jobs = resent = bound = 0
    totals = Counter({"lost": 0, "duplicated": 0, "misplaced": 0})
    reported_resent = measured_resent = 0
    started = time.monotonic()
    while landed < KILLS:
        jobs += 1
        folder = tmp_path / f"job-{jobs}"
        folder.mkdir()
        write_csv(folder / "input.csv", rows)
        with LiveEndpoint(ServerOptions(latency_s=LATENCY_S)) as ep:
            job = write_job(
                folder, ep.url,
                run={"batch_size": BATCH, "concurrency": CONCURRENCY, "checkpoint_rows": SEGMENT,
                     "checkpoint_interval_s": INTERVAL_S},
            )
            kills_here = 0
            while True:
                starts += 1
                assert starts <= 4 * KILLS + 20, "runs keep finishing before the kill; the job is too small"
                mark = len(ep.log.prompts_received)
                finishing = landed >= KILLS  # enough kills: let this one finish
                with open(folder / "run.log", "w") as log:
                    proc = subprocess.Popen([str(BATCHRUN), str(job)], cwd=folder, stdout=log, stderr=log)
                    try:
                        proc.wait(timeout=120 if finishing else rng.uniform(0.1, 2.6))
                    except subprocess.TimeoutExpired:
                        proc.kill()  # still running: this kill lands
                        proc.wait()
                if proc.returncode == -signal.SIGKILL:
                    landed += 1
                    kills_here += 1
                    check_after_a_crash(folder, [rows])
                    saved_rows(folder, rows)
                    continue
                assert proc.returncode == 0, (folder / "run.log").read_text()
                break
            # This run got through: the output is exact, and the resends stay within the bound.
            got = tally(output_of(folder), rows)
            totals.update(got)
            assert got == EXACT, got
            assert_exact(output_of(folder), rows)
            assert tmp_files(folder / "out") == []
            counts = Counter(ep.log.prompts_received)
            assert set(counts) == {r["prompt"] for r in rows}
            resent_here = sum(c - 1 for c in counts.values())
            resent += resent_here
            bound += kills_here * (IN_FLIGHT + PER_INTERVAL)
            assert resent_here <= kills_here * (IN_FLIGHT + PER_INTERVAL), (resent_here, kills_here)
            # The last run's summary counts the prompts it sent a second time.
            before = Counter(ep.log.prompts_received[:mark])
            measured = sum(1 for p in ep.log.prompts_received[mark:] if before[p])
            summary = json.loads((folder / "out" / "result.parquet.summary.json").read_text())
            assert measured <= summary["prompts_resent"] <= measured + kills_here * IN_FLIGHT, (summary, measured)
            reported_resent += summary["prompts_resent"]
            measured_resent += measured
    print(
        f"\n{landed} kills landed, {totals['lost']} lost, {totals['duplicated']} duplicated, "
        f"{totals['misplaced']} misplaced; {resent} prompts sent more than once "
        f"(bound {bound} = {landed} kills x ({IN_FLIGHT} in flight + {PER_INTERVAL} per checkpoint interval)); "
        f"the finishing runs' summaries counted {reported_resent} resends, the endpoint {measured_resent}; "
        f"{jobs} jobs of {HARNESS_ROWS} rows, {starts} starts, {time.monotonic() - started:.0f}s"
    )
    assert landed == KILLS
    assert dict(totals) == EXACT
    assert resent <= bound


# --- 2. the crash-point switch -------------------------------------------------------------------

PHASES = ("written", "fsynced", "renamed")
FRESH_STEPS = [
    *(f"{kind}:{phase}" for kind in ("plan", "partial", "segment", "outputs", "output", "finished", "success", "summary")
      for phase in PHASES),
    "plan:carried",
    "batch:answered",
    "segment:published",
    "finished:marked",
    *(f"segment:{phase}@{n}" for phase in (*PHASES, "published") for n in (2, 3)),
]
INCREMENTAL_STEPS = [*(f"carry:{phase}" for phase in PHASES), "plan:carried", "plan:renamed"]
OUTPUT_SIDE = {"outputs", "output", "finished", "success", "summary"}


def steps_in_source() -> set[str]:
    """Every crash point the code can reach: literal ``crashpoint("x:y")`` calls, and the three
    phases of every ``atomic_path``/``write_json_atomic`` kind (their defaults included)."""
    steps: set[str] = set()
    defaults = {"atomic_path": (1, "file"), "write_json_atomic": (2, "json")}
    for path in SOURCE.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Call):
                continue
            name = getattr(node.func, "id", getattr(node.func, "attr", None))
            if name == "crashpoint" and isinstance(node.args[0], ast.Constant):
                steps.add(node.args[0].value)
            elif name in defaults:
                where, default = defaults[name]
                kw = {k.arg: k.value for k in node.keywords}
                arg = node.args[where] if len(node.args) > where else kw.get("kind")
                if arg is None:
                    kind = default
                elif isinstance(arg, ast.Constant):
                    kind = arg.value
                else:
                    continue  # the helpers passing their own ``kind`` through
                steps.update(f"{kind}:{phase}" for phase in PHASES)
    return steps


def test_the_crash_point_tests_cover_every_step_the_code_names() -> None:
    covered = {s.split("@")[0] for s in FRESH_STEPS + INCREMENTAL_STEPS}
    assert steps_in_source() - covered == set()


def crash_job(folder: Path, url: str, rows: list[dict[str, Any]]) -> Path:
    write_csv(folder / "input.csv", rows)
    return write_job(
        folder, url, run={"batch_size": 4, "concurrency": 2, "checkpoint_rows": 32, "checkpoint_interval_s": 0.05}
    )


@pytest.mark.parametrize("step", FRESH_STEPS)
def test_a_crash_right_after_each_commit_step_leaves_readable_files_and_the_rerun_is_exact_without_redoing_saved_rows(
    tmp_path: Path, step: str
) -> None:
    rows = prompt_rows(240)
    output = output_of(tmp_path)
    # A partial is written only when a checkpoint tick (every 0.05 s) finds a segment half
    # answered: a slower endpoint keeps each segment open across several ticks, so a run on a
    # busy machine cannot finish before one lands (it once did with 0.01 s, in CI).
    latency = 0.05 if step.startswith("partial:") else 0.01
    with LiveEndpoint(ServerOptions(latency_s=latency)) as ep:
        job = crash_job(tmp_path, ep.url, rows)
        reader = OutputReader(output, [rows])
        if step.split(":")[0] in OUTPUT_SIDE:  # a reader polling the output while it is written
            reader.start()
        crashed = cli(job, crash_at=step)
        reader.__exit__()
        assert crashed.returncode == -signal.SIGKILL, f"{step} was never reached: exit {crashed.returncode}\n{crashed.stderr}"
        assert reader.bad == [], reader.bad
        check_after_a_crash(tmp_path, [rows])
        if step in ("output:written", "output:fsynced"):
            assert not output.exists(), "an output visible before its rename"
        saved = saved_rows(tmp_path, rows)
        mark = len(ep.log.prompts_received)

        summary = run_job(job)
        again = set(ep.log.prompts_received[mark:])
    assert summary.exit_code == 0, summary
    assert tally(output, rows) == EXACT
    assert_exact(output, rows)
    assert [i for i in sorted(saved) if rows[i]["prompt"] in again] == [], "saved answers were sent again"
    assert json.loads(marker_of(tmp_path).read_text())["rows"] == len(rows), "no success marker after the rerun"
    assert tmp_files(tmp_path / "out") == [], "the rerun left a crashed run's temporary files"


def edited_input(v1: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    """v1 with row 7 deleted, rows 30..32 edited and 20 rows appended; and the prompts to send."""
    v2 = [dict(r) for i, r in enumerate(v1) if i != 7]
    changed = []
    for r in v2[29:32]:
        r["prompt"] = r["prompt"] + " (edited)"
        changed.append(r["prompt"])
    new = prompt_rows(20, start=len(v1))
    return v2 + new, changed + [r["prompt"] for r in new]


@pytest.mark.parametrize("step", INCREMENTAL_STEPS)
def test_a_crash_in_each_step_of_an_incremental_plan_then_the_rerun_sends_only_new_and_changed_rows(
    tmp_path: Path, step: str
) -> None:
    v1 = prompt_rows(120)
    with LiveEndpoint() as ep:
        job = crash_job(tmp_path, ep.url, v1)
        assert run_job(job).exit_code == 0
        v2, to_send = edited_input(v1)
        write_csv(tmp_path / "input.csv", v2)
        mark = len(ep.log.prompts_received)
        with OutputReader(output_of(tmp_path), [v1, v2]) as reader:
            crashed = cli(job, crash_at=step)
        assert crashed.returncode == -signal.SIGKILL, f"{step} was never reached: exit {crashed.returncode}\n{crashed.stderr}"
        assert reader.bad == [], reader.bad
        check_after_a_crash(tmp_path, [v1, v2])

        summary = run_job(job)
        sent = Counter(ep.log.prompts_received[mark:])
    assert summary.exit_code == 0
    assert_exact(output_of(tmp_path), v2)
    assert sent == Counter(to_send), "the crash cost the answers of unchanged rows"
    assert summary.incremental == {"reused": len(v1) - 1 - 3, "changed": 3, "new": 20}
    assert tmp_files(tmp_path / "out") == []


def test_a_reader_of_an_output_being_rewritten_sees_the_old_file_whole_until_the_new_one_replaces_it(
    tmp_path: Path,
) -> None:
    rows = prompt_rows(2000)
    with LiveEndpoint() as ep:
        job = crash_job(tmp_path, ep.url, rows)
        assert run_job(job).exit_code == 0
        (state_of(tmp_path) / "finished.json").unlink()  # the next run must write the output again
        with OutputReader(output_of(tmp_path), [rows]) as reader:
            crashed = cli(job, crash_at="output:fsynced")
        assert crashed.returncode == -signal.SIGKILL
        assert reader.reads > 0 and reader.bad == [], (reader.reads, reader.bad)
        assert_exact(output_of(tmp_path), rows)  # the old output, untouched
        with OutputReader(output_of(tmp_path), [rows]) as reader:
            assert cli(job).returncode == 0
        assert reader.reads > 0 and reader.bad == []
    assert_exact(output_of(tmp_path), rows)


# --- 3. SIGTERM ------------------------------------------------------------------------------------


def test_sigterm_lets_requests_in_flight_land_saves_them_says_so_and_the_same_command_sends_none_again(
    tmp_path: Path, make_job: MakeJob
) -> None:
    rows = prompt_rows(400)
    with LiveEndpoint(ServerOptions(latency_s=0.05)) as ep:
        job = make_job(rows, url=ep.url, run={"batch_size": 4, "concurrency": 2, "checkpoint_interval_s": 30})
        run = StderrWatch(job.path)
        wait_for(lambda: ep.log.requests >= 10 or run.proc.poll() is not None, "ten requests")
        run.proc.send_signal(signal.SIGTERM)
        code, err = run.finish()
        first = set(ep.log.prompts_received)
        assert code == 130, err
        assert err.rstrip().endswith(
            "batchrun: error: interrupted by SIGTERM: progress saved; run the same command to resume"
        ), err
        assert not job.output().exists()
        check_after_a_crash(tmp_path, [rows])
        # Everything the first run sent landed within the grace and was saved (no interval
        # checkpoint ran: checkpoint_interval_s is 30), so none of it is sent again.
        assert saved_rows(tmp_path, rows) == {i for i, r in enumerate(rows) if r["prompt"] in first}
        mark = len(ep.log.prompts_received)
        second = cli(job.path)
        again = set(ep.log.prompts_received[mark:])
    assert second.returncode == 0, second.stderr
    assert first & again == set()
    assert_exact(job.output(), rows)


@pytest.mark.parametrize("spacing", ["after the stop notice", "back to back"])
def test_a_second_sigterm_exits_at_once_with_130_even_with_requests_hanging_and_the_rerun_is_exact(
    tmp_path: Path, spacing: str, make_job: MakeJob
) -> None:
    rows = prompt_rows(200)
    with LiveEndpoint(rule=lambda n, prompts: "hang") as ep:
        job = make_job(rows, url=ep.url, endpoint={"timeout_s": 120}, run={"grace_s": 30})
        run = StderrWatch(job.path)
        wait_for(lambda: ep.log.requests >= 1, "a request in flight")
        run.proc.send_signal(signal.SIGTERM)
        if spacing == "after the stop notice":
            run.wait_for_line("stopping: letting requests in flight land")
            second = signal.SIGTERM
        else:
            # Two of the same signal sent back to back can merge into one in the kernel (a
            # pending signal is not queued twice); a Ctrl-C on top of a scheduler's SIGTERM cannot.
            second = signal.SIGINT
        sent = time.monotonic()
        run.proc.send_signal(second)
        code, err = run.finish(timeout=30)
        took = time.monotonic() - sent
        assert code == 130, err
        assert took < 5, f"the second signal took {took:.1f}s to end a run with a 30s grace"
        assert "second signal: exiting now; run the same command to resume" in err
        check_after_a_crash(tmp_path, [rows])

        ep.rule = None
        second = cli(job.path)
    assert second.returncode == 0, second.stderr
    assert_exact(job.output(), rows)


def test_one_sigterm_with_requests_hanging_waits_grace_s_then_exits_130(tmp_path: Path, make_job: MakeJob) -> None:
    rows = prompt_rows(100)
    with LiveEndpoint(rule=lambda n, prompts: "hang") as ep:
        job = make_job(rows, url=ep.url, endpoint={"timeout_s": 120}, run={"grace_s": 0.5})
        run = StderrWatch(job.path)
        wait_for(lambda: ep.log.requests >= 1, "a request in flight")
        sent = time.monotonic()
        run.proc.send_signal(signal.SIGTERM)
        code, err = run.finish(timeout=30)
        took = time.monotonic() - sent
    assert code == 130, err
    assert "progress saved; run the same command to resume" in err
    assert 0.5 <= took < 0.5 + 2.0, f"exited {took:.2f}s after SIGTERM with grace_s 0.5"


def test_sigterm_then_sigkill_during_the_grace_as_a_scheduler_does_leaves_a_resumable_state(tmp_path: Path, make_job: MakeJob) -> None:
    rows = prompt_rows(200)
    hanging = {"on": False}
    with LiveEndpoint(ServerOptions(latency_s=0.01), rule=lambda n, p: "hang" if hanging["on"] else None) as ep:
        job = make_job(rows, url=ep.url, endpoint={"timeout_s": 120},
                        run={"grace_s": 30, "checkpoint_rows": 16, "checkpoint_interval_s": 0.05})
        run = StderrWatch(job.path)
        wait_for(lambda: ep.log.requests >= 12, "twelve requests")
        hanging["on"] = True
        wait_for(lambda: ep.log.in_flight >= 1, "a hanging request")
        run.proc.send_signal(signal.SIGTERM)
        run.wait_for_line("stopping: letting requests in flight land")
        run.proc.kill()
        code, _ = run.finish()
        assert code == -signal.SIGKILL
        check_after_a_crash(tmp_path, [rows])
        assert saved_rows(tmp_path, rows), "nothing was saved before the kill"
        hanging["on"] = False
        assert cli(job.path).returncode == 0
    assert_exact(job.output(), rows)


@pytest.mark.parametrize("held", ["plan.lock", "merge.lock"])
def test_sigterm_while_waiting_outside_the_request_loop_still_exits_130_saying_progress_is_saved(
    tmp_path: Path, held: str, make_job: MakeJob
) -> None:
    """A scheduler's SIGTERM can come at any moment, not only while requests are out: here while
    the run waits for the planning lock (held by a shard planning) or for the output lock (held by
    another process writing the output)."""
    rows = prompt_rows(64)
    with LiveEndpoint() as ep:
        job = make_job(rows, url=ep.url, run={"checkpoint_rows": 16})
        state = job.state()
        state.mkdir(parents=True)
        fd = os.open(state / held, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            run = StderrWatch(job.path)
            if held == "plan.lock":
                wait_for(lambda: f"pid {run.proc.pid} " in (state / "lock").read_text()
                         if (state / "lock").exists() else False, "the run lock taken")
            else:
                wait_for(lambda: len(list(state.glob("segments/seg-*.parquet"))) == 4
                         or run.proc.poll() is not None, "every segment committed")
            assert run.proc.poll() is None, "the run did not wait for the lock"
            run.proc.send_signal(signal.SIGTERM)
            code, err = run.finish()
        finally:
            os.close(fd)
    assert code == 130, f"exit {code}: {err}"
    assert "progress saved; run the same command to resume" in err
    check_after_a_crash(tmp_path, [rows])


# --- 4. disk full ------------------------------------------------------------------------------------


def limited(nbytes: int):
    def preexec() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))

    return preexec


def test_python_children_ignore_sigxfsz_so_a_file_size_limit_gives_efbig_not_death(tmp_path: Path) -> None:
    """The premise of the disk-full tests: past RLIMIT_FSIZE a write fails with EFBIG (errno 27)."""
    code = (
        "import signal\n"
        "assert signal.getsignal(signal.SIGXFSZ) == signal.SIG_IGN\n"
        f"with open({str(tmp_path / 'f')!r}, 'wb') as f:\n"
        "    f.write(b'x' * 4096)\n"
    )
    child = subprocess.run([sys.executable, "-c", code], preexec_fn=limited(1000), capture_output=True, text=True)
    assert child.returncode == 1, child
    assert child.stderr.rstrip().endswith("OSError: [Errno 27] File too large"), child.stderr
    assert (tmp_path / "f").stat().st_size == 1000


def sizes_of_a_clean_run(folder: Path, url: str, rows: list[dict[str, Any]]) -> dict[str, int]:
    folder.mkdir()
    job = crash_job(folder, url, rows)
    assert run_job(job).exit_code == 0
    state = state_of(folder)
    return {
        "plan": (state / "plan.json").stat().st_size,
        "checkpoint": min(f.stat().st_size for f in state.glob("segments/*.parquet")),
        "state": max(f.stat().st_size for f in (folder / "out").rglob("*") if f.is_file() and f != output_of(folder)),
        "output": output_of(folder).stat().st_size,
    }


@pytest.mark.parametrize("fails", ["plan", "checkpoint", "output"])
def test_a_full_disk_at_any_write_exits_74_with_one_clear_line_and_the_same_command_completes_once_freed(
    tmp_path: Path, fails: str
) -> None:
    rows = prompt_rows(240)
    with LiveEndpoint(ServerOptions(latency_s=0.005)) as ep:
        sizes = sizes_of_a_clean_run(tmp_path / "reference", ep.url, rows)
        # Each limit sits halfway between the largest file written before that step and the file
        # it must cut short, so the limit stops exactly the step under test.
        assert sizes["plan"] * 2 < sizes["checkpoint"] and sizes["state"] * 5 < sizes["output"] * 4, sizes
        limit = {
            "plan": sizes["plan"] // 2,
            "checkpoint": (sizes["plan"] + sizes["checkpoint"]) // 2,
            "output": (sizes["state"] + sizes["output"]) // 2,
        }[fails]
        where = {"plan": ("plan.json",), "checkpoint": ("/segments/seg-", "/partial/seg-"), "output": ("/out/result.parquet:",)}
        folder = tmp_path / "job"
        folder.mkdir()
        job = crash_job(folder, ep.url, rows)
        full = subprocess.run(
            [str(BATCHRUN), str(job)], cwd=folder, capture_output=True, text=True, timeout=60, preexec_fn=limited(limit)
        )
        assert full.returncode == 74, full.stderr
        errors = [line for line in full.stderr.splitlines() if line.startswith("batchrun: error:")]
        assert len(errors) == 1, full.stderr
        assert errors[0].startswith(f"batchrun: error: cannot write {folder}"), errors
        assert errors[0].endswith(": file too large for this filesystem or limit; free space and run the same command")
        assert any(w in errors[0] for w in where[fails]), errors
        assert "Traceback" not in full.stderr
        check_after_a_crash(folder, [rows])
        assert tmp_files(folder / "out") == [], "a failed write left its temporary file"
        assert not output_of(folder).exists() and not marker_of(folder).exists()

        again = cli(job)
    assert again.returncode == 0, again.stderr
    assert_exact(output_of(folder), rows)
