"""The command line: the exact text and exit code a user sees, against a live loopback endpoint."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import polars as pl
import pytest
from aiohttp import web
from click.testing import Result
from conftest import (
    PARAMS,
    MakeJob,
    assert_exact,
    cli,
    expected_output,
    invoke,
    output_of,
    prompt_rows,
    write_csv,
    write_job,
)
from endpoint import LiveEndpoint

from batchrun import server
from batchrun.checkpoint import RunState
from batchrun.inputcheck import open_job

REPO = Path(__file__).resolve().parents[1]
CANARY = "sk-CANARY-123"
OUTPUT_COLUMNS = ["output", "params", "error", "attempts", "latency_s"]


def handled(result: Result) -> bool:
    """The command ended through sys.exit, not an exception escaping the error boundary."""
    return result.exception is None or type(result.exception) is SystemExit


def summary_pattern(
    status: str, ok: int, total: int, answered: int, requests: int, output: Path, *,
    failed: str = "", retries: int = 0, resent: int = 0, causes: str = "",
) -> str:
    causes = re.escape(f": {causes}") if causes else ""
    return (
        rf"batchrun: {status}: {ok}/{total} rows succeeded{re.escape(failed)}; this run answered "
        rf"{answered} rows in {requests} requests \({retries} retries{causes}, {resent} prompts resent\) "
        rf"in \d+\.\ds; output: {re.escape(str(output))}\n"
    )


# -- running ------------------------------------------------------------------------------------


def test_a_run_exits_0_and_prints_one_summary_line(tmp_path: Path, endpoint: LiveEndpoint, make_job: MakeJob) -> None:
    job = make_job(url=endpoint.url)
    result = invoke(job.path)
    assert result.exit_code == 0, result.output
    assert re.fullmatch(summary_pattern("complete", 10, 10, 10, 3, job.output()), result.stdout)
    assert result.stderr == ""
    assert endpoint.log.requests == 3
    assert_exact(job.output(), job.rows)


def test_a_bare_job_argument_runs_it_like_the_run_command(tmp_path: Path, make_job: MakeJob) -> None:
    """`batchrun JOB` and `batchrun run JOB` do the same thing, and share the job's progress."""
    outputs, jobs = [], []
    for name, args in (("bare", []), ("explicit", ["run"])):
        with LiveEndpoint() as ep:
            job = make_job(url=ep.url, folder=tmp_path / name)
            jobs.append(job)
            result = invoke(*args, job.path)
            assert result.exit_code == 0, result.output
            assert re.fullmatch(summary_pattern("complete", 10, 10, 10, 3, job.output()), result.stdout)
            assert ep.log.requests == 3
        outputs.append(assert_exact(job.output(), job.rows).drop("latency_s"))
    assert outputs[0].equals(outputs[1])
    # The other spelling sees the progress the first one saved.
    result = invoke("run", jobs[0].path)
    assert result.stdout == f"batchrun: nothing to do: all 10 rows are done ({jobs[0].output()})\n"


def test_a_rerun_of_a_complete_job_prints_nothing_to_do_and_sends_nothing(
    tmp_path: Path, endpoint: LiveEndpoint, make_job: MakeJob
) -> None:
    job = make_job(url=endpoint.url)
    assert invoke(job.path).exit_code == 0
    result = invoke(job.path)
    assert result.exit_code == 0
    assert result.stdout == f"batchrun: nothing to do: all 10 rows are done ({job.output()})\n"
    assert result.stderr == ""
    assert endpoint.log.requests == 3


def test_progress_is_logged_as_plain_periodic_lines_when_not_on_a_terminal(tmp_path: Path, make_job: MakeJob) -> None:
    """Cron mail gets log lines, not tqdm redraws: no carriage return anywhere."""
    with LiveEndpoint(server.ServerOptions(latency_s=0.05)) as slow:
        # 20 rows, 2 a request, one request at a time: ten requests at least 50 ms apart.
        job = make_job(20, url=slow.url, run={"batch_size": 2, "concurrency": 1})
        result = invoke(job.path, "--log-interval", "0.1")
    assert result.exit_code == 0, result.output
    assert "\r" not in result.stdout + result.stderr
    assert re.fullmatch(summary_pattern("complete", 20, 20, 20, 10, job.output()), result.stdout)
    lines = result.stderr.splitlines()
    line = re.compile(
        r"\d\d:\d\d:\d\d batchrun INFO progress: (\d+)/20 rows done, 0 failed, \d+\.\d rows/s, eta (\d+s|\?)"
    )
    matches = [line.fullmatch(x) for x in lines]
    assert all(matches), lines
    done = [int(m.group(1)) for m in matches if m]
    assert len(done) >= 2, lines
    assert done == sorted(done)
    assert all(0 < d <= 20 for d in done)


