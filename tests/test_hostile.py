"""Hostile inputs, jobs and endpoints, as a new user meets them: one table, one exit code and one
first message line each. None may exit 1 (that code means a bug), print a traceback, or change a
file batchrun did not write."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import invoke, prompt_rows, write_csv, write_job
from endpoint import LiveEndpoint, Rule
from test_inputs import damage, with_bad_utf8

from batchrun import run_job
from batchrun.checkpoint import RunState
from batchrun.inputcheck import open_job

BATCHRUN = Path(sys.executable).with_name("batchrun")


@dataclass
class Case:
    """``setup(folder, url)`` writes the job (and its input) into ``folder`` and returns the
    command's arguments; the run must exit ``code`` with a first error line (or, for exit 0 and 3,
    a summary line) matching the regex ``first``."""

    name: str
    setup: Callable[[Path, str], list[Any]]
    code: int
    first: str
    rule: Rule | None = None
    sends: bool | None = None  # True: the endpoint must get requests; False: none
    wrap: list[str] = field(default_factory=list)  # run in a subprocess under this command
    mid_run: bool = False  # found only while rows are read or answered, so not by `validate`
    validate_first: str | None = None  # validate's first line, where it words the problem otherwise


# --- setups ------------------------------------------------------------------------------------


def job_csv(n: int = 10, **kwargs: Any) -> Callable[[Path, str], list[Any]]:
    def setup(folder: Path, url: str) -> list[Any]:
        write_csv(folder / "input.csv", prompt_rows(n))
        return [write_job(folder, url, **kwargs)]

    return setup


def job_parquet(table: pa.Table, *, input_path: str = "input.parquet", **kwargs: Any) -> Callable[[Path, str], list[Any]]:
    def setup(folder: Path, url: str) -> list[Any]:
        pq.write_table(table, folder / "input.parquet")
        return [write_job(folder, url, input_path=input_path, **kwargs)]

    return setup


def raw_job(text: str, input_rows: int = 4) -> Callable[[Path, str], list[Any]]:
    def setup(folder: Path, url: str) -> list[Any]:
        write_csv(folder / "input.csv", prompt_rows(input_rows))
        (folder / "job.toml").write_text(text.replace("URL", url), encoding="utf-8")
        return [folder / "job.toml"]

    return setup


def with_files(inner: Callable[[Path, str], list[Any]], make: Callable[[Path], None]) -> Callable[[Path, str], list[Any]]:
    def setup(folder: Path, url: str) -> list[Any]:
        args = inner(folder, url)
        make(folder)
        return args

    return setup


def prompts_table(prompts: list[Any], type_: pa.DataType | None = None) -> pa.Table:
    return pa.table({"id": pa.array([f"r{i}" for i in range(len(prompts))], pa.string()), "prompt": pa.array(prompts, type_)})


def symlink_output_to_input(folder: Path) -> None:
    (folder / "out").mkdir()
    (folder / "out" / "result.parquet").symlink_to(folder / "input.parquet")


def hard_link_output_to_input(folder: Path) -> None:
    (folder / "out").mkdir()
    os.link(folder / "input.parquet", folder / "out" / "result.parquet")


def foreign_output(folder: Path) -> None:
    (folder / "out").mkdir()
    pq.write_table(pa.table({"mine": [1, 2, 3]}), folder / "out" / "result.parquet")


def run_first(changed: dict[str, Any]) -> Callable[[Path, str], list[Any]]:
    """A job completed once, then edited: ``changed`` holds the new sections."""

    def setup(folder: Path, url: str) -> list[Any]:
        write_csv(folder / "input.csv", prompt_rows(6))
        job = write_job(folder, url)
        assert run_job(job).exit_code == 0
        return [write_job(folder, url, **changed)]

    return setup


def run_once_already(folder: Path, url: str) -> list[Any]:
    """A job that has run once against the same endpoint (which answered some rows)."""
    job = job_csv()(folder, url)[0]
    assert run_job(job).exit_code == 3
    return [job]


def locked(folder: Path, url: str) -> list[Any]:
    job = job_csv()(folder, url)[0]
    spec = open_job(job)
    state = RunState(spec.state_dir)
    holder = state.lock()
    holder.__enter__()
    _held.append(holder)
    return [job]


_held: list[Any] = []


def closed_port(folder: Path, url: str) -> list[Any]:
    with LiveEndpoint() as gone:
        dead = gone.url
    return job_csv(n=20)(folder, dead)


def big_parquet(n: int = 6000) -> pa.Table:
    return pa.Table.from_pylist(prompt_rows(n))


def damaged(row_group: int) -> Callable[[Path], None]:
    def make(folder: Path) -> None:
        pq.write_table(big_parquet(), folder / "input.parquet", row_group_size=2000, compression="none",
                       write_page_checksum=True)
        damage(folder / "input.parquet", row_group, "prompt")

    return make


def truncated(folder: Path) -> None:
    data = (folder / "input.parquet").read_bytes()
    (folder / "input.parquet").write_bytes(data[: len(data) // 2])


def glob_of_two_types(folder: Path, url: str) -> list[Any]:
    (folder / "data").mkdir()
    pq.write_table(pa.table({"id": [1, 2], "prompt": ["a", "b"]}), folder / "data" / "a.parquet")
    pq.write_table(pa.table({"id": ["3", "4"], "prompt": ["c", "d"]}), folder / "data" / "b.parquet")
    return [write_job(folder, url, input_path="data/*.parquet", input={"id_column": None})]


def edited_after_completion(folder: Path, url: str) -> list[Any]:
    """A job without an id column, completed, then one prompt edited in place (same size)."""
    write_csv(folder / "input.csv", prompt_rows(6))
    job = write_job(folder, url, input={"id_column": None})
    assert run_job(job).exit_code == 0
    data = (folder / "input.csv").read_bytes()
    (folder / "input.csv").write_bytes(data.replace(b"Prompt number 3:", b"Prompt number 9:"))
    return [job]


# Prompts with surrounding whitespace and CRLF, which some servers trim before echoing.
SPACED = prompts_table(["  first\r\n", "second\n", " third ", "fourth\r\nline\r\n"])

# --- the table ---------------------------------------------------------------------------------

E = r"batchrun: error: "
JOB = r"\S+job\.toml: "

CASES = [
    # the job file
    Case("malformed TOML", raw_job("[input\npath = 1"), 2, E + JOB + "malformed TOML: "),
    Case("unknown key, with a suggestion", job_csv(run={"concurency": 2}), 2,
         E + JOB + r"unknown key 'concurency' in \[run\] \(did you mean 'concurrency'\?\)"),
    Case("a literal key in the job file", job_csv(endpoint={"api_key": "sk-live-1"}), 2,
         E + JOB + "endpoint.api_key: a key never sits in a job file"),
    Case("an unset key variable", job_csv(endpoint={"api_key_env": "BATCHRUN_HOSTILE_UNSET"}), 2,
         E + JOB + "endpoint.api_key_env: environment variable BATCHRUN_HOSTILE_UNSET is not set"),
    Case("plain http to a remote host", job_csv(endpoint={"api_base": "http://example.com/x"}), 2,
         E + JOB + "endpoint.api_base: plain http is only for loopback addresses"),
    Case("a positional template placeholder", job_csv(input={"prompt_column": None, "template": "Q: {}"}), 2,
         E + JOB + "input.template: placeholders must name a column"),
    Case("a template naming no column", job_csv(input={"prompt_column": None, "template": "Q: {{x}}"}), 2,
         E + JOB + "input.template: must name at least one column"),
    Case("batch_size of zero", job_csv(run={"batch_size": 0}), 2, E + JOB + r"run.batch_size: must be >= 1 \(got 0\)"),
    # the input
    Case("a missing input file", job_csv(input_path="nope.csv"), 2, E + JOB + r"input.path: input file not found: \S+nope.csv"),
    Case("a glob matching nothing", job_csv(input_path="data/*.csv"), 2, E + JOB + r"input.path: no file matches 'data/\*.csv'"),
    Case("a prompt column not in the input", job_csv(input={"prompt_column": "promt"}), 2,
         E + JOB + r"input.prompt_column: column 'promt' is not in the input .*did you mean 'prompt'\?"),
    Case("an input column named like a result column",
         job_parquet(pa.table({"id": ["a"], "prompt": ["p"], "output": ["x"]})), 2,
         E + JOB + r"input.path: input column\(s\) 'output' clash with the columns batchrun adds"),
    Case("duplicate ids", job_parquet(pa.table({"id": ["a", "b", "a"], "prompt": ["p", "q", "r"]})), 2,
         E + JOB + r"input.id_column: column 'id' must be unique; duplicated: 'a'"),
    Case("a null id", job_parquet(pa.table({"id": ["a", None], "prompt": ["p", "q"]})), 2,
         E + JOB + r"input.id_column: column 'id' is null at input row 1"),
    Case("a CSV with no header", with_files(job_csv(), lambda f: (f / "input.csv").write_text("")), 2,
         E + JOB + r"input.path: input.csv is empty: a CSV input needs a header row"),
    Case("a CSV of only a header", with_files(job_csv(), lambda f: (f / "input.csv").write_text("id,prompt\n")), 2,
         E + JOB + "input.path: the input has no rows"),
    Case("a CSV with bytes that are not UTF-8",
         with_files(job_csv(), lambda f: (f / "input.csv").write_bytes(b"id,prompt\nr1,caf\xe9\n")), 2,
         E + r"cannot read input.csv as csv: "),
    Case("a CSV row longer than csv_max_row_mb",
         with_files(job_csv(input={"csv_max_row_mb": 0.01}),
                    lambda f: (f / "input.csv").write_text("id,prompt\nr1," + "x" * 40_000 + "\n")), 2,
         E + r"input.csv: a CSV row is longer than input.csv_max_row_mb"),
    Case("an empty Parquet file", job_parquet(prompts_table([], pa.string())), 2,
         E + JOB + "input.path: the input has no rows"),
    Case("a file that is not Parquet", with_files(job_parquet(prompts_table(["a"])),
                                                  lambda f: (f / "input.parquet").write_bytes(b"not parquet at all")), 2,
         E + JOB + r"input.path: cannot read input.parquet as parquet"),
    # the output
    Case("output.path is the input file", job_parquet(prompts_table(["a", "b"]), output_path="input.parquet"), 2,
         E + JOB + r"output.path: \S+input.parquet is an input file"),
    Case("output.path reaches the input through ..",
         job_parquet(prompts_table(["a", "b"]), output_path="out/../input.parquet"), 2,
         E + JOB + r"output.path: \S+input.parquet is an input file"),
    Case("output.path is a symlink to the input",
         with_files(job_parquet(prompts_table(["a", "b"])), symlink_output_to_input), 2,
         E + JOB + r"output.path: \S+input.parquet is an input file"),
    Case("output.path is a hard link to the input",
         with_files(job_parquet(prompts_table(["a", "b"])), hard_link_output_to_input), 2,
         E + JOB + r"output.path: \S+result.parquet is an input file"),
    Case("output.path matches the input glob",
         job_parquet(prompts_table(["a", "b"]), input_path="*.parquet", output_path="answers.parquet"), 2,
         E + JOB + r"output.path: \S+answers.parquet matches the input pattern '\*.parquet'"),
    Case("a file at output.path this job did not write", with_files(job_csv(), foreign_output), 2,
         E + JOB + r"output.path: \S+result.parquet already exists and this job did not write it"),
    Case("output.path is a folder", with_files(job_csv(), lambda f: (f / "out" / "result.parquet").mkdir(parents=True)), 2,
         E + JOB + "output.path: is a directory, not a file"),
    Case("output.path not ending in .parquet", job_csv(output_path="out/result.csv"), 2,
         E + JOB + r"output.path: must end in .parquet"),
    Case("a read-only output folder", with_files(job_csv(output_path="ro/out/result.parquet"),
                                                 lambda f: (f / "ro").mkdir()), 74,
         E + r"cannot write \S+ro/out: read-only file system",
         validate_first=E + r"cannot write \S+ro/out: the folder \S+ro is not writable",
         wrap=["unshare", "-rm", "sh", "-c", 'mount --bind ro ro && mount -o remount,bind,ro ro && exec "$0" "$@"']),
    # saved progress
    Case("params changed since the saved progress", run_first({"params": {"max_tokens": 9}}), 2,
         E + r"this job has saved progress from a different input or settings: params: "),
    Case("another run holds the lock", locked, 75, E + r"another run holds this job \(pid \d+ on "),
    # rows and the endpoint
    Case("empty and null prompts are skipped, the rest succeed",
         job_parquet(prompts_table(["a", "", None, "   ", "b"])), 0,
         r"batchrun: complete: 2/5 rows succeeded, 3 skipped \(empty prompt\); ", sends=True),
    Case("every prompt empty: nothing sent, nothing failed", job_parquet(prompts_table(["", None])), 0,
         r"batchrun: complete: 0/2 rows succeeded, 2 skipped \(empty prompt\); this run answered 0 rows in 0 requests",
         sends=False),
    Case("a prompt the endpoint refuses alone fails alone", job_csv(), 3,
         r"batchrun: complete_with_failed_rows: 9/10 rows succeeded, 1 failed \(rejected 1\); ",
         rule=lambda n, p: "400" if "Prompt number 3: say something" in p else None),
    Case("a rerun of rows the endpoint keeps failing with 500 while it answers others: failed again, not an outage",
         run_once_already, 3, r"batchrun: complete_with_failed_rows: 6/10 rows succeeded, 4 failed \(http_500 4\); ",
         rule=lambda n, p: "500" if "Prompt number 5: say something" in p else None, sends=True),
    Case("a refused key", job_csv(), 4, E + r"the endpoint refused the credentials \(HTTP 401\)",
         rule=lambda n, p: "401"),
    Case("a redirecting endpoint", job_csv(), 4, E + r"the endpoint redirected \(HTTP 307\)",
         rule=lambda n, p: "redirect"),
    # inputs of the wrong kind
    Case("an input path that is a directory", with_files(job_csv(input_path="data"), lambda f: (f / "data").mkdir()), 2,
         E + JOB + r"input.path: \S+data is a directory; name a file, or a glob"),
    Case("a prompt column of lists", job_parquet(prompts_table([["a"], ["b"]])), 2,
         E + JOB + r"input.prompt_column: column 'prompt' is list<string>, not text or a number"),
    Case("a prompt column of structs", job_parquet(prompts_table([{"q": "a"}, {"q": "b"}])), 2,
         E + JOB + r"input.prompt_column: column 'prompt' is struct<q: string>, not text or a number"),
    Case("a prompt column of bytes", job_parquet(prompts_table([b"a", b"b"])), 2,
         E + JOB + r"input.prompt_column: column 'prompt' is binary, not text or a number"),
    Case("an id column of lists",
         job_parquet(pa.table({"id": [[1], [2]], "prompt": ["a", "b"]})), 2,
         E + JOB + r"input.id_column: column 'id' is list<int64>, which cannot be an id"),
    Case("a glob whose files type a column differently", glob_of_two_types, 2,
         E + JOB + r"input.path: column 'id' is int64 in a.parquet but string in b.parquet"),
    Case("a truncated Parquet file", with_files(job_parquet(prompts_table(["a", "b"])), truncated), 2,
         E + JOB + r"input.path: cannot read input.parquet as parquet"),
    Case("a damaged page in the first row group: found before anything is sent",
         with_files(job_csv(input_path="input.parquet"), damaged(0)), 2,
         E + r"cannot read input.parquet as parquet \(column 'prompt', row group 0", sends=False),
    Case("a damaged page in the middle of the file: found mid-run",
         with_files(job_csv(input_path="input.parquet", run={"checkpoint_rows": 500}), damaged(2)), 2,
         E + r"cannot read input.parquet as parquet \(column 'prompt', row group 2", sends=True, mid_run=True),
    Case("prompts that are not UTF-8 in a Parquet file",
         job_parquet(with_bad_utf8(big_parquet(40), "prompt", 33)), 2,
         E + r"input.parquet: column 'prompt' holds text that is not UTF-8 at row 33", mid_run=True),
    Case("a prompt edited in place after completion, without an id column", edited_after_completion, 2,
         E + r"this job has saved progress from a different input or settings: the input files "),
    # endpoints that can never answer usefully: an outage, not failed rows
    Case("a closed port", closed_port, 4, E + r"cannot connect to the endpoint \(ClientConnectorError: ",
         mid_run=True),
    Case("503 to everything, a small job", job_csv(), 4, E + r"the endpoint failed \d+ attempts in a row and has not answered this job once \(last: http_503",
         rule=lambda n, p: "503", mid_run=True),
    Case("echoes that never match", job_csv(), 4, E + r"the endpoint's answers failed validation \d+ attempts in a row",
         rule=lambda n, p: "echo_none", mid_run=True),
    Case("an HTML page with status 200", job_csv(), 4, E + r"the endpoint's answers failed validation .*HTML",
         rule=lambda n, p: "html200", mid_run=True),
    Case("output: [] for every prompt", job_csv(), 4, E + r"the endpoint's answers failed validation ",
         rule=lambda n, p: "every_output_empty", mid_run=True),
    Case("output not a list, every prompt", job_csv(), 4, E + r"the endpoint's answers failed validation ",
         rule=lambda n, p: "every_output_string", mid_run=True),
    Case("answers that are not JSON", job_csv(), 4, E + r"the endpoint's answers failed validation .*not JSON",
         rule=lambda n, p: "invalid_json", mid_run=True),
    Case("echoes trimmed by the endpoint: the message says how to allow it", job_parquet(SPACED), 4,
         E + r"the endpoint's answers failed validation .*echo_match = \"trimmed\"",
         rule=lambda n, p: "echo_trimmed", mid_run=True),
    Case("echoes trimmed by the endpoint, with echo_match = \"trimmed\"",
         job_parquet(SPACED, endpoint={"echo_match": "trimmed"}), 0, r"batchrun: complete: 4/4 rows succeeded",
         rule=lambda n, p: "echo_trimmed", sends=True),
]


@dataclass
class Outcome:
    code: int
    out: str
    err: str
    before: dict[str, str | None]  # the folder's files before the command
    sent: int  # requests the endpoint received during the command


def attempt(case: Case, folder: Path, *command: str) -> Outcome:
    """Set the case up against a live endpoint, then run ``batchrun [command] ARGS`` on it."""
    with LiveEndpoint(rule=case.rule) as ep:
        try:
            args = case.setup(folder, ep.url)
            before, mark = _snapshot(folder), ep.log.requests
            code, out, err = _run(case, [*command, *args], folder)
        finally:
            while _held:
                _held.pop().__exit__(None, None, None)
        sent = ep.log.requests - mark
    assert "Traceback" not in out + err, err
    return Outcome(code, out, err, before, sent)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_each_hostile_case_has_its_exit_code_and_first_line_and_changes_no_file_it_did_not_write(
    tmp_path: Path, case: Case
) -> None:
    got = attempt(case, tmp_path)
    code, out, err = got.code, got.out, got.err
    print(f"{case.name}: exit {code}: {[ln for ln in (err + out).splitlines() if ln.startswith('batchrun: ')][:1]}")
    assert code != 1, err
    assert code == case.code, (out, err)
    lines = err.splitlines() if code not in (0, 3) else out.splitlines()
    first = next((ln for ln in lines if ln.startswith("batchrun: ")), "")
    assert re.match(case.first, first), (first, err)
    if case.sends is not None:
        assert (got.sent > 0) == case.sends, got.sent
    changed = [p for p, digest in got.before.items() if _digest(tmp_path / p) != digest and not _batchruns(p)]
    assert changed == [], f"changed files batchrun did not write: {changed}"


def _run(case: Case, args: list[Any], folder: Path) -> tuple[int, str, str]:
    if not case.wrap:
        result = invoke(*args)
        return result.exit_code, result.stdout, result.stderr
    if shutil.which(case.wrap[0]) is None:
        pytest.skip(f"{case.wrap[0]} is not on this machine")
    proc = subprocess.run(
        [*case.wrap, str(BATCHRUN), *map(str, args)], cwd=folder, capture_output=True, text=True, timeout=60
    )
    return proc.returncode, proc.stdout, proc.stderr


def _snapshot(folder: Path) -> dict[str, str | None]:
    return {str(p.relative_to(folder)): _digest(p) for p in folder.rglob("*") if p.is_file() or p.is_symlink()}


def _digest(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest() if not path.is_dir() else "dir"
    except FileNotFoundError:
        return None


def _batchruns(rel: str) -> bool:
    """batchrun's own files: its run state, summaries and markers (a previous run's output, which
    a rerun may replace, is checked against the state's record by the run itself)."""
    return ".batchrun/" in rel or rel.endswith((".summary.json", ".SUCCESS"))


REFUSED_BEFORE_RUNNING = [c for c in CASES if c.code in (2, 74) and not c.mid_run]


@pytest.mark.parametrize("case", REFUSED_BEFORE_RUNNING, ids=[c.name for c in REFUSED_BEFORE_RUNNING])
def test_validate_refuses_what_run_refuses_before_its_first_request_with_the_same_code_and_line(
    tmp_path: Path, case: Case
) -> None:
    """`batchrun validate` runs every check `run` makes before its first request."""
    got = attempt(case, tmp_path, "validate")
    assert got.sent == 0, "validate sent a request"
    assert got.code == case.code, (got.out, got.err)
    first = next((ln for ln in got.err.splitlines() if ln.startswith("batchrun: ")), "")
    assert _snapshot(tmp_path) == got.before, "validate wrote something"
    assert re.match(case.validate_first or case.first, first), (first, got.err)


def test_the_table_holds_at_least_40_cases() -> None:
    assert len(CASES) >= 40, len(CASES)
    assert len({c.name for c in CASES}) == len(CASES)
