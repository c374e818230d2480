"""kill -9 across a fleet (issue 15): the crash harness of ``test_crash.py`` against three loopback
replicas, one of which dies for good partway through each job. Every run that gets through ends
with every row exactly once, its own output, in input order: 0 lost, 0 duplicated, 0 misplaced.

``BATCHRUN_FLEET_KILLS`` sets how many kills of batchrun the harness lands (12 by default).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from collections import Counter
from contextlib import ExitStack
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import (
    BATCHRUN,
    assert_exact,
    assert_final_files_readable,
    expected_output,
    output_of,
    prompt_rows,
    state_of,
    summary_of,
    tally,
    write_csv,
    write_job,
)
from endpoint import LiveEndpoint

from batchrun.server import ServerOptions

EXACT = {"lost": 0, "duplicated": 0, "misplaced": 0}
KILLS = int(os.environ.get("BATCHRUN_FLEET_KILLS", 12))
SEED = int(os.environ.get("BATCHRUN_KILL_SEED", 4))
ROWS, SEGMENT, INTERVAL_S, BATCH, CONCURRENCY, LATENCY_S = 3000, 64, 0.1, 8, 2, 0.02
# The start (counted from 1 within a job) during which one replica dies for good.
DIES_DURING_START = 2


def saved_answers_are_their_rows(folder: Path, rows: list[dict]) -> int:
    """Every answer saved under a final name is its own row's; returns how many there are."""
    saved = 0
    state = state_of(folder)
    for f in sorted(state.glob("segments/seg-*.parquet")) + sorted(state.glob("partial/seg-*.parquet")):
        for r in pq.read_table(f, columns=["row", "output", "error"]).to_pylist():
            if r["error"] is None:
                assert r["output"] == expected_output(rows[r["row"]]["prompt"]), (f.name, r["row"])
                saved += 1
    return saved


@pytest.mark.slow
@pytest.mark.timeout(max(120, KILLS * 15))
def test_kill_9_at_random_moments_across_three_replicas_one_dying_for_good_loses_duplicates_and_misplaces_nothing(
    tmp_path: Path,
) -> None:
    """Start the job against three replicas, SIGKILL batchrun after a random delay, check what is
    on disk, repeat. During the second start of each job one replica (the middle one) is killed
    for good: its requests in flight are dropped and every later connect is refused. When a run
    gets through (exit 0), its output is exact and the dead replica ends out of rotation; then a
    fresh job starts, until ``KILLS`` kills have landed and a last run has finished."""
    rng = random.Random(SEED)
    rows = prompt_rows(ROWS)
    landed = starts = jobs = 0
    totals: Counter[str] = Counter({"lost": 0, "duplicated": 0, "misplaced": 0})
    deaths = 0
    started = time.monotonic()
    while landed < KILLS:
        jobs += 1
        assert jobs <= KILLS + 10, "runs keep finishing before the kill; the job is too small"
        folder = tmp_path / f"job-{jobs}"
        folder.mkdir()
        write_csv(folder / "input.csv", rows)
        with ExitStack() as stack:
            eps = [stack.enter_context(LiveEndpoint(ServerOptions(latency_s=LATENCY_S))) for _ in range(3)]
            dying = eps[1]
            job = write_job(
                folder, [ep.url for ep in eps],
                run={"batch_size": BATCH, "concurrency": CONCURRENCY, "checkpoint_rows": SEGMENT,
                     "checkpoint_interval_s": INTERVAL_S, "max_retries": 5},
            )
            starts_here = 0
            while True:
                starts += 1
                starts_here += 1
                assert starts <= 4 * KILLS + 20, "the harness does not converge"
                finishing = landed >= KILLS  # enough kills: let this one finish
                dead_before_run = not dying.serving  # every connect to it is refused
                with open(folder / "run.log", "w") as log:
                    proc = subprocess.Popen([str(BATCHRUN), str(job)], cwd=folder, stdout=log, stderr=log)
                    try:
                        if starts_here == DIES_DURING_START and dying.serving:
                            # The replica dies while this run is (most likely) sending to it.
                            try:
                                proc.wait(timeout=rng.uniform(0.6, 1.2))
                            except subprocess.TimeoutExpired:
                                pass
                            dying.kill()
                            deaths += 1
                        proc.wait(timeout=120 if finishing else rng.uniform(0.2, 2.0))
                    except subprocess.TimeoutExpired:
                        proc.kill()  # still running: this kill lands (our own child, by its pid)
                        proc.wait()
                if proc.returncode == -signal.SIGKILL:
                    landed += 1
                    assert_final_files_readable(folder / "out")
                    saved_answers_are_their_rows(folder, rows)
                    if output_of(folder).exists():
                        assert tally(output_of(folder), rows) == EXACT
                    continue
                assert proc.returncode == 0, (folder / "run.log").read_text()
                break
            got = tally(output_of(folder), rows)
            totals.update(got)
            assert got == EXACT, got
            assert_exact(output_of(folder), rows)
            summary = summary_of(folder)
            # The replica checks need a run that sent something: a killed run may have answered
            # every row already, leaving this one only the output to write (or nothing to do).
            if summary["requests"]:
                replicas = summary["replicas"]
                assert [r["url"] for r in replicas] == [ep.url for ep in eps]
                if dead_before_run and replicas[1]["requests"]:
                    # Dead before the run that got through, which tried it: out of rotation at its end.
                    assert replicas[1]["in_rotation"] is False, replicas[1]
                    assert replicas[1]["answered"] == 0, replicas[1]
                    assert replicas[0]["in_rotation"] is True and replicas[2]["in_rotation"] is True, replicas
            prompts = Counter(p for ep in eps for p in ep.log.prompts_received)
            assert set(prompts) == {r["prompt"] for r in rows}
    print(
        f"\n{landed} kills landed, {deaths} replicas killed for good, {totals['lost']} lost, "
        f"{totals['duplicated']} duplicated, {totals['misplaced']} misplaced; {jobs} jobs of {ROWS} rows "
        f"over 3 replicas, {starts} starts, {time.monotonic() - started:.0f}s"
    )
    assert landed == KILLS
    assert deaths >= 1, "no replica died during a run"
    assert totals["lost"] == 0
    assert totals["duplicated"] == 0
    assert totals["misplaced"] == 0
    assert json.loads((folder / "out" / "result.parquet.SUCCESS").read_text())["rows"] == ROWS
