"""S3RunState against a real S3-compatible store (SeaweedFS on loopback): commits, damage, partials,
the journal, the plan, leases across processes, and a store that stops answering."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pyarrow import fs
from s3server import SeaweedS3, free_port_pairs, weed_binary

from batchrun.checkpoint import DamagedStateError
from batchrun.errors import BusyError, StorageError
from batchrun.plan import Plan
from batchrun.s3state import S3RunState, S3StateOptions
from batchrun.s3store import S3Path
from batchrun.segments import RESULT_SCHEMA, SegmentInfo

BUCKET = "state"
# Short leases so the tests stay quick; one test below runs the real figures.
QUICK = S3StateOptions(lease_ttl_s=3.0, renew_every_s=1.0, settle_s=0.3, poll_s=0.2, retry_delays_s=(0.1, 0.2))
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def s3(s3_server: SeaweedS3) -> SeaweedS3:
    """The session's store, with this module's bucket (each test works under a prefix of its own)."""
    s3_server.make_bucket(BUCKET)
    return s3_server


@pytest.fixture
def state(s3: SeaweedS3) -> S3RunState:
    return S3RunState(S3Path(f"{BUCKET}/{uuid.uuid4().hex[:10]}/state"), s3.filesystem(), options=QUICK)


def results(start: int, n: int, *, failed: int = 0) -> pa.Table:
    rows = list(range(start, start + n))
    return pa.table(
        {
            "row": rows,
            "prompt_hash": [r * 7 for r in rows],
            "id": [f"r{r}" for r in rows],
            "output": [None if i < failed else [f"answer {r}"] for i, r in enumerate(rows)],
            "params": [None] * n,
            "error": ["http_500: no" if i < failed else None for i in range(n)],
            "attempts": [1] * n,
            "latency_s": [0.1] * n,
            "finish_reason": [None] * n,
            "prompt_tokens": [None] * n,
            "completion_tokens": [None] * n,
        },
        schema=RESULT_SCHEMA,
    )


def commit(state: S3RunState, k: int, n: int = 10, **kw: Any) -> pa.Table:
    table = results(k * n, n, **kw)
    failed = kw.get("failed", 0)
    state.commit_segment(k, table, SegmentInfo.of(table, {"http_500": failed} if failed else {}))
    return table


def keys(s3: SeaweedS3, state: S3RunState, folder: str = "") -> list[str]:
    base = state.root.fs_path
    sel = fs.FileSelector(f"{base}/{folder}".rstrip("/"), recursive=True, allow_not_found=True)
    return sorted(i.path.removeprefix(base + "/") for i in s3.filesystem().get_file_info(sel) if i.type == fs.FileType.File)


def put_raw(s3: SeaweedS3, state: S3RunState, name: str, data: bytes) -> None:
    with s3.filesystem().open_output_stream(f"{state.root.fs_path}/{name}") as f:
        f.write(data)


def get_raw(s3: SeaweedS3, state: S3RunState, name: str) -> bytes:
    with s3.filesystem().open_input_stream(f"{state.root.fs_path}/{name}") as f:
        return bytes(f.read())


# --- segments -----------------------------------------------------------------------------------

def test_a_committed_segment_is_one_object_under_its_one_name_and_reads_back_whole(s3: SeaweedS3, state: S3RunState) -> None:
    table = commit(state, 3)
    commit(state, 3)  # a retried (or concurrent) commit converges on the same object
    commit(state, 4, failed=2)
    assert keys(s3, state, "segments") == ["segments/seg-00000003.parquet", "segments/seg-00000004.parquet"]
    infos = state.scan_segments({3: 10, 4: 10})
    assert sorted(infos) == [3, 4]
    assert (infos[4].failed, infos[4].retryable, infos[4].failed_by_class) == (2, 2, {"http_500": 2})
    assert state.read_segment(3).equals(table)
    assert state.has_progress()


def test_a_segment_of_the_wrong_size_or_not_parquet_is_deleted_by_a_scan_so_its_rows_are_redone(
    s3: SeaweedS3, state: S3RunState
) -> None:
    commit(state, 0)
    commit(state, 1)
    put_raw(s3, state, "segments/seg-00000002.parquet", b"PAR1 but then nothing useful")
    good = get_raw(s3, state, "segments/seg-00000001.parquet")
    put_raw(s3, state, "segments/seg-00000005.parquet", good[: len(good) // 2])  # a truncated copy
    assert sorted(state.scan_segments({0: 10, 1: 10, 2: 10, 5: 10}, remove_damaged=False)) == [0, 1]
    assert len(keys(s3, state, "segments")) == 4, "remove_damaged=False (status) removes nothing"
    assert sorted(state.scan_segments({0: 10, 1: 12, 2: 10, 5: 10})) == [0]
    assert keys(s3, state, "segments") == ["segments/seg-00000000.parquet"]


def test_a_segment_whose_page_fails_its_crc_is_deleted_on_read_and_reported_damaged(s3: SeaweedS3, state: S3RunState) -> None:
    commit(state, 0, n=200)
    data = bytearray(get_raw(s3, state, "segments/seg-00000000.parquet"))
    data[40] ^= 0xFF  # inside the first data page; the footer still reads
    put_raw(s3, state, "segments/seg-00000000.parquet", bytes(data))
    assert list(state.scan_segments({0: 200})) == [0]
    with pytest.raises(DamagedStateError) as err:
        state.read_segment(0)
    assert err.value.segment == 0
    assert keys(s3, state, "segments") == []


def test_scan_reads_footers_by_ranged_reads_not_whole_objects(s3: SeaweedS3, state: S3RunState) -> None:
    """A segment large enough that its footer is past the first 64 KB tail read is still read
    right, and the scan fetches far fewer bytes than the objects hold."""
    big = results(0, 30000)
    state.commit_segment(0, big, SegmentInfo.of(big, {}))
    fetched: list[int] = []
    real = state._get_range

    def counting(info: fs.FileInfo, offset: int, length: int) -> bytes:
        fetched.append(length)
        return real(info, offset, length)

    state._get_range = counting
    assert state.scan_segments({0: 30000})[0].rows == 30000
    size = len(get_raw(s3, state, "segments/seg-00000000.parquet"))
    assert sum(fetched) <= 64 * 1024 < size, (fetched, size)


# --- partials and the journal -------------------------------------------------------------------

def test_partials_are_read_together_counted_and_dropped_when_their_segment_commits(s3: SeaweedS3, state: S3RunState) -> None:
    state.write_partial(2, "run-a", results(20, 3))
    state.write_partial(2, "run-b", results(23, 2))
    state.write_partial(5, "run-a", results(50, 4))
    assert state.read_partials(2).num_rows == 5
    assert state.read_partials(7) is None
    assert state.partial_rows() == 9
    assert state.has_progress()
    commit(state, 2)
    assert keys(s3, state, "partial") == ["partial/seg-00000005.run-a.parquet"]


def test_a_damaged_partial_is_deleted_and_the_others_still_count(s3: SeaweedS3, state: S3RunState) -> None:
    state.write_partial(1, "run-a", results(10, 3))
    put_raw(s3, state, "partial/seg-00000001.run-b.parquet", b"not parquet")
    assert state.read_partials(1).num_rows == 3
    assert keys(s3, state, "partial") == ["partial/seg-00000001.run-a.parquet"]


def test_the_journal_is_uploaded_with_partial_saves_as_immutable_objects_and_dropped_on_commit(
    s3: SeaweedS3, state: S3RunState
) -> None:
    state.journal_sent(1, [10, 11])
    assert keys(s3, state, "journal") == [], "no upload per batch"
    state.write_partial(1, "run-a", results(10, 2))
    state.journal_sent(1, [12, 13])
    state.write_partial(1, "run-a", results(10, 4))
    assert len(keys(s3, state, "journal")) == 2
    # Another process (a run after a crash) sees what was uploaded, not what was in memory.
    state.journal_sent(1, [14])
    other = S3RunState(state.root, s3.filesystem(), options=QUICK)
    assert other.read_journal(1) == {10, 11, 12, 13}
    assert state.read_journal(1) == {10, 11, 12, 13, 14}
    put_raw(s3, state, "journal/seg-00000001.torn-000001.sent", b"15 16\n17 1")  # a torn last line
    assert other.read_journal(1) == {10, 11, 12, 13, 15, 16}
    state.close_journals()
    assert other.read_journal(1) == {10, 11, 12, 13, 14, 15, 16}
    commit(state, 1)
    assert keys(s3, state, "journal") == []


def test_clear_leftovers_removes_partials_and_journals_of_committed_segments_only(s3: SeaweedS3, state: S3RunState, tmp_path: Path) -> None:
    commit(state, 0)
    put_raw(s3, state, "partial/seg-00000000.old.parquet", pq_bytes(results(0, 2)))
    put_raw(s3, state, "journal/seg-00000000.old-000001.sent", b"0 1\n")
    state.write_partial(1, "run", results(10, 2))
    state.clear_leftovers()
    assert keys(s3, state, "partial") == ["partial/seg-00000001.run.parquet"]
    assert keys(s3, state, "journal") == []


def pq_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return bytes(sink.getvalue())


# --- plan, finish, outputs, carry, reset ---------------------------------------------------------

def plan(rows: int = 100, created_at: str = "2026-01-01T00:00:00") -> Plan:
    return Plan(rows=rows, segment_rows=10, fingerprint=[{"path": "in.csv", "size": 1, "mtime_ns": 2, "sha256": "ab"}],
                settings={"model": "m"}, created_at=created_at)


def test_the_plan_round_trips_and_a_second_write_replaces_it_whole(state: S3RunState) -> None:
    assert state.read_plan() is None
    state.write_plan(plan())
    state.write_plan(plan(created_at="later"))
    assert state.read_plan() == plan(created_at="later")
    state.reset()
    assert state.read_plan() is None


def test_a_plan_pinned_by_another_run_at_the_same_moment_stays_and_a_plan_read_may_be_replaced(
    s3: SeaweedS3, state: S3RunState
) -> None:
    racer = S3RunState(state.root, s3.filesystem(), options=QUICK)
    assert state.read_plan() is None and racer.read_plan() is None  # both found none
    racer.write_plan(plan(created_at="racer"))
    state.write_plan(plan(created_at="mine"))  # a plan it never saw is there: the first one stays
    assert state.read_plan() == plan(created_at="racer")
    state.write_plan(plan(rows=120, created_at="replanned"))  # the plan it read may be replaced
    assert racer.read_plan() == plan(rows=120, created_at="replanned")
    fresh = S3RunState(state.root, s3.filesystem(), options=QUICK)
    fresh.write_plan(plan(created_at="unread"))  # a store that read nothing replaces nothing
    assert fresh.read_plan() == plan(rows=120, created_at="replanned")


def test_a_run_that_reads_back_another_jobs_plan_pinned_at_the_same_moment_is_refused(
    s3: SeaweedS3, state: S3RunState, tmp_path: Path
) -> None:
    """The runner checks a plan it did not make against its job: a racer that pinned a plan for
    another model between this run's look and its PUT makes this run stop, not work under it."""
    from dataclasses import replace

    from conftest import prompt_rows, write_csv, write_job

    from batchrun.errors import StateError
    from batchrun.inputcheck import open_job
    from batchrun.runner import _plan

    class Raced(S3RunState):
        def write_plan(self, plan: Plan) -> None:
            racer = S3RunState(self.root, self.fs, options=QUICK)
            racer.write_plan(replace(plan, settings={**plan.settings, "model": "another/model"}, created_at="racer"))
            super().write_plan(plan)

    write_csv(tmp_path / "input.csv", prompt_rows(20))
    spec = open_job(write_job(tmp_path, "http://127.0.0.1:9"))
    with pytest.raises(StateError, match="model: 'another/model' -> 'test-model'"):
        _plan(spec, Raced(state.root, s3.filesystem(), options=QUICK))
    assert _plan(spec, S3RunState(S3Path(state.root.fs_path + "-2"), s3.filesystem(), options=QUICK)).rows == 20


