"""Units below the end-to-end runs, for what only whole runs covered: the client's halving of a
refused batch (against a real loopback endpoint), the sink joining committed segments into the
output, incremental carry-forward by id, and the run directory (segments, locks, partials,
journals). Real small files in ``tmp_path``; nothing is mocked."""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import subprocess
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import PARAMS, expected_output, prompt_rows, write_csv, write_job
from endpoint import LiveEndpoint, shared_faults

from batchrun.checkpoint import RESULT_SCHEMA, DamagedStateError, RunState, SegmentInfo
from batchrun.client import REJECTED, EndpointClient, RowOutcome, make_session
from batchrun.config import JobSpec
from batchrun.errors import BusyError, StateError
from batchrun.incremental import carry_forward
from batchrun.inputcheck import open_job
from batchrun.plan import Plan
from batchrun.prompts import prompt_hash
from batchrun.protocol import CustomCodec
from batchrun.retry import RetryPolicy
from batchrun.sink import write_output

# --- halving a refused batch -----------------------------------------------------------------------


def process(url: str, prompts: list[str]) -> tuple[list[RowOutcome | None], EndpointClient]:
    """One ``EndpointClient.process`` call over a real session, as the engine makes it."""

    async def main() -> tuple[list[RowOutcome | None], EndpointClient]:
        async with make_session(1, 10) as session:
            client = EndpointClient(
                session, url, CustomCodec("test-model", dict(PARAMS)), RetryPolicy(max_retries=3, base_s=0.0, cap_s=0.0)
            )
            return await client.process(prompts), client

    return asyncio.run(main())


def test_a_batch_refused_400_is_halved_until_the_poisoned_prompt_fails_alone_as_rejected() -> None:
    prompts = [r["prompt"] for r in prompt_rows(8)]
    poison = prompts[5]
    with LiveEndpoint(rule=shared_faults(0.0, [], seed=0, always_reject=[poison])) as ep:
        outcomes, client = process(ep.url, prompts)
        sizes = [a.prompts for a in ep.log.arrivals]
    # Depth first: 8 refused; 0-3 answered; 4-7 refused; 4-5 refused; 4 answered; 5 refused alone;
    # 6-7 answered.
    assert sizes == [8, 4, 4, 2, 1, 1, 2]
    for i, (prompt, got) in enumerate(zip(prompts, outcomes)):
        assert got is not None, i
        if i == 5:
            assert got.answer is None and got.error_class == REJECTED
            assert re.fullmatch(r"rejected: HTTP 400: .*", got.error or ""), got.error
            assert got.attempts == 4  # in every request of the halving down to itself
        else:
            assert got.error is None and got.answer is not None, (i, got)
            assert got.answer.output == expected_output(prompt)
    assert [o.attempts for o in outcomes if o is not None] == [2, 2, 2, 2, 4, 4, 3, 3]
    assert client.accounting.retries == {}  # halving is not retrying: no backoff was paid


def test_two_poisoned_prompts_in_different_halves_each_fail_alone_and_nothing_else_does() -> None:
    prompts = [r["prompt"] for r in prompt_rows(6)]
    poison = {prompts[0], prompts[4]}
    with LiveEndpoint(rule=shared_faults(0.0, [], seed=0, always_reject=poison, reject_status=422)) as ep:
        outcomes, _ = process(ep.url, prompts)
        # Every prompt but the poison reached an answered request exactly once.
        answered = [p for a, p in _prompts_of(ep) if a.fault is None for p in p]
    assert sorted(answered) == sorted(p for p in prompts if p not in poison)
    failed = {prompts[i] for i, o in enumerate(outcomes) if o is not None and o.error is not None}
    assert failed == poison
    assert all(o is not None and (o.error_class == REJECTED) == (o.error is not None) for o in outcomes)
    assert all(o is not None and o.error is not None and "HTTP 422" in o.error for p, o in zip(prompts, outcomes) if p in poison)


