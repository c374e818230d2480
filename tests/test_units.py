"""Units below the end-to-end runs: retry timing, the outage verdict, admission, names, counts,
the record of outputs written, and the output-path rules. Each is a pure function or a small
object, tested without an endpoint (the clock is the only thing stood in for)."""

from __future__ import annotations

import asyncio
import email.utils
import time
from pathlib import Path

import pyarrow as pa
import pytest
from hypothesis import given
from hypothesis import strategies as st

from batchrun.admission import AttemptResult, FixedLimit, RateGate, Stopping
from batchrun.checkpoint import RESULT_SCHEMA, RunState, SegmentFile, SegmentInfo
from batchrun.echoed import merge_kind, params_types
from batchrun.errors import OutageError
from batchrun.fleet import Fleet
from batchrun.preflight import _pattern_matches
from batchrun.report import RunSummary, counts_of, set_counts
from batchrun.retry import INVALID, OutageVerdict, RetryPolicy, parse_retry_after

# --- Retry-After and backoff ---------------------------------------------------------------------


def test_retry_after_reads_delta_seconds_and_http_dates_and_ignores_anything_else() -> None:
    now = 1_800_000_000.0
    assert parse_retry_after("7", now) == 7.0
    assert parse_retry_after(" 12 ", now) == 12.0
    assert parse_retry_after(email.utils.formatdate(now + 30, usegmt=True), now) == pytest.approx(30)
    assert parse_retry_after(email.utils.formatdate(now - 30, usegmt=True), now) == 0.0  # already past
    for junk in (None, "", "soon", "-3", "1.5", "Wed, 21 Oct 2015 07:28:00"):  # no zone: not a date we trust
        assert parse_retry_after(junk, now) is None, junk


@given(retry=st.integers(1, 12), base=st.floats(0.01, 5), cap=st.floats(0.01, 60))
def test_backoff_is_full_jitter_below_the_capped_exponential(retry: int, base: float, cap: float) -> None:
    policy = RetryPolicy(max_retries=12, base_s=base, cap_s=cap)
    assert 0.0 <= policy.delay(retry) <= min(cap, base * 2 ** (retry - 1))


def test_retry_after_raises_the_wait_up_to_its_own_cap() -> None:
    policy = RetryPolicy(max_retries=3, base_s=0.01, cap_s=0.02, retry_after_cap_s=5.0)
    assert policy.delay(1, retry_after=3.0) == 3.0
    assert policy.delay(1, retry_after=500.0) == 5.0


# --- the outage verdict -----------------------------------------------------------------------------


def test_failures_in_a_row_make_an_outage_and_one_answer_resets_the_count() -> None:
    verdict = OutageVerdict(3)
    verdict.failure("http_503", "HTTP 503")
    verdict.failure("timeout", "slow")
    verdict.answer()
    verdict.failure("http_503", "HTTP 503")
    verdict.failure("http_503", "HTTP 503")
    with pytest.raises(OutageError, match=r"^the endpoint failed 3 attempts in a row \(last: http_503: HTTP 503\)"):
        verdict.failure("http_503", "HTTP 503")


def test_an_outage_of_answers_that_never_validate_says_what_is_wrong_with_them() -> None:
    verdict = OutageVerdict(2)
    verdict.failure(INVALID, "invalid response: 4 items: echoed prompt matches no prompt sent")
    with pytest.raises(OutageError, match=r"^the endpoint's answers failed validation 2 attempts in a row \(last: 4 items: echoed"):
        verdict.failure(INVALID, "invalid response: 4 items: echoed prompt matches no prompt sent")


def test_a_batch_giving_up_is_an_outage_until_the_endpoint_has_answered_this_job() -> None:
    with pytest.raises(OutageError, match="cannot connect to the endpoint"):
        OutageVerdict(20, answered=True).give_up("connection", "refused", could_not_connect=True)
    with pytest.raises(OutageError, match="has not answered this job once"):
        OutageVerdict(20).give_up("http_500", "HTTP 500", could_not_connect=False)
    OutageVerdict(20, answered=True).give_up("http_500", "HTTP 500", could_not_connect=False)  # rows fail
    answered_now = OutageVerdict(20)
    answered_now.answer()
    answered_now.give_up("timeout", "slow", could_not_connect=False)


# --- admission ------------------------------------------------------------------------------------


def test_a_429_pauses_its_replica_for_its_retry_after_and_only_that_replica() -> None:
    """One replica: the next attempt waits out the Retry-After. Two: the next goes to the other
    replica at once, and the paused one is used again once its pause is over."""
    policy = RetryPolicy(max_retries=1, base_s=0.0, cap_s=0.0)

    async def one() -> tuple[float, float]:
        fleet = Fleet.single("http://a", policy, 8)
        first = await fleet.admit(4)
        fleet.settle(first, AttemptResult(4, 0.01, "http_429", retry_after=0.3))
        second = await fleet.admit(4)
        return first.waited_s, second.waited_s

    first, paused = asyncio.run(one())
    assert first < 0.05
    assert 0.25 <= paused < 2.0

    async def two() -> None:
        fleet = Fleet(["http://a", "http://b"], [FixedLimit(8), FixedLimit(8)], policy)
        ticket = await fleet.admit(4)
        refused = ticket.replica
        fleet.settle(ticket, AttemptResult(4, 0.01, "http_503", retry_after=0.3))
        others = [await fleet.admit(4) for _ in range(3)]
        assert all(t.replica is not refused and t.waited_s < 0.05 for t in others)
        for t in others:
            fleet.settle(t, AttemptResult(4, 0.01))
        await asyncio.sleep(0.35)
        seen = {(await fleet.admit(4)).replica.base for _ in range(6)}
        assert seen == {"http://a", "http://b"}  # the pause is over: both take work

    asyncio.run(two())