def test_finished_and_outputs_are_kept_as_the_local_state_keeps_them(state: S3RunState) -> None:
    ident = {"size": 10, "mtime_ns": 5}
    assert state.read_finished() is None and not state.wrote_output(ident)
    state.record_output(ident)
    assert state.wrote_output(ident) and not state.wrote_output({"size": 11, "mtime_ns": 5})
    state.write_finished({"output": {"size": 20, "mtime_ns": 6}, "rows": 3})
    assert state.read_finished() == {"output": {"size": 20, "mtime_ns": 6}, "rows": 3}
    commit(state, 0)
    state.drop_progress()  # keeps the record of outputs, and adds the finished one to it
    assert state.read_finished() is None and not state.has_progress()
    assert state.wrote_output(ident) and state.wrote_output({"size": 20, "mtime_ns": 6})


def test_carry_is_read_by_row_range_and_a_damaged_one_is_dropped(s3: SeaweedS3, state: S3RunState) -> None:
    assert not state.has_carry() and state.read_carry(0, 10) is None and state.carry_metadata() is None
    state.write_carry(results(0, 50).replace_schema_metadata({"batchrun.carry_for": "x"}))
    assert state.has_carry()
    assert state.read_carry(10, 20)["row"].to_pylist() == list(range(10, 20))
    assert state.carry_metadata() == {b"batchrun.carry_for": b"x"}
    fresh = S3RunState(state.root, s3.filesystem(), options=QUICK)
    put_raw(s3, state, "carry.parquet", b"garbage")
    assert fresh.carry_metadata() is None
    assert fresh.read_carry(0, 10) is None
    assert not state.has_carry()


