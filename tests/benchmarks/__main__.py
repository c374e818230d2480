"""The benchmark suite (issue 5): ``python -m tests.benchmarks [SECTION ...] [--smoke]``.

Sections (all by default, in this order):

- ``throughput``: for each (concurrency C, batch size B) the reference endpoint runs in its own
  process with latency L per request plus p per prompt, so the ideal rate is C*B/(L + B*p).
  In one run against the same endpoint: ``blast`` (pre-built bodies, responses not parsed: the
  endpoint's own ceiling, which must sit well above the ideal), the hand-written grouped loop,
  batchrun, a one-prompt-per-request loop, and LiteLLM's ``batch_completion`` when litellm is
  installed. Each gets prompts/s at steady state, the ratio to the ideal and to the grouped loop,
  CPU per 1,000 prompts and peak RSS.
- ``cost``: an endpoint that answers at once; CPU seconds per 1,000 prompts of batchrun and of the
  grouped loop, and where batchrun's go (reading, prompts, JSON, checkpointing, writing).
- ``memory``: peak RSS of whole batchrun runs over 1M and 10M rows, CSV and Parquet, and over
  rows carrying a few KB of extra columns; the finish (writing the output) timed in each.
- ``resume``: a 10M-row job 99% done (its last 1% of checkpoint segments removed): seconds from
  start to the first request, and to the end.
- ``vllm`` (only when named): a real vLLM OpenAI-compatible server serving a tiny random-weight
  model on CPU (tests/realvllm.py; the vLLM venv's python in BATCHRUN_VLLM_PYTHON, or a running
  server given by ``--vllm-api-base``). Greedy ``/v1/completions``, prompts/s of a packed loop
  (B prompts per request, C in flight) and of one prompt per request, in alternating rounds so
  that a change in the machine's load falls on every contender alike.

Every contender is its own process, reaped with ``wait4`` for its own CPU and peak RSS. Inputs
and outputs go under ``--workdir`` (default: a folder in the system temp dir), never the repo.
``--smoke`` runs every section at a tiny size in a minute or so; CI runs it through
``tests/test_benchmarks.py`` and checks the figures are there, never how fast they are.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .harness import BATCHRUN, Endpoint, machine, py_module, run_child, write_job

SECTIONS = ("throughput", "cost", "memory", "resume")
# Run only when named: they need software batchrun's venv does not have.
OPTIONAL_SECTIONS = ("vllm",)


@dataclass(frozen=True)
class Cell:
    concurrency: int
    batch: int
    latency_ms: float
    per_prompt_ms: float
    prompts: int
    single_prompts: int  # the one-prompt-per-request loop is C*B times slower: it gets fewer

    @property
    def ideal(self) -> float:
        return self.concurrency * self.batch / ((self.latency_ms + self.batch * self.per_prompt_ms) / 1000)


def throughput_cells(smoke: bool) -> list[Cell]:
    if smoke:
        return [Cell(4, 8, 20, 0.5, 1600, 80)]
    cells = []
    # Latency is set so that the ideal rate stays near 4,000-6,000 prompts/s: what two shared
    # cores can carry for the endpoint (one process) and a client together. `blast` shows the
    # endpoint's ceiling at each setting, so an endpoint limit is never mistaken for batchrun's.
    for c, b, latency_ms in [(8, 16, 50), (64, 16, 250), (64, 64, 1000), (256, 16, 1000), (256, 64, 3000)]:
        cell = Cell(c, b, latency_ms, 0.5, 0, 0)
        rounds = 12  # each worker sends about this many requests: start-up and tail are small
        cells.append(
            Cell(c, b, latency_ms, 0.5, max(20_000, rounds * c * b), max(2 * c, int(cell.ideal / b * 4)))
        )
    return cells


# -- inputs ---------------------------------------------------------------------------------------
def input_file(workdir: Path, rows: int, fmt: str, wide_kb: float = 0.0) -> Path:
    """A benchmark input, made once per size and kept in ``workdir`` for later runs."""
    name = f"input-{rows}{'-wide' + str(wide_kb) if wide_kb else ''}.{fmt}"
    path = workdir / "inputs" / name
    if not path.exists():
        args = [str(path), "--rows", str(rows)] + (["--wide-kb", str(wide_kb)] if wide_kb else [])
        made = run_child(py_module("data", *args))
        if made.code != 0:
            raise RuntimeError(f"could not write {path}: {made.stderr[-2000:]}")
        say(f"  made {name}: {made.report.get('bytes', 0) / 1e6:.0f} MB in {made.wall_s:.0f}s")
    return path


# -- one contender ----------------------------------------------------------------------------------
def contender(kind: str, ep: Endpoint, *, concurrency: int, batch: int, inp: Path, out: Path,
              limit: int | None = None, job: Path | None = None, split: bool = False,
              timeout_s: float = 7200) -> dict[str, Any]:
    ep_cpu = ep.cpu_s()
    if kind == "batchrun":
        assert job is not None
        cmd = py_module("baselines", "batchrun", "--job", str(job), *(["--split"] if split else []))
    elif kind == "blast":
        cmd = py_module("baselines", "blast", "--url", ep.url, "--concurrency", str(concurrency),
                        "--batch", str(batch), "--prompts", str(limit))
    else:
        cmd = py_module("baselines", kind, "--url", ep.url, "--concurrency", str(concurrency),
                        "--batch", str(batch), "--input", str(inp), "--out", str(out),
                        *(["--limit", str(limit)] if limit else []))
    r = run_child(cmd, timeout_s=timeout_s)
    if r.code != 0 or not r.report:
        raise RuntimeError(f"{kind} failed (exit {r.code}): {r.stderr[-3000:]}")
    rep = r.report
    prompts = int(rep["prompts"])
    return {
        "kind": kind,
        "prompts": prompts,
        "rate": rep["rate"],
        "steady_rate": rep["steady_rate"],
        "wall_s": r.wall_s,
        "cpu_s": r.cpu_s,
        "cpu_per_1k": 1000 * r.cpu_s / prompts if prompts else math.nan,
        "work_cpu_per_1k": 1000 * rep["work_cpu_s"] / prompts if prompts else math.nan,
        "maxrss_mb": r.maxrss_mb,
        "endpoint_cpu_s": ep.cpu_s() - ep_cpu,
        **{k: rep[k] for k in ("split", "finish_s", "status", "requests", "prompts_resent", "failed_calls") if rep.get(k) is not None},
    }


def litellm_available() -> bool:
    probe = run_child([sys.executable, "-c", "import os; os.environ['LITELLM_LOCAL_MODEL_COST_MAP'] = 'True'; import litellm"],
                      timeout_s=120)
    return probe.code == 0


# -- sections ---------------------------------------------------------------------------------------
def run_throughput(workdir: Path, smoke: bool) -> list[dict[str, Any]]:
    say("\n## throughput: prompts/s at steady state (10%..90% of prompts answered)")
    with_litellm = litellm_available()
    if not with_litellm:
        say("  (litellm is not installed: its batch_completion is left out)")
    rows = []
    for cell in throughput_cells(smoke):
        inp = input_file(workdir, cell.prompts, "parquet")
        out = workdir / "out"
        out.mkdir(parents=True, exist_ok=True)
        say(f"\n### C={cell.concurrency} B={cell.batch} L={cell.latency_ms:g} ms + {cell.per_prompt_ms:g} ms/prompt: "
            f"ideal {cell.ideal:,.0f} prompts/s, {cell.prompts:,} prompts")
        with Endpoint(latency_ms=cell.latency_ms, per_prompt_ms=cell.per_prompt_ms) as ep:
            job = write_job(workdir / "throughput.toml", input_path=inp, output_path=out / "throughput.parquet",
                            api_base=ep.url, batch_size=cell.batch, concurrency=cell.concurrency)
            common = dict(concurrency=cell.concurrency, batch=cell.batch, inp=inp, out=out / "baseline.parquet")
            results = [contender("blast", ep, limit=cell.prompts, **common)]
            results.append(contender("grouped", ep, **common))
            results.append(contender("batchrun", ep, job=job, **common))
            results.append(contender("single", ep, limit=cell.single_prompts, **common))
            if with_litellm:
                results.append(contender("litellm", ep, limit=cell.single_prompts, **common))
        grouped = next(r for r in results if r["kind"] == "grouped")["steady_rate"]
        say("| contender | prompts | prompts/s | of ideal | of grouped | CPU s/1k prompts | peak RSS MB |")
        say("|---|---:|---:|---:|---:|---:|---:|")
        for r in results:
            r.update(concurrency=cell.concurrency, batch=cell.batch, latency_ms=cell.latency_ms,
                     per_prompt_ms=cell.per_prompt_ms, ideal=cell.ideal,
                     of_ideal=r["steady_rate"] / cell.ideal, of_grouped=r["steady_rate"] / grouped if grouped else math.nan)
            say(f"| {r['kind']} | {r['prompts']:,} | {r['steady_rate']:,.0f} | {r['of_ideal']:.3f} | "
                f"{r['of_grouped']:.3f} | {r['cpu_per_1k']:.3f} | {r['maxrss_mb']:.0f} |"
                + (f" ({r['failed_calls']} calls failed: left out)" if r.get("failed_calls") else ""))
        rows += results
    return rows


def run_cost(workdir: Path, smoke: bool) -> list[dict[str, Any]]:
    n = 20_000 if smoke else 400_000
    say(f"\n## cost: CPU per 1,000 prompts against an endpoint that answers at once ({n:,} prompts, C=8, B=16)")
    inp = input_file(workdir, n, "parquet")
    out = workdir / "out"
    out.mkdir(parents=True, exist_ok=True)
    with Endpoint() as ep:
        job = write_job(workdir / "cost.toml", input_path=inp, output_path=out / "cost.parquet",
                        api_base=ep.url, batch_size=16, concurrency=8)
        grouped = contender("grouped", ep, concurrency=8, batch=16, inp=inp, out=out / "baseline.parquet")
        plain = contender("batchrun", ep, concurrency=8, batch=16, inp=inp, out=out, job=job)
        split = contender("batchrun", ep, concurrency=8, batch=16, inp=inp, out=out, job=job, split=True)
    say("| contender | CPU s/1k prompts (process) | of grouped | endpoint CPU s/1k |")
    say("|---|---:|---:|---:|")
    for r in (grouped, plain):
        say(f"| {r['kind']} | {r['cpu_per_1k']:.4f} | {r['cpu_per_1k'] / grouped['cpu_per_1k']:.2f} | "
            f"{1000 * r['endpoint_cpu_s'] / r['prompts']:.4f} |")
    total = split["cpu_s"]
    say(f"\nwhere batchrun's CPU goes (a run with the split timers on: {1000 * total / split['prompts']:.4f} s/1k):")
    say("| part | CPU s | s/1k prompts | share |")
    say("|---|---:|---:|---:|")
    parts = dict(split.get("split") or {})
    parts["event loop, aiohttp, engine, start-up (the rest)"] = total - sum(parts.values())
    for name, secs in parts.items():
        say(f"| {name} | {secs:.2f} | {1000 * secs / split['prompts']:.4f} | {secs / total:.0%} |")
    for r, label in ((grouped, "grouped"), (plain, "batchrun"), (split, "batchrun --split")):
        r["label"] = label
    return [grouped, plain, split]


def memory_cases(smoke: bool) -> list[tuple[int, str, float]]:
    if smoke:
        return [(20_000, "csv", 0.0), (20_000, "parquet", 0.0), (5_000, "parquet", 3.0)]
    return [(1_000_000, "csv", 0.0), (1_000_000, "parquet", 0.0),
            (1_000_000, "csv", 3.0), (1_000_000, "parquet", 3.0),
            (10_000_000, "csv", 0.0), (10_000_000, "parquet", 0.0),
            # 10M rows of 3 KB: 23 GB of Parquet input or 31 GB of CSV, and 23 GB of output each.
            # Their inputs are deleted after their case (see run_memory), so ~55 GB free is enough.
            (10_000_000, "parquet", 3.0), (10_000_000, "csv", 3.0)]


# Inputs at least this large are deleted once their memory case is measured, so that the next
# one fits on the disk; they are made again (5-10 minutes) the next time they are needed.
DROP_INPUT_BYTES = 10 << 30


def memory_job(workdir: Path, ep: Endpoint, n: int, fmt: str, wide: float) -> tuple[Path, Path, Path]:
    """Input, job file and output of a memory case (``resume`` reuses the largest ones)."""
    inp = input_file(workdir, n, fmt, wide)
    name = f"memory-{n}-{fmt}{'-wide' if wide else ''}"
    out = workdir / "out" / f"{name}.parquet"
    out.parent.mkdir(parents=True, exist_ok=True)
    job = write_job(workdir / f"{name}.toml", input_path=inp, output_path=out,
                    api_base=ep.url, batch_size=64, concurrency=16)
    return inp, job, out


def run_memory(workdir: Path, smoke: bool) -> list[dict[str, Any]]:
    say("\n## memory: peak RSS of whole `batchrun JOB --quiet` runs (plan, requests, checkpoints, output), "
        "C=16 B=64, instant endpoint")
    say("| rows | format | extra columns | input MB | peak RSS MB | wall s | rows/s | writing the output s |")
    say("|---:|---|---|---:|---:|---:|---:|---:|")
    largest = max(c[0] for c in memory_cases(smoke))
    rows = []
    with Endpoint() as ep:
        for n, fmt, wide in memory_cases(smoke):
            inp, job, out = memory_job(workdir, ep, n, fmt, wide)
            run = run_child([BATCHRUN, str(job), "--quiet", "--restart"], timeout_s=7200)
            if run.code != 0:
                raise RuntimeError(f"batchrun {job} failed (exit {run.code}): {run.stderr[-3000:]}")
            summary = json.loads(out.with_name(out.name + ".summary.json").read_text(encoding="utf-8"))
            r = {"kind": "batchrun", "rows": n, "format": fmt, "wide_kb": wide,
                 "input_mb": inp.stat().st_size / 1e6, "maxrss_mb": run.maxrss_mb, "wall_s": run.wall_s,
                 "cpu_s": run.cpu_s, "write_output_s": summary["write_output_s"],
                 "answered": summary["rows_answered_this_run"], "output_rows": _parquet_rows(out)}
            if r["output_rows"] != n or r["answered"] != n:
                raise RuntimeError(f"the {n}-row run answered {r['answered']} rows and wrote {r['output_rows']}")
            say(f"| {n:,} | {fmt} | {f'~{wide:g} KB/row' if wide else 'none'} | {r['input_mb']:,.0f} | "
                f"{r['maxrss_mb']:.0f} | {r['wall_s']:.0f} | {n / r['wall_s']:,.0f} | {r['write_output_s']:.1f} |")
            rows.append(r)
            if n < largest or wide:  # the largest narrow jobs stay: `resume` starts from them
                shutil.rmtree(out.with_name(out.name + ".batchrun"), ignore_errors=True)
                out.unlink(missing_ok=True)
            if inp.stat().st_size >= DROP_INPUT_BYTES:
                inp.unlink()
                say(f"  deleted {inp.name} ({r['input_mb']:,.0f} MB) to make room for the next case")
    return rows


def run_resume(workdir: Path, smoke: bool) -> list[dict[str, Any]]:
    n = max(c[0] for c in memory_cases(smoke))
    say(f"\n## resume: a {n:,}-row job 99% done (its last 1% of segments removed); seconds to the first request")
    say("| format | segments redone | to first request s | to end s | rows sent | peak RSS MB |")
    say("|---|---:|---:|---:|---:|---:|")
    rows = []
    with Endpoint() as ep:
        for fmt in ("parquet", "csv"):
            _, job, out = memory_job(workdir, ep, n, fmt, 0.0)
            state = out.with_name(out.name + ".batchrun")
            if not (state / "finished.json").exists():
                first = run_child([BATCHRUN, str(job), "--quiet"])
                if first.code != 0:
                    raise RuntimeError(f"the full run failed: {first.stderr[-2000:]}")
            segments = sorted((state / "segments").glob("seg-*.parquet"))
            cut = segments[len(segments) - max(1, len(segments) // 100):]
            for f in cut:
                f.unlink()
            (state / "finished.json").unlink(missing_ok=True)
            before = ep.stats()["prompts"]
            r = run_child([BATCHRUN, str(job), "--quiet"], on_start=lambda proc: _first_request(ep, proc))
            if r.code != 0:
                raise RuntimeError(f"the resume failed: {r.stderr[-2000:]}")
            sent = ep.stats()["prompts"] - before
            first_s = r.report.get("on_start", {}).get("first_request_s", math.nan)
            say(f"| {fmt} | {len(cut)} of {len(segments)} | {first_s:.2f} | {r.wall_s:.1f} | {sent:,} | {r.maxrss_mb:.0f} |")
            rows.append({"format": fmt, "rows": n, "segments": len(segments), "redone": len(cut),
                         "first_request_s": first_s, "wall_s": r.wall_s, "maxrss_mb": r.maxrss_mb, "sent": sent})
    return rows


@dataclass(frozen=True)
class VllmContender:
    kind: str
    batch: int
    concurrency: int
    prompts: int


def vllm_contenders(smoke: bool, prompts: int = 512, rounds: int = 3) -> tuple[list[VllmContender], int, int]:
    """The contenders, the number of alternating rounds and max_tokens."""
    n = 48 if smoke else prompts
    if smoke:
        contenders = [VllmContender("vllm-packed", 8, 2, n), VllmContender("vllm-single", 1, 4, n),
                      VllmContender("batchrun-b8", 8, 2, n)]
    else:
        # batchrun (openai-completions) at B = 1, 16, 64 against the packed loop and one prompt a
        # request, each at the concurrency that suited it on this server.
        contenders = [VllmContender("vllm-packed", 16, 4, n), VllmContender("batchrun-b16", 16, 4, n),
                      VllmContender("vllm-single", 1, 8, n), VllmContender("batchrun-b1", 1, 8, n),
                      VllmContender("batchrun-b64", 64, 2, n)]
    return contenders, 1 if smoke else rounds, 4 if smoke else 16


def vllm_command(c: VllmContender, api_base: str, inp: Path, max_tokens: int) -> list[str]:
    """The child process of one contender; a new kind of contender is a new branch here."""
    if c.kind in ("vllm-packed", "vllm-single"):
        return py_module("baselines", "openai", "--url", api_base, "--concurrency", str(c.concurrency),
                         "--batch", str(c.batch), "--input", str(inp), "--limit", str(c.prompts),
                         "--max-tokens", str(max_tokens), "--model", "tiny")
    if c.kind.startswith("batchrun-"):
        # batchrun itself: protocol "openai-completions", the same greedy params, B and C; the
        # input holds exactly the contenders' prompts, and each run restarts from nothing.
        job = inp.parent / f"vllm-{c.kind}.toml"
        job.write_text("\n".join([
            "[input]", f'path = "{inp}"', 'prompt_column = "prompt"', 'id_column = "id"',
            "", "[endpoint]", 'protocol = "openai-completions"', f'api_base = "{api_base}"', 'model = "tiny"',
            "timeout_s = 600",
            "", "[params]", f"max_tokens = {max_tokens}", "temperature = 0",
            "", "[run]", f"batch_size = {c.batch}", f"concurrency = {c.concurrency}", "max_retries = 3",
            "", "[output]", f'path = "{inp.parent / f"vllm-{c.kind}.parquet"}"', "",
        ]), encoding="utf-8")
        return py_module("baselines", "batchrun", "--job", str(job), "--digest")
    raise ValueError(f"unknown vLLM contender {c.kind!r}")


def run_vllm(
    workdir: Path, smoke: bool, api_base: str | None = None, prompts: int = 512, rounds: int = 3,
    only: tuple[str, ...] = (),
) -> list[dict[str, Any]]:
    from contextlib import ExitStack

    from ..realvllm import MODEL_DIR_ENV, PYTHON_ENV, VllmServer, make_tiny_model, vllm_python

    contenders, rounds, max_tokens = vllm_contenders(smoke, prompts, rounds)
    if only:
        contenders = [c for c in contenders if c.kind in only]
    say(f"\n## vllm: a real vLLM server on CPU (tiny random-weight Llama), greedy /v1/completions, "
        f"max_tokens {max_tokens}; prompts/s at steady state, {rounds} alternating round(s)")
    python = vllm_python()
    if api_base is None and python is None:
        raise SystemExit(f"the vllm section needs {PYTHON_ENV} (a vLLM venv's python) or --vllm-api-base")
    inp = input_file(workdir, max(c.prompts for c in contenders), "parquet")
    with ExitStack() as stack:
        if api_base is None:
            assert python is not None
            started = time.monotonic()
            model = make_tiny_model(Path(os.environ.get(MODEL_DIR_ENV) or workdir / "tiny-llama"), python=python)
            made_s = time.monotonic() - started
            server = stack.enter_context(VllmServer(python, model, log_path=workdir / "vllm-server.log"))
            say(f"  model ready in {made_s:.0f}s, server ready in {server.ready_s:.0f}s ({server.api_base})")
            api_base = server.api_base
        # One unrecorded packed run first: the server's first requests are slower.
        warm = run_child(vllm_command(VllmContender("vllm-packed", 8, 2, 32), api_base, inp, max_tokens), timeout_s=600)
        if warm.code != 0:
            raise RuntimeError(f"the warm-up failed (exit {warm.code}): {warm.stderr[-3000:]}")
        runs: dict[str, list[dict[str, Any]]] = {c.kind: [] for c in contenders}
        for _ in range(rounds):
            for c in contenders:
                r = run_child(vllm_command(c, api_base, inp, max_tokens), timeout_s=1800)
                if r.code != 0 or not r.report:
                    raise RuntimeError(f"{c.kind} failed (exit {r.code}): {r.stderr[-3000:]}")
                runs[c.kind].append({**r.report, "cpu_s": r.cpu_s, "maxrss_mb": r.maxrss_mb})
    say("| contender | B | C | prompts | prompts/s (median) | each round | CPU s/1k prompts | outputs digest |")
    say("|---|---:|---:|---:|---:|---|---:|---|")
    rows = []
    for c in contenders:
        rs = runs[c.kind]
        rates = [r["steady_rate"] for r in rs]
        median = sorted(rates)[len(rates) // 2]
        digests = sorted({r.get("outputs_sha", "") for r in rs})
        row = {"kind": c.kind, "batch": c.batch, "concurrency": c.concurrency, "max_tokens": max_tokens,
               "expected_prompts": c.prompts, "prompts": min(int(r["prompts"]) for r in rs),
               "steady_rate": median, "rates": rates, "cpu_per_1k": 1000 * sum(r["cpu_s"] for r in rs) / sum(r["prompts"] for r in rs),
               "outputs_sha": digests}
        say(f"| {c.kind} | {c.batch} | {c.concurrency} | {row['prompts']:,} | {median:,.0f} | "
            f"{' / '.join(f'{x:,.0f}' for x in rates)} | {row['cpu_per_1k']:.2f} | {', '.join(digests)} |")
        rows.append(row)
    same = len({d for r in rows for d in r["outputs_sha"]}) == 1
    say(f"\nevery contender's greedy outputs identical (by digest): {'yes' if same else 'NO'}")
    return rows


def _first_request(ep: Endpoint, proc: Any) -> dict[str, float]:
    started = time.monotonic()
    before = ep.stats()["requests"]
    while proc.poll() is None:
        if ep.stats()["requests"] > before:
            return {"first_request_s": time.monotonic() - started}
        time.sleep(0.01)
    return {}


def _parquet_rows(path: Path) -> int:
    probe = run_child([sys.executable, "-c",
                       f"import pyarrow.parquet as pq, json; print(json.dumps({{'rows': pq.read_metadata({str(path)!r}).num_rows}}))"])
    return int(probe.report["rows"])


def say(text: str) -> None:
    print(text, flush=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m tests.benchmarks", description=__doc__.splitlines()[0])
    ap.add_argument("sections", nargs="*", metavar="SECTION",
                    help=f"any of {', '.join(SECTIONS + OPTIONAL_SECTIONS)} (default: {', '.join(SECTIONS)})")
    ap.add_argument("--smoke", action="store_true", help="every section at a tiny size (CI)")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "batchrun-bench")
    ap.add_argument("--json", type=Path, help="also write every figure to this JSON file")
    ap.add_argument("--vllm-prompts", type=int, default=512, help="vllm: prompts per contender run")
    ap.add_argument("--vllm-rounds", type=int, default=3, help="vllm: alternating rounds")
    ap.add_argument("--vllm-only", default="", help="vllm: a comma-separated subset of the contenders")
    ap.add_argument("--vllm-api-base", help="vllm: a running server's http://HOST:PORT/v1 instead of starting one")
    args = ap.parse_args(argv)
    unknown = set(args.sections) - set(SECTIONS + OPTIONAL_SECTIONS)
    if unknown:
        ap.error(f"unknown section(s) {sorted(unknown)}; choose from {', '.join(SECTIONS + OPTIONAL_SECTIONS)}")
    sections = args.sections or list(SECTIONS)
    args.workdir.mkdir(parents=True, exist_ok=True)
    info = machine()
    say(f"# batchrun benchmarks{' (smoke)' if args.smoke else ''}, {time.strftime('%Y-%m-%d %H:%M')}")
    say(f"machine: {info['nproc']} cores ({info['cpu']}), {info['memory']}, Python {info['python']}, "
        f"Linux {info['kernel']}, load {info['load']}")
    results: dict[str, Any] = {"machine": info, "smoke": args.smoke}
    runners = {"throughput": run_throughput, "cost": run_cost, "memory": run_memory, "resume": run_resume,
               "vllm": lambda workdir, smoke: run_vllm(
        workdir, smoke, args.vllm_api_base, args.vllm_prompts, args.vllm_rounds,
        tuple(k for k in args.vllm_only.split(",") if k))}
    for name in SECTIONS + OPTIONAL_SECTIONS:
        if name in sections:
            started = time.monotonic()
            results[name] = runners[name](args.workdir, args.smoke)
            say(f"({name}: {time.monotonic() - started:.0f}s)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str), encoding="utf-8")


if __name__ == "__main__":
    main()
