"""Hostile inputs, jobs and endpoints, as a new user meets them: one table, one exit code and one
first message line each. None may exit 1 (that code means a bug), print a traceback, or change a
file batchrun did not write."""

from __future__ import annotations

import hashlib
import json
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

from batchrun import run_job
from batchrun.checkpoint import RunState
from batchrun.config import load_job

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


def locked(folder: Path, url: str) -> list[Any]:
    job = job_csv()(folder, url)[0]
    spec = load_job(job)
    state = RunState(spec.state_dir)
    holder = state.lock()
    holder.__enter__()
    _held.append(holder)
    return [job]


_held: list[Any] = []


def closed_port() -> str:
    with LiveEndpoint() as gone:
        return gone.url


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
    Case("a refused key", job_csv(), 4, E + r"the endpoint refused the credentials \(HTTP 401\)",
         rule=lambda n, p: "401"),
    Case("a redirecting endpoint", job_csv(), 4, E + r"the endpoint redirected \(HTTP 307\)",
         rule=lambda n, p: "redirect"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_each_hostile_case_has_its_exit_code_and_first_line_and_changes_no_file_it_did_not_write(
    tmp_path: Path, case: Case
) -> None:
    with LiveEndpoint(rule=case.rule) as ep:
        try:
            args = case.setup(tmp_path, ep.url)
            before = _snapshot(tmp_path)
            code, out, err = _run(case, args, tmp_path)
        finally:
            while _held:
                _held.pop().__exit__(None, None, None)
        requests = ep.log.requests
    print(f"{case.name}: exit {code}: {(err or out).splitlines()[:1]}")
    assert "Traceback" not in out + err, err
    assert code != 1, err
    assert code == case.code, (out, err)
    lines = err.splitlines() if code not in (0, 3) else out.splitlines()
    first = next((ln for ln in lines if ln.startswith("batchrun: ")), "")
    assert re.match(case.first, first), (first, err)
    if case.sends is not None:
        assert (requests > 0) == case.sends, requests
    changed = [p for p, digest in before.items() if _digest(tmp_path / p) != digest and not _batchruns(p)]
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


def test_the_table_holds_at_least_40_cases() -> None:
    assert len(CASES) >= 40, len(CASES)
    assert len({c.name for c in CASES}) == len(CASES)