def test_result_files_are_local_copies_that_polars_and_pyarrow_read(state: S3RunState) -> None:
    commit(state, 0)
    state.write_partial(1, "run", results(10, 3))
    state.write_carry(results(100, 5))
    files = state.result_files(with_carry=True)
    assert [pq.read_table(f).num_rows for f in files] == [10, 3, 5]
    assert all(isinstance(f, Path) and f.exists() for f in files)
    state.drop_progress()
    assert not any(f.exists() for f in files)
    scratch = state.scratch_path("incoming.parquet")
    assert isinstance(scratch, Path) and scratch.parent.is_dir()


# --- leases -------------------------------------------------------------------------------------

HOLDER = textwrap.dedent(
    """
    import json, sys, time
    from pyarrow import fs
    from batchrun import leases, s3state
    from batchrun.errors import BusyError
    from batchrun.s3store import S3Path

    endpoint, root, name, opts, hold_s, start_at, other_host = sys.argv[1:]
    if other_host == "1":  # a holder in another pod: only its lease's expiry tells it has died
        mine = leases.this_process
        leases.this_process = lambda: {**mine(), "host": "pod-b", "boot": "another-boot"}
    state = s3state.S3RunState(
        S3Path(root), fs.S3FileSystem(endpoint_override=endpoint, scheme="http", region="us-east-1"),
        options=s3state.S3StateOptions(**json.loads(opts)),
    )
    time.sleep(max(0.0, float(start_at) - time.time()))
    try:
        with state.lock(name):
            print("held", time.time(), flush=True)
            time.sleep(float(hold_s))
            print("released", time.time(), flush=True)
    except BusyError as exc:
        print("busy", exc.holder, flush=True)
    """
)