def test_quiet_prints_only_the_summary_line(tmp_path: Path, make_job: MakeJob) -> None:
    with LiveEndpoint(server.ServerOptions(latency_s=0.05)) as slow:
        job = make_job(20, url=slow.url, run={"batch_size": 2, "concurrency": 1})
        result = invoke(job.path, "--quiet", "--log-interval", "0.1")
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    assert re.fullmatch(summary_pattern("complete", 20, 20, 20, 10, job.output()), result.stdout)


def test_rows_failing_every_retry_exit_3_and_carry_their_error(tmp_path: Path, make_job: MakeJob) -> None:
    # The endpoint answers the first batch, then 500s. Rows fail only once the endpoint has
    # answered others; one that never answers is an outage (exit 4, tests/test_faults.py).
    first = "Prompt number 0: say something"
    with LiveEndpoint(rule=lambda n, prompts: None if first in prompts else "500") as broken:
        job = make_job(url=broken.url, run={"concurrency": 1})
        result = invoke(job.path)
        # One answered batch, then two batches of up to 4 prompts, each tried 1 + max_retries (3) times.
        assert broken.log.requests == 9
    assert result.exit_code == 3, result.output
    assert re.fullmatch(
        summary_pattern(
            "complete_with_failed_rows", 4, 10, 4, 9, job.output(),
            failed=", 6 failed (http_500 6)", retries=6, resent=18, causes="http_500 6",
        ),
        result.stdout,
    )
    df = pl.read_parquet(job.output())
    assert df["id"].to_list() == [r["id"] for r in job.rows]
    assert df["output"].to_list()[4:] == [None] * 6
    assert df["attempts"].to_list() == [1] * 4 + [4] * 6
    assert df["error"].to_list()[:4] == [None] * 4
    for error in df["error"].to_list()[4:]:
        assert error.startswith("http_500"), error
        assert error.endswith("(gave up after 4 attempts)"), error


def test_an_endpoint_refusing_the_key_exits_4_with_a_message_about_the_key(tmp_path: Path, make_job: MakeJob) -> None:
    with LiveEndpoint(rule=lambda n, prompts: "401") as refusing:
        job = make_job(url=refusing.url)
        result = invoke(job.path)
        # The run stops at the refusal instead of retrying every batch.
        assert 1 <= refusing.log.requests <= 2
    assert result.exit_code == 4
    assert handled(result)
    assert result.stdout.startswith("batchrun: credentials_refused: 0/10 rows succeeded; ")
    assert result.stdout.endswith("; stopped (exit 4), progress kept: run the same command to resume\n")
    assert result.stderr == (
        "batchrun: error: the endpoint refused the credentials (HTTP 401): check the API key "
        '({"message": "injected HTTP 401", "data": []})\n'
    )


def test_debug_shows_the_traceback_of_an_error(tmp_path: Path, make_job: MakeJob) -> None:
    with LiveEndpoint(rule=lambda n, prompts: "401") as refusing:
        job = make_job(url=refusing.url)
        result = invoke(job.path, "--debug")
    assert result.exit_code == 4
    assert "Traceback (most recent call last):" in result.stderr
    assert "AuthError" in result.stderr
    assert result.stderr.endswith("check the API key ({\"message\": \"injected HTTP 401\", \"data\": []})\n")


def test_restart_discards_saved_progress_and_answers_every_row_again(
    tmp_path: Path, endpoint: LiveEndpoint, make_job: MakeJob
) -> None:
    job = make_job(url=endpoint.url)
    assert invoke(job.path).exit_code == 0
    result = invoke(job.path, "--restart")
    assert result.exit_code == 0, result.output
    assert re.fullmatch(summary_pattern("complete", 10, 10, 10, 3, job.output()), result.stdout)
    assert endpoint.log.requests == 6
    assert Counter(endpoint.log.prompts_received) == Counter({r["prompt"]: 2 for r in job.rows})
    assert_exact(job.output(), job.rows)


