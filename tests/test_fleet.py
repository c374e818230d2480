"""A fleet of replicas (issue 15, ``endpoint.api_base`` as a list): loopback replicas of different
capacities, one killed mid-run and restarted on its port, all of them down, one shedding with 503,
one answering garbage; every time the output is exact and the summary tells each replica's story.

Replicas are ``LiveEndpoint``s (the reference app's capacity model, real sockets on 127.0.0.1);
runs are CLI processes, so what a replica saw is counted inside it.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pytest
from conftest import BATCHRUN, MakeJob, assert_exact, cli, prompt_rows, tally, wait_for
from endpoint import LiveEndpoint, Rule

from batchrun.server import ServerOptions

EXACT = {"lost": 0, "duplicated": 0, "misplaced": 0}
REPLICA_KEYS = {
    "url", "requests", "prompts", "answered", "failures_by_class", "latency_p50_s", "latency_p95_s",
    "out_of_rotation_s", "times_taken_out", "in_rotation", "concurrency_limit",
}


@contextmanager
def fleet(*options: ServerOptions, rules: dict[int, Rule] | None = None) -> Iterator[list[LiveEndpoint]]:
    """One live replica per ``options``, replica ``i`` faulted by ``rules[i]`` when given."""
    with ExitStack() as stack:
        yield [stack.enter_context(LiveEndpoint(o, rule=(rules or {}).get(i))) for i, o in enumerate(options)]


def urls(eps: list[LiveEndpoint]) -> list[str]:
    return [ep.url for ep in eps]


def replicas_of(summary: dict[str, Any], eps: list[LiveEndpoint]) -> list[dict[str, Any]]:
    """The summary's ``replicas``, checked for shape: one entry per api_base, in order."""
    replicas: list[dict[str, Any]] = summary["replicas"]
    assert [r["url"] for r in replicas] == urls(eps)
    for r in replicas:
        assert set(r) >= REPLICA_KEYS, sorted(REPLICA_KEYS - set(r))
    return replicas


def after(ep: LiveEndpoint, moment: float | None) -> int:
    """Requests that reached ``ep`` after ``moment`` (``time.monotonic``)."""
    assert moment is not None
    return sum(1 for a in ep.log.arrivals if a.at > moment)


def prompts_seen(eps: list[LiveEndpoint]) -> int:
    return sum(len(ep.log.prompts_received) for ep in eps)


class Run:
    """``batchrun JOB`` in a process of its own while the test acts on the replicas."""

    def __init__(self, job: Path):
        self.folder = job.parent
        self.out = open(self.folder / "run.out", "w+")  # closed by finish()
        self.err = open(self.folder / "run.err", "w+")
        self.proc = subprocess.Popen([str(BATCHRUN), str(job)], cwd=self.folder, stdout=self.out, stderr=self.err)

    def running(self) -> bool:
        return self.proc.poll() is None

    def finish(self, timeout: float = 60) -> tuple[int, str, str]:
        try:
            self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self.out.close()
            self.err.close()
        return (self.proc.returncode, (self.folder / "run.out").read_text(), (self.folder / "run.err").read_text())


# --- 1. a replica lost mid-run and brought back ---------------------------------------------------


