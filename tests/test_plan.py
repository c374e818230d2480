"""The plan as a typed record: what it reads back, what it refuses, and what a run does with a bad one."""

from __future__ import annotations

import json

import pytest
from conftest import MakeJob, cli

from batchrun.errors import StateError
from batchrun.plan import PLAN_VERSION, Plan, segment_sizes


def _doc(**over: object) -> dict[str, object]:
    doc: dict[str, object] = {
        "version": 2, "rows": 10, "segment_rows": 4, "settings": {"model": "m"}, "created_at": "t",
        "fingerprint": [{"path": "/x/in.csv", "size": 5, "mtime_ns": 1, "sha256": "ab"}],
    }
    doc.update(over)
    return doc


def test_round_trip_keeps_every_field_and_unknown_keys() -> None:
    plan = Plan.from_json(_doc(incremental={"reused": 3, "changed": 1, "new": 2}, later_key=[1]), "p")
    assert (plan.rows, plan.segment_rows, plan.version) == (10, 4, 2)
    assert plan.incremental == {"reused": 3, "changed": 1, "new": 2}
    assert plan.sizes() == {0: 4, 1: 4, 2: 2} and plan.segment_count == 3
    doc = plan.to_json()
    assert doc["later_key"] == [1]  # a rewrite (a refreshed mtime) keeps what a newer minor wrote
    assert Plan.from_json(doc, "p") == plan


def test_version_1_plans_still_read() -> None:
    doc = _doc(fingerprint=[{"path": "/x/in.csv", "size": 5, "sample_sha256": "ab"}])
    del doc["version"]
    assert Plan.from_json(doc, "p").version == 1


def test_newer_version_is_refused_with_the_remedy() -> None:
    with pytest.raises(StateError, match=rf"newer batchrun \(plan version {PLAN_VERSION + 1}\).*--restart"):
        Plan.from_json(_doc(version=PLAN_VERSION + 1), "p")


@pytest.mark.parametrize(
    ("over", "said"),
    [
        ({"rows": "10"}, "rows is '10'"),
        ({"rows": -1}, "rows is -1"),
        ({"segment_rows": 0}, "segment_rows is 0"),
        ({"segment_rows": True}, "segment_rows is True"),
        ({"fingerprint": {"a": 1}}, "fingerprint is not a list"),
        ({"settings": [1]}, "settings is not an object"),
        ({"version": "2"}, "version is not a positive integer"),
    ],
)
def test_malformed_plans_are_refused_naming_the_field(over: dict[str, object], said: str) -> None:
    with pytest.raises(StateError, match="plan.json") as err:
        Plan.from_json(_doc(**over), "state/plan.json")
    assert said in str(err.value)


def test_segment_sizes_cover_every_row_once() -> None:
    for rows in (1, 7, 8, 9, 100):
        sizes = segment_sizes(rows, 4)
        assert sum(sizes.values()) == rows and all(0 < n <= 4 for n in sizes.values())
        assert list(sizes) == list(range(len(sizes)))


def test_a_run_with_a_malformed_plan_stops_with_exit_2_and_sends_nothing(endpoint, make_job: MakeJob) -> None:
    job = make_job(8, url=endpoint.url)
    assert cli("run", str(job.path)).returncode == 0
    plan_path = job.state() / "plan.json"
    doc = json.loads(plan_path.read_text())
    doc["segment_rows"] = "many"
    plan_path.write_text(json.dumps(doc))
    endpoint.stats.reset()
    result = cli("run", str(job.path))
    assert result.returncode == 2, result.stderr
    assert "the plan is malformed (segment_rows is 'many')" in result.stderr
    assert endpoint.stats.requests == 0
    assert cli("run", str(job.path), "--restart").returncode == 0