def test_changed_params_are_refused_pointing_at_restart_which_then_reruns(
    tmp_path: Path, endpoint: LiveEndpoint, make_job: MakeJob
) -> None:
    job = make_job(url=endpoint.url)
    assert invoke(job.path).exit_code == 0
    new_params = {**PARAMS, "max_tokens": 9}
    write_job(tmp_path, endpoint.url, params=new_params)
    result = invoke(job.path)
    assert result.exit_code == 2
    assert handled(result)
    assert result.stdout.startswith("batchrun: state_mismatch: 10/10 rows succeeded; this run answered 0 rows in 0 requests")
    # The message shows the old and new values and the way out.
    assert result.stderr.startswith(
        "batchrun: error: this job has saved progress from a different input or settings: params: {"
    ), result.stderr
    assert "'max_tokens': 6" in result.stderr and "'max_tokens': 9" in result.stderr
    assert result.stderr.endswith(
        f"Restore them, or run with --restart to discard the progress in {job.output()}.batchrun\n"
    )
    assert len(result.stderr.splitlines()) == 1
    assert endpoint.log.requests == 3
    result = invoke(job.path, "--restart")
    assert result.exit_code == 0, result.output
    assert_exact(job.output(), job.rows, new_params)


def test_a_second_run_of_a_job_already_running_exits_75_naming_the_holder(
    tmp_path: Path, endpoint: LiveEndpoint, make_job: MakeJob
) -> None:
    job = make_job(url=endpoint.url)
    spec = open_job(job.path)
    with RunState(spec.state_dir).lock():
        result = invoke(job.path)
    assert result.exit_code == 75
    assert result.stdout == ""
    assert re.fullmatch(
        rf"batchrun: error: another run holds this job \(pid {os.getpid()} on "
        rf"{re.escape(socket.gethostname())} since [^)]+\); lock: {re.escape(str(spec.state_dir / 'lock'))}\n",
        result.stderr,
    ), result.stderr
    assert endpoint.log.requests == 0
    # Once the holder is gone the same command runs.
    assert invoke(job.path).exit_code == 0


def test_a_utf8_bom_csv_runs_end_to_end_with_its_ids_intact(tmp_path: Path, endpoint: LiveEndpoint) -> None:
    rows = prompt_rows(3)
    body = "id,topic,prompt\r\n" + "".join(f"{r['id']},{r['topic']},{r['prompt']}\r\n" for r in rows)
    (tmp_path / "input.csv").write_bytes(b"\xef\xbb\xbf" + body.encode())
    job = write_job(tmp_path, endpoint.url)
    result = invoke(job)
    assert result.exit_code == 0, result.output
    df = assert_exact(output_of(tmp_path), rows)
    assert df.columns == ["id", "topic", "prompt", *OUTPUT_COLUMNS]


# -- keys ---------------------------------------------------------------------------------------


class HeaderRecordingEndpoint(LiveEndpoint):
    """The live endpoint, also keeping each POST's Authorization header."""

    def __init__(self) -> None:
        super().__init__()
        self.authorization: list[str | None] = []

    @web.middleware
    async def _middleware(self, request: web.Request, handler):  # type: ignore[override]
        if request.method == "POST":
            self.authorization.append(request.headers.get("Authorization"))
        return await super()._middleware(request, handler)


def test_the_key_is_sent_as_a_bearer_token_and_never_written_or_printed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make_job: MakeJob
) -> None:
    monkeypatch.setenv("BATCHRUN_TEST_KEY", CANARY)
    with HeaderRecordingEndpoint() as ep:
        job = make_job(url=ep.url, endpoint={"api_key_env": "BATCHRUN_TEST_KEY"})
        results = [invoke("validate", job.path), invoke(job.path), invoke(job.path)]
    assert [r.exit_code for r in results] == [0, 0, 0]
    assert ep.authorization == [f"Bearer {CANARY}"] * 3
    assert_exact(job.output(), job.rows)
    for r in results:
        assert CANARY not in r.stdout + r.stderr
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert job.output() in written
    assert any(p.parent.name == "segments" for p in written)
    for path in written:
        assert CANARY.encode() not in path.read_bytes(), path


