"""Hostile inputs found while planning or mid-run, and inputs changed since the plan, through the CLI:
each refusal exits 2 with one line naming the file (and the column and row where known)."""

from __future__ import annotations

import decimal
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import Result
from conftest import MakeJob, assert_exact, invoke, prompt_rows, state_of, write_csv, write_job
from endpoint import LiveEndpoint

from batchrun import inputcheck
from batchrun.errors import JobError
from batchrun.inputcheck import open_job


def refused(result: Result) -> str:
    """The first line of a refusal, which must exit 2 with no traceback and no output written."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    return result.stderr.splitlines()[0]


def rows_table(n: int) -> pa.Table:
    return pa.Table.from_pylist(prompt_rows(n))


def write_parquet(path: Path, table: pa.Table, **options: Any) -> Path:
    pq.write_table(table, path, **options)
    return path


def damage(path: Path, row_group: int, column: str) -> None:
    """Overwrite 8 bytes in the middle of one column chunk's data pages, as a bad disk would."""
    meta = pq.read_metadata(path)
    index = meta.schema.names.index(column)
    chunk = meta.row_group(row_group).column(index)
    start = chunk.dictionary_page_offset or chunk.data_page_offset
    at = start + chunk.total_compressed_size // 2
    data = bytearray(path.read_bytes())
    data[at : at + 8] = bytes(b ^ 0x5A for b in data[at : at + 8])
    path.write_bytes(bytes(data))


def with_bad_utf8(table: pa.Table, column: str, row: int) -> pa.Table:
    """``table`` with the text at ``row`` of ``column`` holding bytes that are not UTF-8, typed
    string all the same (as a buggy writer leaves them)."""
    values = [v.encode() for v in table.column(column).to_pylist()]
    values[row] = b"Prompt \xff\xfe broken"
    raw = pa.array(values, pa.binary())
    text = pa.Array.from_buffers(pa.string(), len(values), raw.buffers())
    return table.set_column(table.schema.get_field_index(column), column, text)


# --- damaged Parquet -------------------------------------------------------------------------


def test_a_damaged_page_with_a_checksum_is_refused_mid_run_naming_file_column_and_rows(
    tmp_path: Path, endpoint: LiveEndpoint
) -> None:
    """Uncompressed pages still decode when damaged: without checking the page checksums the
    altered prompts would be sent. With them, the run stops at the damage (exit 2), after
    answering the rows before it."""
    write_parquet(
        tmp_path / "input.parquet", rows_table(3000), row_group_size=1000,
        compression="none", use_dictionary=False, write_page_checksum=True,
    )
    damage(tmp_path / "input.parquet", 2, "prompt")
    job = write_job(tmp_path, endpoint.url, input_path="input.parquet", input={"id_column": None},
                    run={"checkpoint_rows": 250})
    assert refused(invoke(job)).startswith(
        "batchrun: error: cannot read input.parquet as parquet (column 'prompt', row group 2: "
        "rows 2000-2999 of the file): could not verify page integrity, CRC checksum verification failed"
    )
    assert endpoint.log.requests > 0, "the damage was to be found mid-run"
    assert "Prompt \ufffd" not in "".join(endpoint.log.prompts_received)
    assert not (tmp_path / "out" / "result.parquet").exists()
    assert not (tmp_path / "out" / "result.parquet.SUCCESS").exists()


def test_a_damaged_compressed_page_without_checksums_is_refused_naming_file_column_and_rows(
    tmp_path: Path, endpoint: LiveEndpoint
) -> None:
    write_parquet(tmp_path / "input.parquet", rows_table(3000), row_group_size=1000, compression="snappy")
    damage(tmp_path / "input.parquet", 2, "prompt")
    job = write_job(tmp_path, endpoint.url, input_path="input.parquet", input={"id_column": None},
                    run={"checkpoint_rows": 250})
    assert refused(invoke(job)) == (
        "batchrun: error: cannot read input.parquet as parquet (column 'prompt', row group 2: "
        "rows 2000-2999 of the file): Corrupt snappy compressed data."
    )
    assert not (tmp_path / "out" / "result.parquet").exists()


@pytest.mark.parametrize("checksums", [True, False])
def test_damage_in_the_first_row_group_is_found_while_planning_before_anything_is_sent(
    tmp_path: Path, endpoint: LiveEndpoint, checksums: bool
) -> None:
    write_parquet(
        tmp_path / "input.parquet", rows_table(3000), row_group_size=1000, write_page_checksum=checksums
    )
    damage(tmp_path / "input.parquet", 0, "prompt")
    job = write_job(tmp_path, endpoint.url, input_path="input.parquet")
    assert refused(invoke(job)).startswith(
        "batchrun: error: cannot read input.parquet as parquet (column 'prompt', row group 0: "
        "rows 0-999 of the file): "
    )
    assert endpoint.log.requests == 0