def test_a_replica_killed_mid_run_is_taken_out_its_work_lands_elsewhere_and_it_is_used_again_once_restarted(
    make_job: MakeJob,
) -> None:
    """Three replicas of capacities 1:2:4 (8/16/32 prompt slots, same latency, queueing rather than
    shedding). The middle one is killed (listener closed, connections dropped) after some rows
    are done, and restarted on its port once the run has carried on without it; while it is
    down the others are slowed, so the run is still going when a probe finds it back. The run
    ends 0, exact; the killed replica's summary shows its connection failures, that it was
    taken out, and that it was used again; the fastest replica served more than the slowest."""
    rows = prompt_rows(1200)
    # 50 ms at capacity: slow enough that the capacity model, not the CPU of a busy test machine,
    # sets each replica's pace (0.2 / 0.1 / 0.05 s a request at 32 prompts in flight).
    options = [ServerOptions(latency_s=0.05, capacity_prompts=cap, queue_prompts=10_000) for cap in (8, 16, 32)]
    with fleet(*options) as eps:
        slow, killed, fast = eps
        job = make_job(rows, url=urls(eps), run={"batch_size": 8, "concurrency": 4, "max_retries": 5})
        run = Run(job.path)
        wait_for(lambda: prompts_seen(eps) >= 300 or not run.running(), "300 prompts sent")
        assert run.running(), "the run ended before the replica could be killed; make the job bigger"
        killed.kill()
        slow.delay_s = fast.delay_s = 0.5
        # The run carries on without it: more requests reach the others after the kill.
        wait_for(lambda: after(slow, killed.killed_at) + after(fast, killed.killed_at) >= 4, "the others in use")
        killed.restart()
        wait_for(lambda: after(killed, killed.restarted_at) >= 1 or not run.running(), "a probe of the restarted replica")
        slow.delay_s = fast.delay_s = 0.0
        code, out, err = run.finish()
        back = after(killed, killed.restarted_at)
    assert code == 0, err
    assert tally(job.output(), rows) == EXACT
    assert_exact(job.output(), rows)
    s, k, f = replicas_of(job.summary(), eps)
    print(f"\nslow {s}\nkilled {k}\nfast {f}")
    assert k["failures_by_class"].get("connection", 0) >= 1, k
    assert k["times_taken_out"] >= 1 and k["out_of_rotation_s"] > 0, k
    assert back >= 1, "the restarted replica got no request"
    assert k["in_rotation"] is True, k
    assert k["answered"] >= 1, k
    assert f["prompts"] > s["prompts"], (f["prompts"], s["prompts"])
    assert f["latency_p50_s"] < s["latency_p50_s"], (f["latency_p50_s"], s["latency_p50_s"])
    assert s["times_taken_out"] == f["times_taken_out"] == 0
    # The summary line names the replicas.
    assert all(f":{ep.port}" in out for ep in eps), out


# --- 2. every replica down --------------------------------------------------------------------------


def test_every_replica_down_is_an_outage_exit_4_with_progress_kept_and_the_same_command_finishes_once_they_are_back(
    make_job: MakeJob,
) -> None:
    rows = prompt_rows(600)
    with fleet(*[ServerOptions(latency_s=0.02)] * 3) as eps:
        job = make_job(rows, url=urls(eps), run={"batch_size": 4, "concurrency": 2, "checkpoint_rows": 32,
                                                 "checkpoint_interval_s": 0.05})
        run = Run(job.path)
        wait_for(lambda: prompts_seen(eps) >= 150 or not run.running(), "150 prompts sent")
        assert run.running(), "the run ended before the replicas could be killed; make the job bigger"
        for ep in eps:
            ep.kill()
        code, out, err = run.finish()
        said = out + err
        written = job.output().exists()
        summary = job.summary()
        status = json.loads(cli("status", job.path, "--json").stdout)
        for ep in eps:
            ep.restart()
        mark = prompts_seen(eps)
        again = cli(job.path)
        resent = prompts_seen(eps) - mark
    assert code == 4, said
    assert not written, "an outage wrote the output"
    assert summary["exit_code"] == 4
    assert summary["succeeded"] > 0 and status["succeeded"] > 0, "no progress kept"
    # The same command, once they are back, finishes exact without starting over.
    assert again.returncode == 0, again.stderr
    assert_exact(job.output(), rows)
    assert tally(job.output(), rows) == EXACT
    assert resent < len(rows), "the rerun sent everything again: nothing was kept"
    assert all(r["in_rotation"] for r in replicas_of(job.summary(), eps))
    # What stopped the run is said as such: every replica out, not one endpoint unreachable.
    [error] = [line for line in err.splitlines() if line.startswith("batchrun: error:")]
    assert "out of rotation" in error or all(f":{ep.port}" in error for ep in eps), error
    for r in replicas_of(summary, eps):
        assert r["failures_by_class"].get("connection", 0) >= 1, r
        assert r["in_rotation"] is False and r["times_taken_out"] >= 1, r