def test_no_authorization_header_is_sent_without_api_key_env(tmp_path: Path, make_job: MakeJob) -> None:
    with HeaderRecordingEndpoint() as ep:
        job = make_job(url=ep.url)
        assert invoke(job.path).exit_code == 0
    assert ep.authorization == [None] * 3


@pytest.mark.parametrize("command", [[], ["validate"]])
def test_an_unset_api_key_env_variable_exits_2_naming_it(
    tmp_path: Path, endpoint: LiveEndpoint, monkeypatch: pytest.MonkeyPatch, command: list[str], make_job: MakeJob
) -> None:
    monkeypatch.delenv("BATCHRUN_TEST_UNSET_KEY", raising=False)
    job = make_job(url=endpoint.url, endpoint={"api_key_env": "BATCHRUN_TEST_UNSET_KEY"})
    result = invoke(*command, job.path)
    assert result.exit_code == 2
    assert handled(result)
    assert result.stdout == ""
    assert result.stderr == (
        f"batchrun: error: {job.path}: endpoint.api_key_env: environment variable BATCHRUN_TEST_UNSET_KEY "
        "is not set (it should hold the endpoint's API key)\n"
    )
    assert endpoint.log.requests == 0
    assert not job.output().exists()


def test_a_literal_key_in_the_job_exits_2_without_printing_it(tmp_path: Path, endpoint: LiveEndpoint, make_job: MakeJob) -> None:
    job = make_job(url=endpoint.url, endpoint={"api_key": CANARY})
    result = invoke(job.path)
    assert result.exit_code == 2
    assert CANARY not in result.output
    assert result.stderr == (
        f"batchrun: error: {job.path}: endpoint.api_key: a key never sits in a job file; put it in an "
        "environment variable and name that variable with endpoint.api_key_env\n"
    )
    assert endpoint.log.requests == 0


# -- validate and invalid jobs ------------------------------------------------------------------


def test_validate_prints_the_plan_and_sends_and_writes_nothing(tmp_path: Path, endpoint: LiveEndpoint, make_job: MakeJob) -> None:
    job = make_job(url=endpoint.url)
    result = invoke("validate", job.path)
    assert result.exit_code == 0, result.output
    assert result.stdout == (
        f"job:          {job.path}\n"
        "input:        1 csv file(s), 10 rows, 3 columns\n"
        "prompt:       column 'prompt'; id column 'id'\n"
        f"endpoint:     {endpoint.url} model 'test-model'\n"
        "params:       {'max_tokens': 6, 'temperature': 0.5, 'top_p': 0.9, 'top_k': 20}\n"
        "requests:     up to 3 of 4 prompts, at most 2 in flight\n"
        f"output:       {job.output()}\n"
        f"state:        {job.output()}.batchrun (new run)\n"
        "batchrun: job is valid\n"
    )
    assert result.stderr == ""
    assert endpoint.log.requests == 0
    assert not (tmp_path / "out").exists()


def test_validate_after_a_run_says_the_job_has_saved_progress(tmp_path: Path, endpoint: LiveEndpoint, make_job: MakeJob) -> None:
    job = make_job(url=endpoint.url)
    assert invoke(job.path).exit_code == 0
    result = invoke("validate", job.path)
    assert result.exit_code == 0
    assert f"state:        {job.output()}.batchrun (has saved progress)\n" in result.stdout
    assert endpoint.log.requests == 3


def test_validate_of_a_template_job_shows_the_template(tmp_path: Path, endpoint: LiveEndpoint, make_job: MakeJob) -> None:
    job = make_job(url=endpoint.url, input={"prompt_column": None, "id_column": None, "template": "About {topic}"},
        params={}, run={"batch_size": 3, "concurrency": 5},
    )
    result = invoke("validate", job.path)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert "prompt:       template 'About {topic}'" in lines
    assert "params:       (endpoint defaults)" in lines
    assert "requests:     up to 4 of 3 prompts, at most 5 in flight" in lines