def test_a_truncated_parquet_file_is_refused_naming_it(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "input.parquet", rows_table(100))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    job = write_job(tmp_path, "builtin", input_path="input.parquet")
    assert refused(invoke(job)) == (
        f"batchrun: error: {job}: input.path: cannot read input.parquet as parquet: Parquet magic "
        "bytes not found in footer. Either the file is corrupted or this is not a parquet file."
    )


# --- text that is not UTF-8 ------------------------------------------------------------------


def test_a_prompt_that_is_not_utf8_is_refused_mid_run_naming_file_column_and_row(
    tmp_path: Path, endpoint: LiveEndpoint
) -> None:
    """pyarrow's Parquet reader does not check UTF-8; rendering such a prompt raised
    UnicodeDecodeError (exit 1)."""
    table = with_bad_utf8(rows_table(3000), "prompt", 2345)
    write_parquet(tmp_path / "input.parquet", table, row_group_size=1000)
    job = write_job(tmp_path, endpoint.url, input_path="input.parquet", run={"checkpoint_rows": 250})
    assert refused(invoke(job)) == (
        "batchrun: error: input.parquet: column 'prompt' holds text that is not UTF-8 at row 2345 "
        "of the file; Parquet strings must be UTF-8"
    )
    assert endpoint.log.requests > 0, "the bad row was to be found mid-run"
    assert not (tmp_path / "out" / "result.parquet").exists()


def test_an_id_that_is_not_utf8_is_refused_while_planning_naming_the_file_and_row(
    tmp_path: Path, endpoint: LiveEndpoint
) -> None:
    """polars aborts on such a string (a PanicException, which no ``except Exception`` catches)."""
    parts = tmp_path / "parts"
    parts.mkdir()
    write_parquet(parts / "part-1.parquet", rows_table(40))
    write_parquet(parts / "part-2.parquet", with_bad_utf8(pa.Table.from_pylist(prompt_rows(40, start=40)), "id", 17))
    job = write_job(tmp_path, endpoint.url, input_path="parts/*.parquet")
    assert refused(invoke(job)) == (
        "batchrun: error: part-2.parquet: column 'id' holds text that is not UTF-8 at row 17 of the "
        "file; Parquet strings must be UTF-8"
    )
    assert endpoint.log.requests == 0


# --- types and globs -------------------------------------------------------------------------


def test_numbers_are_sent_as_their_python_text(tmp_path: Path, endpoint: LiveEndpoint) -> None:
    """3 -> "3", 2.5 -> "2.5", Decimal("2.50") -> "2.50", in a prompt column and in a template."""
    table = pa.table({
        "id": ["a", "b"],
        "n": pa.array([3, -7], pa.int32()),
        "x": [2.5, 1e20],
        "d": pa.array([decimal.Decimal("2.50"), decimal.Decimal("-0.1")], pa.decimal128(5, 2)),
    })
    write_parquet(tmp_path / "input.parquet", table)
    job = write_job(tmp_path, endpoint.url, input_path="input.parquet", input={"prompt_column": "n"})
    assert invoke(job).exit_code == 0
    assert sorted(endpoint.log.prompts_received) == ["-7", "3"]
    job = write_job(
        tmp_path, endpoint.url, input_path="input.parquet", output_path="out/t.parquet",
        input={"prompt_column": None, "template": "{n}|{x}|{d}"},
    )
    assert invoke(job).exit_code == 0
    assert sorted(endpoint.log.prompts_received[2:]) == ["-7|1e+20|-0.10", "3|2.5|2.50"]


def test_a_glob_whose_files_disagree_only_on_nullability_is_answered_exactly(
    tmp_path: Path, endpoint: LiveEndpoint
) -> None:
    """One writer declares its columns not null, another does not; Arrow refused to put their
    rows in one table (exit 1)."""
    parts = tmp_path / "parts"
    parts.mkdir()
    first, second = prompt_rows(30), prompt_rows(30, start=30)
    strict = pa.schema([pa.field(c, pa.string(), nullable=False) for c in first[0]])
    write_parquet(parts / "part-1.parquet", pa.Table.from_pylist(first, schema=strict))
    write_parquet(parts / "part-2.parquet", pa.Table.from_pylist(second))
    job = write_job(tmp_path, endpoint.url, input_path="parts/*.parquet", run={"checkpoint_rows": 16})
    assert invoke(job).exit_code == 0
    assert_exact(tmp_path / "out" / "result.parquet", first + second)


# --- the sample a run reads before its first request -------------------------------------------