def _prompts_of(ep: LiveEndpoint) -> list[tuple[Any, list[str]]]:
    """Each arrival with the prompts it carried (the log keeps prompts in arrival order)."""
    out, at = [], 0
    for a in ep.log.arrivals:
        out.append((a, ep.log.prompts_received[at : at + a.prompts]))
        at += a.prompts
    return out


# --- results tables and run state built by hand ------------------------------------------------------


def results(spec: JobSpec, rows: list[dict[str, Any]], start: int, stop: int, **errors: str) -> pa.Table:
    """The results a run would commit for input rows ``[start, stop)``: the reference model's
    answer for each, or the error given for its id."""
    part = rows[start:stop]
    return pa.table(
        {
            "row": list(range(start, stop)),
            "prompt_hash": [prompt_hash(r["prompt"]) for r in part],
            "id": [r["id"] for r in part],
            "output": [None if r["id"] in errors else expected_output(r["prompt"]) for r in part],
            "params": [None if r["id"] in errors else json.dumps({"max_tokens": 6, "temperature": 0.5}) for r in part],
            "error": [errors.get(r["id"]) for r in part],
            "attempts": [1] * len(part),
            "latency_s": [0.25] * len(part),
            "finish_reason": [None] * len(part),
            "prompt_tokens": [None] * len(part),
            "completion_tokens": [None] * len(part),
        },
        schema=RESULT_SCHEMA,
    )


def info_of(table: pa.Table) -> SegmentInfo:
    failed: dict[str, int] = {}
    for e in table.column("error").to_pylist():
        if e is not None:
            cls = e.split(":", 1)[0]
            failed[cls] = failed.get(cls, 0) + 1
    return SegmentInfo.of(table, failed)


def _plan(rows: int, segment_rows: int) -> Plan:
    return Plan(rows=rows, segment_rows=segment_rows, fingerprint=[], settings={})


def job_spec(folder: Path, rows: list[dict[str, Any]], **sections: Any) -> JobSpec:
    write_csv(folder / "input.csv", rows)
    return open_job(write_job(folder, "builtin", **sections))


