"""``batchrun tune`` (issue 15): the grid against the reference endpoint's capacity model, what it
sends and never writes, its output, and its exit codes; the stop and recommendation rules alone."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import MakeJob, cli, prompt_rows, write_job
from endpoint import LiveEndpoint

from batchrun.server import ServerOptions
from batchrun.tune import GridPoint, Stop, recommend, replica_urls, stop_reason


def tuned(job: Any, *args: object, timeout: float = 60) -> tuple[dict[str, Any], str]:
    """``batchrun tune JOB --json ARGS``: the JSON document (stdout holds nothing else), stderr."""
    done = cli("tune", job.path, "--json", *args, timeout=timeout)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout), done.stderr


def by_batch(doc: dict[str, Any]) -> dict[int, list[dict[str, Any]]]:
    out: dict[int, list[dict[str, Any]]] = {}
    for p in doc["points"]:
        out.setdefault(p["batch_size"], []).append(p)
    return out


def test_the_recommendation_fills_the_servers_capacity_and_each_climb_ends_at_its_first_errors(
    make_job: MakeJob,
) -> None:
    """32 prompt slots and a queue of 8: the best clean setting keeps 16-40 prompts in flight, and
    the server sheds only the request or few that first went past its queue, once per batch size."""
    # 100 ms a request: long beside the pauses of a busy host, which would otherwise blur the steps.
    options = ServerOptions(latency_s=0.1, capacity_prompts=32, queue_prompts=8, tally_prompts=True)
    with LiveEndpoint(options) as ep:
        job = make_job(60, url=ep.url)
        doc, _ = tuned(job, "--sample", "16", "--max-batch", "4")
        shed = ep.stats.shed
    rec = doc["recommended"]
    assert rec is not None, doc
    assert 16 <= rec["batch_size"] * rec["concurrency"] <= 40, doc
    assert rec["in_flight_prompts"] == rec["batch_size"] * rec["concurrency"]
    climbs = by_batch(doc)
    assert set(climbs) <= {1, 2, 4}
    for points in climbs.values():
        assert [p["concurrency"] for p in points] == [2**i for i in range(len(points))], points
        # Nothing is tried past a point with errors, and only the last point of a climb stops it.
        assert all(p["stop"] is None and p["errors"] == 0 for p in points[:-1]), points
        assert points[-1]["stop"] is not None, points
        # No setting past the queue ran clean: the server sheds there.
        assert all(p["errors"] for p in points if p["in_flight_prompts"] > 40), points
    ended_in_errors = sum(1 for points in climbs.values() if points[-1]["stop"] == "errors")
    failed = sum(p["errors"] for p in doc["points"])
    assert failed == shed  # every shed request was counted, and nothing else failed
    # A request or a few past the queue, never a wave: starting 64 at once would shed 24.
    assert ended_in_errors >= 1
    assert all(p["errors"] <= 12 for p in doc["points"]), doc
    assert rec["concurrency"] == min(
        p["concurrency"] for p in doc["points"]
        if not p["errors"] and p["stop"] != "latency" and p["prompts_per_s"] >= 0.95 * max(
            q["prompts_per_s"] for q in doc["points"] if not q["errors"] and q["stop"] != "latency"
        )
    )


def test_tune_writes_neither_output_nor_progress_and_sends_only_the_sample(make_job: MakeJob) -> None:
    """--sample 5 over 100 rows whose first rows have empty prompts: the server sees exactly the
    first five prompts a run would send, and no output or state folder appears."""
    rows = prompt_rows(100)
    rows[0]["prompt"] = ""
    rows[2]["prompt"] = "   "
    with LiveEndpoint(ServerOptions(latency_s=0.01, tally_prompts=True)) as ep:
        job = make_job(rows, url=ep.url)
        doc, _ = tuned(job, "--sample", "5", "--max-batch", "2", "--max-concurrency", "2")
        seen = set(ep.stats.prompts_seen)
    sent = [r["prompt"] for r in rows if r["prompt"].strip()][:5]
    assert seen == set(sent)
    assert doc["sample_prompts"] == 5
    assert not job.output().exists()
    assert not job.state().exists()
    assert not job.output().parent.exists()


def test_the_table_prints_every_point_a_recommendation_and_a_snippet_to_paste(make_job: MakeJob) -> None:
    """Every point climbed in order, one line each; the recommendation names one of them and the
    snippet under it is that setting, ready to paste; progress lines go to stderr."""
    with LiveEndpoint(ServerOptions(latency_s=0.05)) as ep:
        job = make_job(20, url=ep.url)
        done = cli("tune", job.path, "--sample", "16", "--max-batch", "2", "--max-concurrency", "4")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith(f"tune: {job.path} against {ep.url}, 16 sample prompts, ")
    assert lines[1].split() == ["batch", "concurrency", "prompts/s", "p50", "s", "p95", "s", "requests", "errors", "stop"]
    end = next(i for i, line in enumerate(lines) if line.startswith("stopped: "))
    rows = [line.split() for line in lines[2:end]]
    grid = [(int(r[0]), int(r[1])) for r in rows]
    assert grid[0] == (1, 1) and (2, 1) in grid
    for b in (1, 2):
        climb = [c for bb, c in grid if bb == b]
        assert climb == [1, 2, 4][: len(climb)]
    recommended = re.fullmatch(
        r"recommended: batch_size (\d+), concurrency (\d+) \(([\d.]+) prompts/s, (\d+) prompts in flight\)",
        lines[end + 1],
    )
    assert recommended is not None, lines[end + 1]
    b, c, rate, in_flight = (float(x) for x in recommended.groups())
    assert in_flight == b * c
    assert [float(x) for x in rows[grid.index((int(b), int(c)))][2:3]] == [rate]
    assert lines[end + 2 : end + 6] == ["", "[run]", f"batch_size = {int(b)}", f"concurrency = {int(c)}"]
    assert 'concurrency = "auto"' in lines[-1]
    assert "tune: batch 1, concurrency 1:" in done.stderr  # a line per point on stderr as it goes


def test_a_batch_size_failing_at_concurrency_one_ends_the_tune(make_job: MakeJob) -> None:
    """One prompt slot, no queue: a batch of 2 is shed even alone, so no larger batch is tried and
    that one request is the only one the server shed at batch 2."""
    with LiveEndpoint(ServerOptions(latency_s=0.02, capacity_prompts=1, queue_prompts=0)) as ep:
        job = make_job(30, url=ep.url)
        doc, _ = tuned(job, "--sample", "16", "--max-batch", "8", "--max-concurrency", "8")
        sizes = dict(ep.stats.batch_sizes)
        shed = ep.stats.shed
    assert doc["stopped"] == "batch size 2 failed at concurrency 1; larger batches were not tried"
    last = doc["points"][-1]
    assert (last["batch_size"], last["concurrency"], last["stop"]) == (2, 1, "errors")
    assert last["errors_by_class"] == {"http_503": 1}
    assert set(sizes) == {1}  # nothing larger was ever served
    assert shed == 2  # one at batch 1 (concurrency 2), one at batch 2
    assert doc["recommended"] == {"batch_size": 1, "concurrency": 1, "in_flight_prompts": 1,
                                  "prompts_per_s": doc["points"][0]["prompts_per_s"]}


def test_openai_completions_is_tuned_through_its_own_route(make_job: MakeJob) -> None:
    with LiveEndpoint(ServerOptions(latency_s=0.01)) as ep:
        job = make_job(20, url=ep.openai_base, endpoint={"protocol": "openai-completions", "model": "toy"})
        doc, _ = tuned(job, "--sample", "8", "--max-batch", "4", "--max-concurrency", "2")
        paths = {a.path for a in ep.log.arrivals}
        sizes = set(ep.stats.batch_sizes)
    assert paths == {"/v1/completions"}
    assert sizes == {1, 2, 4}
    assert doc["protocol"] == "openai-completions"
    assert doc["recommended"] is not None


def test_openai_chat_is_tuned_at_batch_size_one_only(make_job: MakeJob) -> None:
    with LiveEndpoint(ServerOptions(latency_s=0.01)) as ep:
        job = make_job(
            20, url=ep.openai_base, endpoint={"protocol": "openai-chat", "model": "toy"}, run={"batch_size": 1},
        )
        doc, _ = tuned(job, "--sample", "8", "--max-batch", "8", "--max-concurrency", "2")
        paths = {a.path for a in ep.log.arrivals}
    assert paths == {"/v1/chat/completions"}
    assert {p["batch_size"] for p in doc["points"]} == {1}


def test_the_builtin_endpoint_is_started_for_the_tune(make_job: MakeJob) -> None:
    job = make_job(10, url="builtin")
    doc, _ = tuned(job, "--sample", "4", "--max-batch", "2", "--max-concurrency", "2")
    assert doc["endpoint"].startswith("builtin (http://127.0.0.1:")
    assert doc["recommended"] is not None
    assert not job.state().exists()


def test_the_time_budget_ends_the_tune_with_what_it_measured(make_job: MakeJob) -> None:
    with LiveEndpoint(ServerOptions(latency_s=0.05)) as ep:
        job = make_job(50, url=ep.url)
        doc, _ = tuned(job, "--sample", "50", "--point-s", "0.3", "--budget-s", "1")
    assert doc["stopped"] == "the time budget (1s) ran out"
    assert doc["duration_s"] < 2.5
    assert doc["points"][-1]["stop"] == "budget"
    assert doc["recommended"] is not None


def test_a_closed_port_exits_4_saying_it_cannot_connect(make_job: MakeJob) -> None:
    with LiveEndpoint() as gone:
        dead = gone.url
    job = make_job(10, url=dead)
    done = cli("tune", job.path, "--sample", "4")
    assert done.returncode == 4
    assert done.stdout == ""
    assert done.stderr.startswith(
        "batchrun: error: the endpoint did not answer the first request (batch_size 1, concurrency 1) "
        f"at {dead}: connection: ClientConnectorError: "
    )


def test_an_endpoint_failing_the_first_request_exits_4_after_that_one_request(make_job: MakeJob) -> None:
    with LiveEndpoint(rule=lambda n, prompts: "503") as ep:
        job = make_job(10, url=ep.url)
        done = cli("tune", job.path, "--sample", "4")
        sent = ep.log.requests
    assert done.returncode == 4
    assert "did not answer the first request (batch_size 1, concurrency 1)" in done.stderr
    assert "http_503: HTTP 503" in done.stderr
    assert sent == 1


def test_no_clean_setting_exits_4_after_printing_what_was_measured(make_job: MakeJob) -> None:
    """Every request after the first fails: the tune stops at the first failure (two requests in
    all), prints its one point, recommends nothing and exits 4."""
    with LiveEndpoint(rule=lambda n, prompts: "503" if n >= 2 else None) as ep:
        job = make_job(10, url=ep.url)
        done = cli("tune", job.path, "--json", "--sample", "4")
        sent = ep.log.requests
    assert done.returncode == 4
    doc = json.loads(done.stdout)
    assert doc["recommended"] is None
    assert [(p["batch_size"], p["concurrency"], p["errors_by_class"], p["stop"]) for p in doc["points"]] == [
        (1, 1, {"http_503": 1}, "errors")
    ]
    assert doc["stopped"] == "batch size 1 failed at concurrency 1; larger batches were not tried"
    assert done.stderr.endswith(
        "batchrun: error: no setting ran without errors, so none is recommended; is the endpoint overloaded?\n"
    )
    assert sent == 2


def test_a_template_over_parquet_input_sends_the_rendered_prompts(tmp_path: Path) -> None:
    """The prompts are built as a run builds them: the template over each row, read from Parquet
    only as far as the sample reaches."""
    rows = prompt_rows(5000)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "input.parquet", row_group_size=1000)
    with LiveEndpoint(ServerOptions(tally_prompts=True)) as ep:
        job = write_job(tmp_path, ep.url, input_path="input.parquet",
                        input={"prompt_column": None, "template": "Tell me about {topic}."})
        done = cli("tune", job, "--json", "--sample", "6", "--max-batch", "2", "--max-concurrency", "2")
        seen = set(ep.stats.prompts_seen)
    assert done.returncode == 0, done.stderr
    assert seen == {f"Tell me about topic {i}." for i in range(6)}


def test_a_refused_key_exits_4_saying_so(make_job: MakeJob) -> None:
    with LiveEndpoint(api_keys={"right"}) as ep:
        job = make_job(10, url=ep.url, endpoint={"api_key_env": "TUNE_KEY"})
        done = cli("tune", job.path, "--sample", "4", env={"TUNE_KEY": "wrong"})
        sent = ep.log.requests
    assert done.returncode == 4
    assert done.stderr.startswith("batchrun: error: the endpoint refused the credentials (HTTP 401): check the API key")
    assert "wrong" not in done.stderr
    assert sent == 1


def test_the_jobs_rate_limit_holds_during_the_tune(make_job: MakeJob) -> None:
    """600 requests a minute is 10 a second whatever the concurrency: the climb finds no gain."""
    with LiveEndpoint(ServerOptions(latency_s=0.01)) as ep:
        job = make_job(20, url=ep.url, run={"requests_per_minute": 600})
        doc, _ = tuned(job, "--sample", "4", "--max-batch", "1", "--max-concurrency", "8", "--point-s", "1")
        arrivals = [a.at for a in ep.log.arrivals]
    rates = [p["prompts_per_s"] for p in doc["points"]]
    assert all(r < 13 for r in rates), doc
    assert doc["points"][-1]["stop"] == "flat"
    span = arrivals[-1] - arrivals[0]
    assert len(arrivals) <= 10 * span + 2


def test_an_invalid_job_exits_2_and_sends_nothing(make_job: MakeJob) -> None:
    with LiveEndpoint() as ep:
        job = make_job(10, url=ep.url, input={"prompt_column": "promt"})
        done = cli("tune", job.path)
        sent = ep.log.requests
    assert done.returncode == 2
    assert done.stderr == (
        f"batchrun: error: {job.path}: input.prompt_column: column 'promt' is not in the input "
        "(columns: id, topic, prompt); did you mean 'prompt'?\n"
    )
    assert sent == 0


def test_replica_chooses_which_of_the_jobs_urls_is_tuned(make_job: MakeJob) -> None:
    with LiveEndpoint() as first, LiveEndpoint() as second:
        job = make_job(10, url=[first.url, second.url])
        doc, _ = tuned(job, "--replica", "2", "--sample", "4", "--max-batch", "2", "--max-concurrency", "2")
        counts = (first.log.requests, second.log.requests)
        done = cli("tune", job.path, "--replica", "3")
    assert doc["endpoint"] == second.url
    assert counts[0] == 0 and counts[1] > 0
    assert done.returncode == 2
    assert done.stderr == f"batchrun: error: {job.path}: --replica 3: endpoint.api_base names 2 URLs\n"


def test_a_replica_the_job_does_not_name_exits_2(make_job: MakeJob) -> None:
    with LiveEndpoint() as ep:
        job = make_job(10, url=ep.url)
        done = cli("tune", job.path, "--replica", "2")
        sent = ep.log.requests
    assert done.returncode == 2
    assert done.stderr == f"batchrun: error: {job.path}: --replica 2: endpoint.api_base names 1 URL\n"
    assert sent == 0


# --- the rules alone ---------------------------------------------------------------------------


def point(b: int, c: int, rate: float, p50: float = 0.1, errors: dict[str, int] | None = None,
          stop: Stop | None = None) -> GridPoint:
    return GridPoint(b, c, rate, p50, 2 * p50, 10, errors or {}, 0, stop)


@pytest.mark.parametrize(
    ("now", "before", "lowest", "why"),
    [
        (point(1, 4, 400), point(1, 2, 200), 0.1, None),
        (point(1, 4, 209), point(1, 2, 200), 0.1, Stop.FLAT),  # under 5% more
        (point(1, 4, 211), point(1, 2, 200), 0.1, None),
        (point(1, 4, 400, errors={"http_503": 1}), point(1, 2, 200), 0.1, Stop.ERRORS),
        (point(1, 4, 400, p50=0.31), point(1, 2, 200), 0.1, Stop.LATENCY),  # over 3x the lowest p50
        (point(1, 4, 400, p50=0.29), point(1, 2, 200), 0.1, None),
        (point(1, 1, 100), None, 0.1, None),
    ],
)
def test_a_climb_stops_at_errors_a_flat_step_or_a_latency_blow_up(
    now: GridPoint, before: GridPoint | None, lowest: float, why: Stop | None
) -> None:
    assert stop_reason(now, before, lowest) == why


def test_the_recommendation_is_the_gentlest_point_within_5_percent_of_the_fastest_clean_one() -> None:
    points = [
        point(1, 32, 1000),
        point(1, 64, 2000, errors={"http_503": 2}, stop=Stop.ERRORS),  # fastest, but failed
        point(4, 8, 960),  # within 5% of 1000, gentler
        point(8, 4, 940),  # more than 5% below
        point(16, 4, 3000, p50=9.0, stop=Stop.LATENCY),  # queueing: never recommended
    ]
    assert recommend(points) == points[2]
    assert recommend([points[1]]) is None


def test_the_endpoint_may_name_one_url_or_a_list_of_replicas() -> None:
    assert replica_urls("http://a/inference") == ("http://a/inference",)
    assert replica_urls(["http://a/v1", "http://b/v1"]) == ("http://a/v1", "http://b/v1")