def holder(s3: SeaweedS3, state: S3RunState, name: str, *, hold_s: float = 60, opts: S3StateOptions = QUICK,
           start_at: float = 0, other_host: bool = False) -> subprocess.Popen[str]:
    options = {k: getattr(opts, k) for k in ("lease_ttl_s", "renew_every_s", "settle_s", "poll_s")}
    return subprocess.Popen(
        [sys.executable, "-c", HOLDER, s3.endpoint, state.root.fs_path, name,
         json.dumps(options), str(hold_s), str(start_at), "1" if other_host else "0"],
        stdout=subprocess.PIPE, text=True, env={**os.environ, **s3.env}, cwd=REPO,
    )


def end(proc: subprocess.Popen[str], sig: signal.Signals = signal.SIGKILL) -> None:
    """Stop a holder (SIGKILL: it dies holding its lease) and close its pipe."""
    if proc.poll() is None:
        proc.send_signal(sig)
    proc.wait(30)
    if proc.stdout is not None:
        proc.stdout.close()


def held(proc: subprocess.Popen[str]) -> float:
    assert proc.stdout is not None
    line = proc.stdout.readline().split()
    assert line and line[0] == "held", line
    return float(line[1])


def test_a_held_lease_refuses_another_process_naming_its_holder_and_is_deleted_on_release(
    s3: SeaweedS3, state: S3RunState
) -> None:
    proc = holder(s3, state, "lock", hold_s=2)
    held(proc)
    with pytest.raises(BusyError) as err:
        with state.lock("lock"):
            pass
    assert f"pid {proc.pid} on " in err.value.holder
    assert err.value.lock_path == f"{state.root}/lock"
    assert list(state.holders()) == ["lock"]
    proc.wait(30)
    end(proc)
    assert state.holders() == {} and "lock" not in keys(s3, state)
    with state.lock("lock"):
        assert list(state.holders()) == ["lock"]
        with pytest.raises(BusyError):  # as flock: a second holder in the same process is refused too
            with state.lock("lock"):
                pass