# --- 3. a replica that sheds everything -------------------------------------------------------------


def test_a_replica_answering_503_is_cut_and_paused_alone_and_the_others_finish_the_run(make_job: MakeJob) -> None:
    """One replica answers 503 to everything: its own limit is cut (auto) and it ends below the
    healthy ones'; its 503s are counted for it, never stop the run, and no row lands from it."""
    rows = prompt_rows(600)
    # 0.1 s a request: a busy machine's jitter stays well within the latency guard's 50%, so the
    # healthy replicas' limits are not cut by noise.
    with fleet(*[ServerOptions(latency_s=0.1)] * 3, rules={0: lambda n, p: "503"}) as eps:
        job = make_job(rows, url=urls(eps), run={"batch_size": 4, "concurrency": "auto", "max_concurrency": 16})
        result = cli(job.path)
    assert result.returncode == 0, result.stderr
    assert_exact(job.output(), rows)
    shedding, *healthy = replicas_of(job.summary(), eps)
    print(f"\nshedding {shedding}\nhealthy {healthy}")
    assert shedding["failures_by_class"].get("http_503", 0) >= 1, shedding
    assert shedding["answered"] == 0, shedding
    assert eps[0].log.faults.get("503", 0) == eps[0].log.requests >= 1
    for h in healthy:
        assert h["failures_by_class"] == {} or sum(h["failures_by_class"].values()) == 0, h
        assert h["answered"] >= 1 and h["in_rotation"] is True
        assert shedding["concurrency_limit"] < h["concurrency_limit"], (shedding, h)


# --- 4. a replica answering garbage ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "cause"),
    [("every_alter", "invalid_response"), ("invalid_json", "invalid_response"), ("hang", "timeout"), ("500", "http_500")],
)
def test_a_replica_that_never_answers_validly_is_taken_out_and_no_wrong_output_lands_on_any_row(
    make_job: MakeJob, kind: str, cause: str
) -> None:
    """One replica of three answers every request with ``kind``: answers of which nothing
    validates and timeouts take it out after 3 in a row, 5xx after ``outage_after_failures``
    (20); its rows are answered by the others, exactly, and the run ends 0 (no row fails for a
    replica's fault). The run lasts about a second, several timeouts of 0.3 s."""
    rows = prompt_rows(400)
    with fleet(*[ServerOptions(latency_s=0.05)] * 3, rules={1: lambda n, p: kind}) as eps:
        job = make_job(rows, url=urls(eps), endpoint={"timeout_s": 0.3}, run={"batch_size": 4, "concurrency": 2})
        result = cli(job.path)
    assert result.returncode == 0, result.stderr
    assert tally(job.output(), rows) == EXACT
    assert_exact(job.output(), rows)
    good, bad, other = replicas_of(job.summary(), eps)
    print(f"\n{kind}: {bad}")
    assert bad["times_taken_out"] >= 1, bad
    assert bad["failures_by_class"].get(cause, 0) >= 1, bad
    assert bad["answered"] == 0 and bad["latency_p50_s"] is None and bad["latency_p95_s"] is None, bad
    assert bad["in_rotation"] is False, bad
    assert eps[1].log.requests == bad["requests"] >= 1
    assert good["answered"] + other["answered"] >= len(rows) // 4
    assert good["in_rotation"] and other["in_rotation"]


# --- 5. the figures per replica ----------------------------------------------------------------------