def test_check_sample_reads_only_the_first_row_group_of_each_parquet_file(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "input.parquet", rows_table(3000), row_group_size=1000)
    damage(path, 1, "prompt")
    spec = open_job(write_job(tmp_path, "builtin", input_path="input.parquet"))
    inputcheck.check_sample(spec)  # the damage lies past the sample
    write_parquet(path, rows_table(3000), row_group_size=1000)
    damage(path, 0, "id")
    with pytest.raises(JobError, match=r"^cannot read input\.parquet as parquet \(column 'id', row group 0: "):
        inputcheck.check_sample(spec)


def test_check_sample_reads_only_the_first_block_of_each_csv_file(tmp_path: Path) -> None:
    rows = prompt_rows(20000)  # about 1 MB: several 256 KB blocks
    write_csv(tmp_path / "input.csv", rows)
    raw = (tmp_path / "input.csv").read_bytes()
    (tmp_path / "input.csv").write_bytes(raw.replace(b"Prompt number 19000:", b"Prompt \xff\xfe 19000:"))
    spec = open_job(write_job(tmp_path, "builtin"))
    inputcheck.check_sample(spec)  # the bad byte lies past the first block
    (tmp_path / "input.csv").write_bytes(raw.replace(b"Prompt number 7:", b"Prompt \xff\xfe 7:"))
    with pytest.raises(JobError, match=r"^cannot read input\.csv as csv: .*UTF8"):
        inputcheck.check_sample(spec)


# --- an input changed since the plan --------------------------------------------------------------


def set_mtime(path: Path, mtime_ns: int) -> None:
    os.utime(path, ns=(mtime_ns, mtime_ns))


def edit_in_place(path: Path, old: bytes, new: bytes) -> None:
    """Replace ``old`` by ``new`` (same length) in ``path``, keeping its size."""
    assert len(old) == len(new)
    data = path.read_bytes()
    assert data.count(old) == 1
    path.write_bytes(data.replace(old, new))


def plan_of(folder: Path) -> dict[str, Any]:
    return json.loads((state_of(folder) / "plan.json").read_text(encoding="utf-8"))


CHANGED = (
    "batchrun: error: this job has saved progress from a different input or settings: the input "
    "files (names, sizes or contents) differ. Restore them, or run with --restart to discard the "
    "progress in "
)


def test_the_plan_records_each_files_size_mtime_and_whole_content_sha256(tmp_path: Path, make_job: MakeJob) -> None:
    job = make_job(20, url="builtin")
    assert invoke(job.path).exit_code == 0
    st = (tmp_path / "input.csv").stat()
    assert plan_of(tmp_path)["version"] == 2
    assert plan_of(tmp_path)["fingerprint"] == [{
        "path": str(tmp_path / "input.csv"), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
        "sha256": hashlib.sha256((tmp_path / "input.csv").read_bytes()).hexdigest(),
    }]


def test_a_same_size_edit_with_a_new_mtime_after_completion_is_refused(tmp_path: Path, make_job: MakeJob) -> None:
    """Without an id column rows are keyed by position: the edited input cannot be resumed."""
    job = make_job(50, url="builtin", input={"id_column": None})
    assert invoke(job.path).exit_code == 0
    mtime = (tmp_path / "input.csv").stat().st_mtime_ns
    edit_in_place(tmp_path / "input.csv", b"Prompt number 25:", b"Prompt numbex 25:")
    set_mtime(tmp_path / "input.csv", mtime + 10**9)
    assert refused(invoke(job.path)) == CHANGED + f"{job.state()}"


@pytest.mark.slow
def test_a_same_size_edit_in_the_middle_of_a_file_over_64_mb_is_caught(tmp_path: Path) -> None:
    """The previous fingerprint hashed only the first and last MB of a file over 64 MB, so this
    edit yielded "nothing to do" and a stale output."""
    rows = [{"prompt": f"Prompt number {i}", "pad": "x" * (2 << 20)} for i in range(34)]
    write_csv(tmp_path / "input.csv", rows)
    assert (tmp_path / "input.csv").stat().st_size > 64 << 20
    job = write_job(tmp_path, "builtin", input={"id_column": None}, run={"checkpoint_rows": 8})
    assert invoke(job).exit_code == 0
    mtime = (tmp_path / "input.csv").stat().st_mtime_ns
    edit_in_place(tmp_path / "input.csv", b"Prompt number 17,", b"Prompt numbex 17,")
    set_mtime(tmp_path / "input.csv", mtime + 10**9)
    assert refused(invoke(job)) == CHANGED + f"{state_of(tmp_path)}"