def test_a_request_rate_spaces_admissions_evenly_from_the_first_second() -> None:
    async def main() -> float:
        fleet = Fleet.single("http://a", RetryPolicy(0, 1.0, 60.0), 8, rate=RateGate(600, None, 4))  # one every 0.1 s
        started = time.monotonic()
        for _ in range(6):
            ticket = await fleet.admit(4)
            fleet.settle(ticket, AttemptResult(4, 0.0))
        return time.monotonic() - started

    assert asyncio.run(main()) >= 0.45  # the first is free, five more at 0.1 s each (the bucket holds one)


def test_admission_holds_at_most_its_slots_in_flight_and_settle_frees_them() -> None:
    """Concurrency lives in admission: a third attempt waits for one of two slots, gets it when
    an attempt settles, and a stop while waiting leaves every slot as it was."""

    async def main() -> None:
        fleet = Fleet.single("http://a", RetryPolicy(0, 1.0, 60.0), 2)
        assert fleet.max_in_flight == 2
        first = await fleet.admit(4)
        second = await fleet.admit(4)
        third = asyncio.ensure_future(fleet.admit(4))
        await asyncio.sleep(0.05)
        assert not third.done()
        fleet.settle(first, AttemptResult(4, 0.01))
        third_ticket = await asyncio.wait_for(third, 1)
        stop = asyncio.Event()
        fourth = asyncio.ensure_future(fleet.admit(4, stop))
        await asyncio.sleep(0.05)
        assert not fourth.done()
        stop.set()
        with pytest.raises(Stopping):
            await asyncio.wait_for(fourth, 1)
        fleet.settle(second, AttemptResult(4, 0.01))
        fleet.settle(third_ticket, AttemptResult(4, 0.01, "not_sent"))
        await asyncio.wait_for(fleet.admit(4), 1)  # the stopped wait took nothing
        await asyncio.wait_for(fleet.admit(4), 1)
        assert fleet.replicas[0].in_flight == 2

    asyncio.run(main())


# --- names and counts -----------------------------------------------------------------------------


@given(k=st.integers(0, 10**9), run=st.one_of(st.none(), st.from_regex(r"[A-Za-z0-9_-]{1,20}", fullmatch=True)),
       kind=st.sampled_from(["parquet", "sent"]))
def test_segment_file_names_parse_back_to_what_made_them(k: int, run: str | None, kind: str) -> None:
    name = SegmentFile(k, run if kind == "parquet" else None, kind)  # type: ignore[arg-type]
    assert SegmentFile.parse(name.name) == name


def test_names_that_are_not_segment_files_are_not_read_as_segments() -> None:
    for other in ("seg-1.parquet", "seg-00000001.tmp", ".seg-00000001.parquet.tmp-1-ab", "lock", "seg-abcdefgh.parquet"):
        assert SegmentFile.parse(other) is None, other


def test_counts_put_empty_prompts_under_skipped_and_the_exit_code_follows_failures_only() -> None:
    table = pa.table({name: pa.nulls(5, t) for name, t in zip(RESULT_SCHEMA.names, RESULT_SCHEMA.types)})
    clean = SegmentInfo.of(table, {"empty_prompt": 2})
    failing = SegmentInfo.of(table, {"rejected": 1, "http_500": 1, "empty_prompt": 1})
    assert (clean.failed, clean.retryable, clean.skipped) == (2, 0, 2)
    counts = counts_of({0: clean, 1: failing})
    assert counts == {"succeeded": 5, "failed": 2, "failed_by_class": {"http_500": 1, "rejected": 1}, "skipped": 3}
    summary = RunSummary(job="j", status="", exit_code=0)
    set_counts(summary, counts_of({0: clean}))
    assert (summary.exit_code, summary.skipped) == (0, 2)
    set_counts(summary, counts)
    assert summary.exit_code == 3


def test_echoed_param_types_merge_to_the_narrowest_type_that_holds_every_value() -> None:
    assert params_types(['{"t": 1, "k": "a"}', None, '{"t": 0.5, "k": null}']) == {"t": "float", "k": "str"}
    assert merge_kind("int", "bool") == "json"
    assert merge_kind(None, "null") == "null"


# --- the record of outputs written, and the output-path rules --------------------------------------


def test_the_state_remembers_outputs_it_published_across_a_restart(tmp_path: Path) -> None:
    state = RunState(tmp_path / "state")
    state.ensure_dirs()
    mine, other = {"size": 10, "mtime_ns": 1}, {"size": 10, "mtime_ns": 2}
    state.record_output(mine)
    state.write_finished({"output": {"size": 3, "mtime_ns": 3}})
    state.reset()  # --restart
    assert state.wrote_output(mine)
    assert state.wrote_output({"size": 3, "mtime_ns": 3}), "the finished marker's output was forgotten"
    assert not state.wrote_output(other)


@pytest.mark.parametrize(
    ("pattern", "output", "matches"),
    [
        ("data/*.parquet", "data/out.parquet", True),
        ("data/*.parquet", "data/sub/out.parquet", False),  # * never crosses a folder
        ("data/**/*.parquet", "data/sub/deeper/out.parquet", True),
        ("data/part-?.parquet", "data/part-1.parquet", True),
        ("data/part-?.parquet", "data/part-10.parquet", False),
        ("data/in.parquet", "data/in.parquet", True),
        ("data/in.parquet", "data/out.parquet", False),
        ("other/*.parquet", "data/out.parquet", False),
    ],
)
def test_an_output_path_matches_the_input_pattern_as_glob_would_list_it(
    tmp_path: Path, pattern: str, output: str, matches: bool
) -> None:
    assert _pattern_matches(pattern, tmp_path, tmp_path / output) is matches