@pytest.mark.parametrize("command", [[], ["run"], ["validate"]])
def test_an_invalid_job_exits_2_with_each_problem_on_its_own_line(
    tmp_path: Path, endpoint: LiveEndpoint, command: list[str], make_job: MakeJob
) -> None:
    job = make_job(url=endpoint.url, input={"prompt_column": "promt"}, params={"top_p": 1.5}, run={"concurency": 2},
    )
    result = invoke(*command, job.path)
    assert result.exit_code == 2
    assert handled(result)
    assert result.stdout == ""
    assert sorted(result.stderr.splitlines()) == sorted(
        [
            f"batchrun: error: {job.path}: unknown key 'concurency' in [run] (did you mean 'concurrency'?)",
            f"batchrun: error: {job.path}: params.top_p: must be <= 1.0 (got 1.5)",
            f"batchrun: error: {job.path}: input.prompt_column: column 'promt' is not in the input "
            "(columns: id, topic, prompt); did you mean 'prompt'?",
        ]
    )
    assert result.stderr.endswith("\n")
    assert endpoint.log.requests == 0


def test_a_missing_job_file_exits_2(tmp_path: Path) -> None:
    result = invoke(tmp_path / "nope.toml")
    assert result.exit_code == 2
    assert result.stderr == f"batchrun: error: {tmp_path / 'nope.toml'}: job file not found\n"


def test_duplicate_ids_exit_2_naming_them_before_anything_is_sent(tmp_path: Path, endpoint: LiveEndpoint, make_job: MakeJob) -> None:
    rows = prompt_rows(4)
    rows[3]["id"] = rows[1]["id"]
    job = make_job(rows, url=endpoint.url)
    for command in (["validate"], []):
        result = invoke(*command, job.path)
        assert result.exit_code == 2
        assert result.stderr == (
            f"batchrun: error: {job.path.resolve()}: input.id_column: column 'id' must be unique; "
            "duplicated: 'r000001'\n"
        )
    assert endpoint.log.requests == 0


def test_an_output_path_that_is_a_directory_is_refused_before_anything_is_sent(
    tmp_path: Path, endpoint: LiveEndpoint, make_job: MakeJob
) -> None:
    """Finding out only after every row was paid for, with a traceback, is the wrong time."""
    job = make_job(url=endpoint.url)
    job.output().mkdir(parents=True)
    for command in (["validate"], []):
        result = invoke(*command, job.path)
        assert result.exit_code == 2, result.output
        assert handled(result), result.exception
        assert result.stderr.startswith(f"batchrun: error: {job.path}: output.path: "), result.stderr
    assert endpoint.log.requests == 0


def test_an_unexpected_error_is_one_message_line_without_a_traceback(tmp_path: Path, make_job: MakeJob) -> None:
    """The output folder cannot be made (a file stands in its place): the user gets a message."""
    job = make_job(2, url="builtin")
    (tmp_path / "out").write_text("not a folder")
    proc = cli(job.path, cwd=tmp_path)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("batchrun: error: "), proc.stderr
    assert str(tmp_path / "out") in proc.stderr
    assert len(proc.stderr.splitlines()) == 1, proc.stderr


def test_serve_help_describes_its_options() -> None:
    result = invoke("serve", "--help")
    assert result.exit_code == 0
    assert result.stdout.startswith("Usage: batchrun serve [OPTIONS]\n")
    for option in ("--host TEXT", "--port INTEGER RANGE", "--latency-ms FLOAT RANGE", "--per-prompt-ms FLOAT RANGE"):
        assert option in result.stdout


def test_top_level_help_names_the_three_commands() -> None:
    result = invoke("--help")
    assert result.exit_code == 0
    for line in (
        "batchrun JOB.toml            run or resume a job (same as `batchrun run JOB.toml`)",
        "batchrun validate JOB.toml   check a job and print its plan; sends nothing",
        "batchrun serve               run the reference endpoint",
    ):
        assert line in result.stdout


# -- the installed command, in a process of its own ---------------------------------------------