def test_per_replica_figures_add_up_to_the_run_s_and_match_what_each_replica_saw(make_job: MakeJob) -> None:
    rows = prompt_rows(500)
    latencies = (0.01, 0.02, 0.04)
    with fleet(*[ServerOptions(latency_s=s) for s in latencies]) as eps:
        job = make_job(rows, url=urls(eps), run={"batch_size": 4, "concurrency": 2})
        result = cli(job.path)
        status = json.loads(cli("status", job.path, "--json").stdout)
        seen = [(ep.log.requests, len(ep.log.prompts_received)) for ep in eps]
    assert result.returncode == 0, result.stderr
    assert_exact(job.output(), rows)
    summary = job.summary()
    replicas = replicas_of(summary, eps)
    assert sum(r["requests"] for r in replicas) == summary["requests"]
    assert sum(r["prompts"] for r in replicas) == summary["prompts_sent"]
    assert [(r["requests"], r["prompts"]) for r in replicas] == seen
    for r, latency in zip(replicas, latencies, strict=True):
        assert r["answered"] == r["requests"] >= 1, r
        assert 0.95 * latency <= r["latency_p50_s"] <= r["latency_p95_s"], r  # a histogram: within 5%
        assert r["failures_by_class"] == {} or sum(r["failures_by_class"].values()) == 0, r
        assert r["times_taken_out"] == 0 and r["out_of_rotation_s"] == 0 and r["in_rotation"] is True, r
        assert r["concurrency_limit"] == 2, r
    assert status["last_run"]["replicas"] == replicas
    assert [r["url"] for r in status["replicas"]] == urls(eps)
    assert all(f":{ep.port}" in result.stdout for ep in eps), result.stdout


def test_one_api_base_string_reports_a_list_of_one_replica(make_job: MakeJob) -> None:
    rows = prompt_rows(40)
    with LiveEndpoint() as ep:
        job = make_job(rows, url=ep.url)
        result = cli(job.path)
        status = json.loads(cli("status", job.path, "--json").stdout)
    assert result.returncode == 0, result.stderr
    summary = job.summary()
    [replica] = replicas_of(summary, [ep])
    assert (replica["requests"], replica["prompts"]) == (summary["requests"], summary["prompts_sent"]) == (10, 40)
    assert replica["answered"] == 10 and replica["in_rotation"] is True
    assert [r["url"] for r in status["replicas"]] == [ep.url]


def test_a_run_with_nothing_to_do_still_lists_every_replica(make_job: MakeJob) -> None:
    """The summary has one entry per api_base whatever the run did; a rerun of a finished job
    (nothing sent) lists them with nothing counted, rather than an empty list."""
    with fleet(ServerOptions(), ServerOptions()) as eps:
        job = make_job(20, url=urls(eps))
        assert cli(job.path).returncode == 0
        again = cli(job.path)
        status = json.loads(cli("status", job.path, "--json").stdout)
    assert again.returncode == 0 and "nothing to do" in again.stdout, again.stdout
    for r in replicas_of(job.summary(), eps):
        assert (r["requests"], r["prompts"], r["answered"], r["times_taken_out"]) == (0, 0, 0, 0), r
    assert [r["url"] for r in status["replicas"]] == urls(eps)


@pytest.mark.parametrize("max_retries", [0, 1])
def test_a_replica_dead_from_the_start_never_stops_a_run_the_others_can_finish_whatever_max_retries(
    make_job: MakeJob, max_retries: int
) -> None:
    """One replica of three is down before the run starts and stays down. Its refused connects
    (the first one, and every probe after it, each of which carries real rows) are retried on
    the others: they never end the run as an outage, nor use up a row's attempts, even with
    ``max_retries`` 0. The run lasts long enough for probes to be sent."""
    rows = prompt_rows(800)
    with fleet(*[ServerOptions(latency_s=0.05)] * 3) as eps:
        eps[1].kill()
        job = make_job(rows, url=urls(eps), run={"batch_size": 4, "concurrency": 2, "max_retries": max_retries})
        result = cli(job.path)
    assert result.returncode == 0, result.stderr
    assert_exact(job.output(), rows)
    up, dead, other = replicas_of(job.summary(), eps)
    print(f"\nmax_retries {max_retries}: {dead}")
    assert dead["failures_by_class"].get("connection", 0) >= 2, "no probe was sent: make the run longer"
    assert dead["answered"] == 0 and dead["in_rotation"] is False and dead["times_taken_out"] >= 1, dead
    assert up["in_rotation"] is True and other["in_rotation"] is True