def test_a_holder_killed_on_this_host_is_taken_over_at_once(s3: SeaweedS3, state: S3RunState) -> None:
    proc = holder(s3, state, "lock", opts=S3StateOptions(lease_ttl_s=600, settle_s=0.3))
    held(proc)
    end(proc)
    started = time.monotonic()
    with state.lock("lock"):
        assert time.monotonic() - started < 3


def test_a_lease_renewed_by_its_live_holder_outlives_its_ttl(s3: SeaweedS3, state: S3RunState) -> None:
    proc = holder(s3, state, "merge.lock", hold_s=8, other_host=True)
    since = held(proc)
    for _ in range(3):  # up to 3 TTLs (3 s each) after it was taken
        time.sleep(2)
        with pytest.raises(BusyError):
            with state.lock("merge.lock"):
                pass
    assert time.time() - since > 2 * QUICK.lease_ttl_s
    end(proc)


def test_a_holder_in_another_pod_killed_with_sigkill_is_taken_over_once_its_lease_expires(
    s3: SeaweedS3, state: S3RunState
) -> None:
    proc = holder(s3, state, "lock.shard-1-of-2", other_host=True)
    held(proc)
    time.sleep(1.5)  # a renewal or so
    end(proc)
    killed = time.monotonic()
    with pytest.raises(BusyError):
        with state.lock("lock.shard-1-of-2"):
            pass
    with state.lock("lock.shard-1-of-2", wait=True):
        waited = time.monotonic() - killed
    print(f"\ntaken over {waited:.1f} s after the holder's death (ttl {QUICK.lease_ttl_s} s)")
    assert waited <= QUICK.lease_ttl_s + QUICK.poll_s + QUICK.settle_s + 1.5


@pytest.mark.slow
def test_at_the_real_figures_a_dead_holders_lease_is_taken_over_within_about_30_s(s3: SeaweedS3, state: S3RunState) -> None:
    real = S3StateOptions()
    proc = holder(s3, state, "lock", opts=real, other_host=True)
    took = held(proc)
    end(proc)
    killed = time.time()
    waiter = S3RunState(state.root, s3.filesystem(), options=real)
    with waiter.lock("lock", wait=True):
        got = time.time()
    print(f"\nlease taken {got - took:.1f} s after it was taken, {got - killed:.1f} s after its holder died "
          f"(ttl {real.lease_ttl_s} s, renewed every {real.renew_every_s} s, poll {real.poll_s} s)")
    assert real.lease_ttl_s - 1 <= got - took <= real.lease_ttl_s + real.poll_s + real.settle_s + 2


def test_processes_racing_for_one_lease_never_hold_it_together(s3: SeaweedS3, state: S3RunState) -> None:
    outcomes = []
    for round_ in range(3):
        name = f"lock.race-{round_}"
        start_at = time.time() + 2.5
        procs = [holder(s3, state, name, hold_s=1.5, start_at=start_at, other_host=True) for _ in range(3)]
        lines = [p.communicate(timeout=60)[0].split("\n")[0].split()[0] for p in procs]
        outcomes.append(lines)
        assert lines.count("held") <= 1, lines
    print(f"\nrounds: {outcomes}")
    assert any("held" in lines for lines in outcomes), "nobody took the lease"


def test_shard_count_survives_the_leases_of_the_shards(state: S3RunState) -> None:
    assert state.shard_count() is None
    for i in (1, 2, 3):
        with state.lock(f"lock.shard-{i}-of-3"):
            pass
    assert state.holders() == {}
    assert state.shard_count() == 3


# --- a store that does not answer -----------------------------------------------------------------