def test_a_same_size_edit_with_a_new_mtime_is_planned_incrementally_with_an_id_column(
    tmp_path: Path, endpoint: LiveEndpoint, make_job: MakeJob
) -> None:
    rows = prompt_rows(50)
    job = make_job(rows, url=endpoint.url)
    assert invoke(job.path).exit_code == 0
    mtime = (tmp_path / "input.csv").stat().st_mtime_ns
    edit_in_place(tmp_path / "input.csv", b"Prompt number 25:", b"Prompt numbex 25:")
    set_mtime(tmp_path / "input.csv", mtime + 10**9)
    sent = len(endpoint.log.prompts_received)
    result = invoke(job.path)
    assert result.exit_code == 0, result.output
    assert "input changed: 49 rows reused, 1 changed, 0 new" in result.stdout
    assert endpoint.log.prompts_received[sent:] == ["Prompt numbex 25: say something"]
    rows[25]["prompt"] = "Prompt numbex 25: say something"
    assert_exact(tmp_path / "out" / "result.parquet", rows)


def test_a_copy_with_a_new_mtime_but_the_same_bytes_is_accepted_and_its_new_mtime_recorded(
    tmp_path: Path, endpoint: LiveEndpoint, make_job: MakeJob
) -> None:
    job = make_job(50, url=endpoint.url, input={"id_column": None})
    assert invoke(job.path).exit_code == 0
    before = plan_of(tmp_path)
    shutil.copyfile(tmp_path / "input.csv", tmp_path / "copy.csv")
    (tmp_path / "copy.csv").replace(tmp_path / "input.csv")
    mtime = before["fingerprint"][0]["mtime_ns"] + 10**9
    set_mtime(tmp_path / "input.csv", mtime)
    requests = endpoint.log.requests
    result = invoke(job.path)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("batchrun: nothing to do: all 50 rows are done")
    assert endpoint.log.requests == requests
    # Recorded, so the next run trusts the file by its size and mtime instead of hashing it.
    assert plan_of(tmp_path) == {**before, "fingerprint": [{**before["fingerprint"][0], "mtime_ns": mtime}]}


def test_an_edit_that_keeps_both_size_and_mtime_is_trusted_unread_the_documented_limit(
    tmp_path: Path, endpoint: LiveEndpoint, make_job: MakeJob
) -> None:
    """A resume reads nothing of a file whose size and mtime equal the plan's: that is what keeps
    it fast, and why an edit whose mtime is set back goes unnoticed (README, [input])."""
    job = make_job(50, url=endpoint.url, input={"id_column": None})
    assert invoke(job.path).exit_code == 0
    mtime = (tmp_path / "input.csv").stat().st_mtime_ns
    edit_in_place(tmp_path / "input.csv", b"Prompt number 25:", b"Prompt numbex 25:")
    set_mtime(tmp_path / "input.csv", mtime)
    result = invoke(job.path)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("batchrun: nothing to do: all 50 rows are done")


def as_version_1(folder: Path) -> None:
    """Rewrite the job's plan as batchrun wrote it before version 2: ``sample_sha256`` (the whole
    file's sha256, for a file up to 64 MB) and no ``sha256``."""
    plan = plan_of(folder)
    plan["version"] = 1
    plan["fingerprint"] = [
        {"path": f["path"], "size": f["size"], "mtime_ns": f["mtime_ns"], "sample_sha256": f["sha256"]}
        for f in plan["fingerprint"]
    ]
    (state_of(folder) / "plan.json").write_text(json.dumps(plan), encoding="utf-8")


def test_a_plan_of_version_1_still_resumes_compared_by_its_sample_hash(tmp_path: Path, endpoint: LiveEndpoint, make_job: MakeJob) -> None:
    job = make_job(50, url=endpoint.url, input={"id_column": None})
    assert invoke(job.path).exit_code == 0
    as_version_1(tmp_path)
    old = plan_of(tmp_path)
    set_mtime(tmp_path / "input.csv", old["fingerprint"][0]["mtime_ns"] + 10**9)  # v1 ignores mtimes
    result = invoke(job.path)
    assert result.stdout.startswith("batchrun: nothing to do: all 50 rows are done"), result.output
    assert plan_of(tmp_path) == old, "a version 1 plan is compared the old way, never rewritten"
    edit_in_place(tmp_path / "input.csv", b"Prompt number 25:", b"Prompt numbex 25:")
    assert refused(invoke(job.path)) == CHANGED + f"{job.state()}"


def test_a_plan_from_a_newer_batchrun_is_refused_not_misread(tmp_path: Path, make_job: MakeJob) -> None:
    job = make_job(10, url="builtin")
    assert invoke(job.path).exit_code == 0
    plan = {**plan_of(tmp_path), "version": 3}
    (job.state() / "plan.json").write_text(json.dumps(plan), encoding="utf-8")
    assert refused(invoke(job.path)) == (
        "batchrun: error: the saved progress was planned by a newer batchrun (plan version 3); "
        "run it with that version, or run with --restart to discard it"
    )