def committed(spec: JobSpec, rows: list[dict[str, Any]], seg_rows: int, order: list[int] | None = None,
              **errors: str) -> tuple[RunState, dict[int, SegmentInfo]]:
    """A run directory with every segment of ``rows`` committed (in ``order``, default ascending)."""
    state = RunState(spec.state_dir)
    state.ensure_dirs()
    n_segments = -(-len(rows) // seg_rows)
    infos = {}
    for k in order if order is not None else range(n_segments):
        table = results(spec, rows, k * seg_rows, min(len(rows), (k + 1) * seg_rows), **errors)
        infos[k] = info_of(table)
        state.commit_segment(k, table, infos[k])
    return state, infos


# --- the sink -------------------------------------------------------------------------------------


def test_the_output_holds_every_input_row_once_in_input_order_with_its_columns_and_types(tmp_path: Path) -> None:
    rows = prompt_rows(10)
    spec = job_spec(tmp_path, rows)
    state, infos = committed(spec, rows, 4, order=[2, 0, 1], r000003="rejected: HTTP 400: no")  # commit order is not row order
    stats = write_output(spec, state, _plan(10, 4), infos)
    out = pq.read_table(spec.output_path)
    assert out.column_names == ["id", "topic", "prompt", "output", "params", "error", "attempts", "latency_s"]
    assert out.schema.field("output").type == pa.list_(pa.string())
    assert out.schema.field("params").type == pa.struct([("max_tokens", pa.int64()), ("temperature", pa.float64())])
    assert out.schema.field("attempts").type == pa.int32()
    assert out.schema.field("latency_s").type == pa.float64()
    got = out.to_pylist()
    assert [g["id"] for g in got] == [r["id"] for r in rows]  # the id column carried, in input order
    assert [g["topic"] for g in got] == [r["topic"] for r in rows]  # and every other input column
    for g, r in zip(got, rows):
        if r["id"] == "r000003":
            assert (g["output"], g["params"], g["error"]) == (None, None, "rejected: HTTP 400: no")
        else:
            assert g["output"] == expected_output(r["prompt"]) and g["error"] is None
            assert g["params"] == {"max_tokens": 6, "temperature": 0.5}
    assert (stats.rows, stats.succeeded, stats.failed, dict(stats.failed_by_class)) == (10, 9, 1, {"rejected": 1})
    assert state.wrote_output({"size": spec.output_path.stat().st_size, "mtime_ns": spec.output_path.stat().st_mtime_ns})


def _refused(spec: JobSpec, state: RunState, plan: Plan, infos: dict[int, SegmentInfo], match: str) -> None:
    with pytest.raises(StateError, match=match):
        write_output(spec, state, plan, infos)
    assert not spec.output_path.exists()
    assert [p.name for p in spec.output_path.parent.iterdir() if ".tmp-" in p.name] == []  # nothing half-written


def test_the_sink_refuses_a_segment_holding_a_result_for_another_prompt(tmp_path: Path) -> None:
    rows = prompt_rows(8)
    spec = job_spec(tmp_path, rows)
    state, infos = committed(spec, rows, 4)
    edited = [*rows[:5], {**rows[5], "prompt": "an edited prompt"}, *rows[6:]]
    write_csv(tmp_path / "input.csv", edited)
    _refused(spec, state, _plan(8, 4), infos,
             r"^checkpoint segment 1 holds a result for another prompt at input row 5; .* --restart$")


def test_the_sink_refuses_a_segment_whose_ids_differ_from_the_input(tmp_path: Path) -> None:
    rows = prompt_rows(8)
    spec = job_spec(tmp_path, rows)
    state, infos = committed(spec, rows, 4)
    write_csv(tmp_path / "input.csv", [*rows[:6], {**rows[6], "id": "renamed"}, rows[7]])
    _refused(spec, state, _plan(8, 4), infos, r"^checkpoint segment 1 ids differ from the input's")


def test_the_sink_refuses_a_segment_that_does_not_cover_its_rows(tmp_path: Path) -> None:
    rows = prompt_rows(8)
    spec = job_spec(tmp_path, rows)
    state, infos = committed(spec, rows, 4)
    short = results(spec, rows, 4, 7)  # row 7 missing
    state.commit_segment(1, short, info_of(short))
    _refused(spec, state, _plan(8, 4), infos, r"^checkpoint segment 1 does not cover input rows 4\.\.7")


def test_the_sink_refuses_an_input_whose_row_count_is_not_the_plans(tmp_path: Path) -> None:
    rows = prompt_rows(8)
    spec = job_spec(tmp_path, rows)
    state, infos = committed(spec, rows, 4)
    with pytest.raises(StateError, match=r"^the input now has 8 rows, the plan 9$"):
        write_output(spec, state, _plan(9, 4), infos)


def test_an_output_refused_for_its_row_count_is_not_published(tmp_path: Path) -> None:
    rows = prompt_rows(8)
    spec = job_spec(tmp_path, rows)
    state, infos = committed(spec, rows, 4)
    _refused(spec, state, _plan(9, 4), infos, r"^the input now has 8 rows, the plan 9$")


def test_a_damaged_segment_is_removed_so_its_rows_are_redone_and_no_output_appears(tmp_path: Path) -> None:
    rows = prompt_rows(8)
    spec = job_spec(tmp_path, rows)
    state, infos = committed(spec, rows, 4)
    seg = state.segment_path(1)
    seg.write_bytes(seg.read_bytes()[:-30])  # the footer torn off, as a crash mid-write would leave it
    with pytest.raises(DamagedStateError, match=r"^checkpoint segment 1 was damaged \(.*\); its rows will be redone$"):
        write_output(spec, state, _plan(8, 4), infos)
    assert not seg.exists() and state.segment_path(0).exists()
    assert not spec.output_path.exists()


# --- incremental carry-forward ----------------------------------------------------------------------


def test_unchanged_rows_carry_their_outputs_to_their_new_rows_changed_and_removed_ones_do_not(tmp_path: Path) -> None:
    v1 = prompt_rows(8)
    spec = job_spec(tmp_path, v1)
    state, _ = committed(spec, v1, 4, r000006="http_500: HTTP 500 (gave up after 4 attempts)")
    # v2: r000002 removed, r000004's prompt edited, r000009 new, the rest kept (their rows move up).
    v2 = [v1[0], v1[1], v1[3], {**v1[4], "prompt": "an edited prompt"}, v1[5], v1[6], v1[7], *prompt_rows(1, start=9)]
    write_csv(tmp_path / "input.csv", v2)
    counts = carry_forward(spec, state, {"input": "v2"})
    # Joined by id with the previous successes only: r000004 changed; r000006 (failed before) and
    # r000009 have no previous answer, so both count as new. Every row not reused is sent.
    assert counts == {"reused": 5, "changed": 1, "new": 2}
    carry = state.read_carry(0, len(v2))
    assert carry is not None
    by_id = {r["id"]: r for r in carry.to_pylist()}
    assert sorted(by_id) == ["r000000", "r000001", "r000003", "r000005", "r000007"]
    for row, r in enumerate(v2):
        if r["id"] in by_id:
            assert by_id[r["id"]]["row"] == row  # the new position, not the old one
            assert by_id[r["id"]]["output"] == expected_output(r["prompt"])
            assert by_id[r["id"]]["prompt_hash"] == prompt_hash(r["prompt"])
    assert carry.column("error").null_count == carry.num_rows
    assert not state.has_progress()  # the old segments are gone; only the carry holds their answers
    assert state.read_carry(2, 3) is not None and state.read_carry(2, 3).column("id").to_pylist() == ["r000003"]


def test_carrying_forward_again_for_the_same_input_reuses_the_carry_file_and_its_counts(tmp_path: Path) -> None:
    """A crash after the carry is published but before the plan is pinned: the rerun must not join
    again against a carry that no longer holds the changed rows (they would count as new)."""
    v1 = prompt_rows(6)
    spec = job_spec(tmp_path, v1)
    state, _ = committed(spec, v1, 3)
    write_csv(tmp_path / "input.csv", [v1[0], {**v1[1], "prompt": "edited"}, *v1[2:]])
    first = carry_forward(spec, state, {"input": "v2"})
    carry = state.carry_path.read_bytes()
    assert first == {"reused": 5, "changed": 1, "new": 0}
    assert carry_forward(spec, state, {"input": "v2"}) == first
    assert state.carry_path.read_bytes() == carry
    # Made for another input, the carry is joined again: the edited row is no longer in it, so it is new.
    assert carry_forward(spec, state, {"input": "v3"}) == {"reused": 5, "changed": 0, "new": 1}


# --- the run state ----------------------------------------------------------------------------------


def test_a_committed_segment_reads_back_as_written_and_its_footer_gives_its_counts(tmp_path: Path) -> None:
    rows = prompt_rows(4)
    spec = job_spec(tmp_path, rows)
    state = RunState(spec.state_dir)
    state.ensure_dirs()
    table = results(spec, rows, 0, 4, r000001="rejected: HTTP 400: no", r000002="empty_prompt: prompt is empty; not sent")
    info = info_of(table)
    state.journal_sent(0, [0, 1])
    state.write_partial(0, "run1", table.slice(0, 2))
    state.commit_segment(0, table, info)
    assert state.read_segment(0).equals(table)
    assert state.scan_segments() == {0: info}
    assert (info.failed, info.retryable, info.skipped) == (2, 1, 1)
    assert state.read_partials(0) is None and state.read_journal(0) == set()  # superseded by the commit
    assert state.scan_segments({0: 5}) == {} and not state.segment_path(0).exists()  # wrong size: not trusted


def test_a_second_holder_of_the_lock_is_refused_naming_the_first_until_it_lets_go(tmp_path: Path) -> None:
    root = tmp_path / "state"
    with RunState(root).lock():
        assert set(RunState(root).holders()) == {"lock"}
        with pytest.raises(BusyError) as refused:
            with RunState(root).lock():
                pytest.fail("two holders of one lock")
        holder = refused.value.holder
        assert re.fullmatch(rf"pid {os.getpid()} on {re.escape(socket.gethostname())} since \S+", holder), holder
        assert str(refused.value) == f"another run holds this job ({holder}); lock: {root / 'lock'}"
        assert refused.value.exit_code == 75
        with RunState(root).lock("lock.shard-1-of-2"):  # another lock of the same job is free
            pass
    assert RunState(root).holders() == {}
    with RunState(root).lock():  # released with its holder; the file stays
        assert (root / "lock").exists()


def test_partials_of_an_unfinished_segment_read_back_together_and_a_damaged_one_is_dropped(tmp_path: Path) -> None:
    rows = prompt_rows(6)
    spec = job_spec(tmp_path, rows)
    state = RunState(spec.state_dir)
    state.ensure_dirs()
    table = results(spec, rows, 0, 6)
    state.write_partial(1, "runA", table.slice(0, 3))
    state.write_partial(1, "runB", table.slice(2, 3))  # overlaps row 2: any result of a row is valid
    assert sorted(state.read_partials(1).column("row").to_pylist()) == [0, 1, 2, 2, 3, 4]
    assert state.partial_rows() == 6 and state.partial_segments() == {1} and state.has_progress()
    damaged = next(state.partial_dir.glob("seg-00000001.runB.parquet"))
    damaged.write_bytes(damaged.read_bytes()[:-20])  # torn footer
    assert state.read_partials(1).column("row").to_pylist() == [0, 1, 2]
    assert not damaged.exists()


def test_the_journal_counts_only_whole_lines_and_leftovers_of_committed_segments_are_cleared(tmp_path: Path) -> None:
    rows = prompt_rows(8)
    spec = job_spec(tmp_path, rows)
    state = RunState(spec.state_dir)
    state.ensure_dirs()
    state.journal_sent(0, [0, 1, 2])
    state.journal_sent(1, [4, 5])
    state.close_journals()
    journal = state.journal_dir / "seg-00000001.sent"
    with open(journal, "a", encoding="ascii") as f:
        f.write("6 7")  # a line torn by a crash: no newline
    assert state.read_journal(0) == {0, 1, 2}
    assert state.read_journal(1) == {4, 5}
    table = results(spec, rows, 0, 4)
    state.write_partial(0, "old", table.slice(0, 2))
    state.write_partial(1, "old", results(spec, rows, 4, 6))
    # Segment 0 committed by a run that crashed before dropping its partials and journal, and a
    # temporary file of a writer that is gone beside one of a writer still at work (this process).
    gone = subprocess.Popen(["true"])
    gone.wait()
    (state.segments_dir / f".seg-00000001.parquet.tmp-{gone.pid}-dead").write_bytes(b"half")
    (state.segments_dir / f".seg-00000002.parquet.tmp-{os.getpid()}-live").write_bytes(b"half")
    pq.write_table(table.replace_schema_metadata(info_of(table).metadata(0)), state.segment_path(0))
    state.clear_leftovers()
    assert state.read_partials(0) is None and state.read_journal(0) == set()
    assert state.read_partials(1) is not None and state.read_journal(1) == {4, 5}  # not committed: kept
    assert sorted(p.name for p in state.segments_dir.iterdir()) == [
        f".seg-00000002.parquet.tmp-{os.getpid()}-live", "seg-00000000.parquet"
    ]