def test_a_store_that_refuses_connections_is_a_storage_error_naming_the_object_after_retries(s3: SeaweedS3) -> None:
    (port,) = free_port_pairs(1)
    dead = fs.S3FileSystem(
        access_key=s3.access_key, secret_key=s3.secret_key, region="us-east-1", endpoint_override=f"127.0.0.1:{port}",
        scheme="http", retry_strategy=fs.AwsStandardS3RetryStrategy(max_attempts=1),
    )
    state = S3RunState(S3Path(f"{BUCKET}/gone/state"), dead, options=QUICK)
    with pytest.raises(StorageError) as err:
        state.write_finished({"rows": 1})
    message = str(err.value)
    assert message.startswith(
        f"cannot write s3://{BUCKET}/gone/state/finished.json: the store did not answer (NETWORK_CONNECTION"
    ), message
    assert "3 attempts); progress so far is kept" in message
    assert err.value.exit_code == 74
    assert s3.secret_key not in message and s3.access_key not in message
    with pytest.raises(StorageError, match=r"cannot list s3://state/gone/state/segments/"):
        state.scan_segments()
    with pytest.raises(StorageError, match=r"cannot read s3://state/gone/state/plan.json"):
        state.write_plan(plan())  # it looks for a plan pinned meanwhile first


def test_access_refused_is_a_storage_error_at_once_and_quotes_no_key(s3: SeaweedS3) -> None:
    wrong = fs.S3FileSystem(access_key=s3.access_key, secret_key="not-the-secret-" + uuid.uuid4().hex,
                            region="us-east-1", endpoint_override=s3.endpoint, scheme="http")
    state = S3RunState(S3Path(f"{BUCKET}/denied/state"), wrong, options=S3StateOptions(retry_delays_s=(5.0,)))
    started = time.monotonic()
    with pytest.raises(StorageError) as err:
        state.write_finished({"rows": 1})
    assert time.monotonic() - started < 3, "a refusal is not retried"
    assert "SIGNATURE_DOES_NOT_MATCH" in str(err.value) and "not-the-secret" not in str(err.value)


def test_a_store_killed_mid_run_fails_with_progress_kept_and_a_store_back_within_the_retries_is_no_error(
    tmp_path: Path,
) -> None:
    weed = weed_binary()
    if weed is None:
        pytest.skip("the weed binary is not installed")
    server = SeaweedS3(tmp_path / "private", weed=weed).start()
    try:
        server.make_bucket(BUCKET)
        state = S3RunState(S3Path(f"{BUCKET}/run/state"), server.filesystem(), options=QUICK)
        commit(state, 0)
        state.write_partial(1, "run", results(10, 4))
        server.kill()
        with pytest.raises(StorageError, match=r"cannot write s3://state/run/state/segments/seg-00000001.parquet"):
            commit(state, 1)
        # Back on the same ports over the same data (about 20 s after a SIGKILL) while a commit
        # is still retrying: the commit lands, and nothing committed before was lost.
        restart = threading.Thread(target=server.start)
        restart.start()
        patient = S3RunState(state.root, server.filesystem(), options=S3StateOptions(retry_delays_s=(1, 2, 4, 8, 8, 8)))
        assert patient.read_partials(1).num_rows == 4
        commit(patient, 1)
        restart.join()
        assert sorted(state.scan_segments({0: 10, 1: 10})) == [0, 1]
        assert keys(server, state, "partial") == []
    finally:
        server.kill()  # no graceful stop: its data folder is the test's own


def test_a_crash_before_the_put_leaves_no_object_and_one_after_it_a_whole_one(s3: SeaweedS3, state: S3RunState) -> None:
    script = textwrap.dedent(
        """
        import sys
        import pyarrow as pa
        from pyarrow import fs
        from batchrun.s3state import S3RunState
        from batchrun.s3store import S3Path
        from batchrun.segments import RESULT_SCHEMA, SegmentInfo
        sys.path.insert(0, "tests")
        from test_s3state import results
        state = S3RunState(S3Path(sys.argv[2]), fs.S3FileSystem(endpoint_override=sys.argv[1], scheme="http", region="us-east-1"))
        table = results(0, 10)
        state.commit_segment(0, table, SegmentInfo.of(table, {}))
        """
    )
    root = state.root.fs_path
    for step, visible in (("segment:written", False), ("segment:fsynced", False), ("segment:renamed", True),
                          ("segment:published", True)):
        env = {**os.environ, **s3.env, "BATCHRUN_CRASH_AT": step}
        proc = subprocess.run([sys.executable, "-c", script, s3.endpoint, root], env=env, cwd=REPO, capture_output=True, text=True)
        assert proc.returncode == -signal.SIGKILL, (step, proc.stderr)
        assert (keys(s3, state, "segments") != []) == visible, step
        if visible:
            assert state.read_segment(0).num_rows == 10
        state.reset()