def test_the_example_job_runs_from_another_directory_then_has_nothing_to_do(tmp_path: Path) -> None:
    """`batchrun jobs/example.toml` needs no server started by hand and no particular cwd."""
    project = tmp_path / "project"
    shutil.copytree(REPO / "jobs", project / "jobs")
    shutil.copytree(REPO / "sample_data", project / "sample_data")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    output = project / "out" / "example.parquet"

    first = cli("../project/jobs/example.toml", cwd=elsewhere)
    assert first.returncode == 0, first.stderr
    assert re.fullmatch(summary_pattern("complete", 20, 20, 20, 5, output), first.stdout), first.stdout
    assert re.fullmatch(
        r"\d\d:\d\d:\d\d batchrun INFO started the builtin reference endpoint at "
        r"http://127\.0\.0\.1:\d+/inference\n",
        first.stderr,
    ), first.stderr
    assert list(elsewhere.iterdir()) == []

    inputs = pl.read_csv(project / "sample_data" / "capitals.csv")
    df = pl.read_parquet(output)
    assert df.columns == [*inputs.columns, *OUTPUT_COLUMNS]
    assert df["id"].to_list() == inputs["id"].to_list()
    assert df["error"].to_list() == [None] * 20
    params = {"max_tokens": 8, "temperature": 0.7, "top_p": 1.0, "top_k": 40}
    for prompt, got in zip(df["prompt"], df["output"]):
        assert got.to_list() == expected_output(prompt, params, model="custom/meta-llama/Llama-2-13b-hf")

    again = cli("../project/jobs/example.toml", cwd=elsewhere)
    assert again.returncode == 0, again.stderr
    assert again.stdout == f"batchrun: nothing to do: all 20 rows are done ({output})\n"
    assert again.stderr == ""


def test_an_invalid_job_exits_2_without_a_traceback_from_the_installed_command(tmp_path: Path) -> None:
    write_csv(tmp_path / "input.csv", prompt_rows(2))
    write_job(tmp_path, "builtin", input={"template": "Q: {question}"}, run={"concurrency": 0})
    proc = cli("job.toml", cwd=tmp_path)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""
    assert sorted(proc.stderr.splitlines()) == sorted(
        [
            "batchrun: error: job.toml: run.concurrency: must be >= 1 (got 0)",
            "batchrun: error: job.toml: input: set exactly one of prompt_column and template (got both)",
            "batchrun: error: job.toml: input.template: column 'question' is not in the input "
            "(columns: id, topic, prompt)",
        ]
    )
    assert not (tmp_path / "out").exists()


def test_an_unset_key_variable_exits_2_from_the_installed_command(tmp_path: Path, make_job: MakeJob) -> None:
    job = make_job(2, url="builtin", endpoint={"api_key_env": "BATCHRUN_TEST_UNSET_KEY"})
    proc = cli("job.toml", cwd=tmp_path, unset=("BATCHRUN_TEST_UNSET_KEY",))
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr == (
        f"batchrun: error: {job.path}: endpoint.api_key_env: environment variable BATCHRUN_TEST_UNSET_KEY "
        "is not set (it should hold the endpoint's API key)\n"
    )


_POOL_PROBE = (
    "import os\n"
    "from batchrun.memory import use_lean_memory_pool\n"
    "use_lean_memory_pool()\n"
    "import pyarrow as pa\n"
    "print(os.environ.get('JE_ARROW_MALLOC_CONF'), pa.default_memory_pool().backend_name)\n"
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="pyarrow's wheels carry jemalloc on Linux")
@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ({}, ["dirty_decay_ms:0,muzzy_decay_ms:0", "jemalloc"]),
        ({"JE_ARROW_MALLOC_CONF": "dirty_decay_ms:500"}, ["dirty_decay_ms:500", "jemalloc"]),
        ({"ARROW_DEFAULT_MEMORY_POOL": "system"}, ["None", "system"]),
    ],
    ids=["default", "own-jemalloc-conf-kept", "own-pool-kept"],
)
def test_batchrun_processes_use_jemalloc_returning_freed_pages_at_once_unless_the_user_chose(
    given: dict[str, str], expected: list[str]
) -> None:
    # What the CLI and the Airflow operator do before pyarrow is imported (batchrun.memory): the
    # figures it is chosen for are in tests/benchmarks/RESULTS.md; a user's own choice wins.
    env = {k: v for k, v in os.environ.items() if k not in ("JE_ARROW_MALLOC_CONF", "ARROW_DEFAULT_MEMORY_POOL")}
    done = subprocess.run(
        [sys.executable, "-c", _POOL_PROBE], env={**env, **given}, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == expected
