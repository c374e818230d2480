"""``concurrency = "auto"`` against a sweep of fixed concurrencies on a real vLLM server (issue 15).

    python -m tests.benchmarks.vllm_auto [--api-base http://127.0.0.1:PORT/v1] [--prompts N] [--rounds R]

vLLM's OpenAI-compatible server on CPU serving the tiny random-weight Llama of ``tests/realvllm.py``
(started here from ``BATCHRUN_VLLM_PYTHON`` unless ``--api-base`` names one already running),
greedy ``/v1/completions``, max_tokens 16, B = 16 (the best packing of the ``vllm`` section).
batchrun runs as its own process per contender (``baselines batchrun --digest``, restarting from
nothing each time): ``concurrency = "auto"`` (``max_concurrency`` 64) and fixed concurrencies.

The machine is shared and noisy, so every contender runs once a round, in turn, and the order
turns by one each round (no contender always follows the same one); figures are medians over the
rounds. For each contender: prompts/s over the whole run (planning and writing the output
included: what a user gets, slow start and all), prompts/s at steady state (10%..90% of prompts
answered), retries by cause, failed rows, the limit ``auto`` ended at and its cuts, and a digest
of every output in input order (greedy decoding: all contenders must write the same outputs).
The best fixed setting is the sweep's highest median; ``auto`` is given as a share of it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from .__main__ import input_file, say
from .harness import machine, py_module, run_child

BATCH = 16
MAX_TOKENS = 16
MAX_CONCURRENCY = 64
# 64 is auto's max_concurrency: where auto would sit if nothing ever cut it (vLLM queues, never sheds).
FIXED = (1, 2, 4, 8, 16, 32, 64)


def write_job(folder: Path, name: str, api_base: str, inp: Path, concurrency: int | str) -> Path:
    conc = f'"{concurrency}"' if isinstance(concurrency, str) else str(concurrency)
    job = folder / f"vllm-auto-{name}.toml"
    job.write_text("\n".join([
        "[input]", f'path = "{inp}"', 'prompt_column = "prompt"', 'id_column = "id"',
        "", "[endpoint]", 'protocol = "openai-completions"', f'api_base = "{api_base}"', 'model = "tiny"',
        "timeout_s = 600",
        "", "[params]", f"max_tokens = {MAX_TOKENS}", "temperature = 0",
        "", "[run]", f"batch_size = {BATCH}", f"concurrency = {conc}", f"max_concurrency = {MAX_CONCURRENCY}",
        "max_retries = 3",
        "", "[output]", f'path = "{folder / f"vllm-auto-{name}.parquet"}"', "",
    ]), encoding="utf-8")
    return job


def run_one(job: Path) -> dict[str, Any]:
    r = run_child(py_module("baselines", "batchrun", "--job", str(job), "--digest"), timeout_s=1800)
    if r.code != 0 or not r.report:
        raise RuntimeError(f"{job.name} failed (exit {r.code}): {r.stderr[-3000:]}")
    return {**r.report, "cpu_s": r.cpu_s, "maxrss_mb": r.maxrss_mb, "wall_s": r.wall_s}


def trajectory(limits: list[list[float]] | None, points: int = 12) -> str:
    """The limit's changes as ``limit@seconds``, shortened to about ``points`` entries."""
    if not limits:
        return ""
    step = max(1, len(limits) // points)
    kept = limits[::step] + ([limits[-1]] if (len(limits) - 1) % step else [])
    return " ".join(f"{int(v)}@{t:.1f}" for t, v in kept)


def run(workdir: Path, api_base: str | None, prompts: int, rounds: int,
        fixed: tuple[int, ...] = FIXED) -> dict[str, Any]:
    from ..realvllm import MODEL_DIR_ENV, PYTHON_ENV, VllmServer, make_tiny_model, vllm_python

    workdir.mkdir(parents=True, exist_ok=True)
    info = machine()
    say(f"# vllm auto: {time.strftime('%Y-%m-%d %H:%M')}; machine: {info['nproc']} cores ({info['cpu']}), "
        f"{info['memory']}, Python {info['python']}, Linux {info['kernel']}, load {info['load']}")
    say(f"B = {BATCH}, max_tokens {MAX_TOKENS}, greedy; {prompts:,} prompts per run, {rounds} rounds; "
        f"auto with max_concurrency {MAX_CONCURRENCY}; fixed {', '.join(map(str, fixed))}")
    python = vllm_python()
    if api_base is None and python is None:
        raise SystemExit(f"needs {PYTHON_ENV} (a vLLM venv's python) or --api-base")
    inp = input_file(workdir, prompts, "parquet")
    contenders: list[int | str] = ["auto", *fixed]
    jobs: dict[str, Path] = {}
    runs: dict[str, list[dict[str, Any]]] = {str(c): [] for c in contenders}
    with ExitStack() as stack:
        if api_base is None:
            assert python is not None
            model = make_tiny_model(Path(os.environ.get(MODEL_DIR_ENV) or workdir / "tiny-llama"), python=python)
            server = stack.enter_context(VllmServer(python, model, log_path=workdir / "vllm-server.log"))
            say(f"server ready in {server.ready_s:.0f}s ({server.api_base})")
            api_base = server.api_base
        for c in contenders:
            jobs[str(c)] = write_job(workdir, str(c), api_base, inp, c)
        # One unrecorded run first: the server's first requests are slower.
        warm = run_child(py_module("baselines", "openai", "--url", api_base, "--concurrency", "2", "--batch", "8",
                                   "--input", str(inp), "--limit", "32", "--max-tokens", str(MAX_TOKENS),
                                   "--model", "tiny"), timeout_s=600)
        if warm.code != 0:
            raise RuntimeError(f"the warm-up failed (exit {warm.code}): {warm.stderr[-3000:]}")
        started = time.monotonic()
        for k in range(rounds):
            order = contenders[k % len(contenders):] + contenders[:k % len(contenders)]
            for c in order:
                r = run_one(jobs[str(c)])
                runs[str(c)].append(r)
                say(f"  round {k + 1} {c}: {r['rate']:.0f} prompts/s whole run, {r['steady_rate']:.0f} steady, "
                    f"{r['status']}, retries {r.get('retries_by_cause') or {}}"
                    + (f", limit {r['concurrency_limit']} ({r['concurrency_cuts']} cuts): {trajectory(r.get('limits'))}"
                       if c == "auto" else ""))
        say(f"({time.monotonic() - started:.0f}s of rounds; load now {' '.join(f'{x:.2f}' for x in os.getloadavg())})")
    return {"machine": info, "prompts": prompts, "rounds": rounds, "runs": runs, **table(runs)}


def table(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    say("\n| concurrency | prompts/s whole run (median) | each round | steady prompts/s (median) | each round "
        "| request latency s (C·B/steady) | retries | failed rows | limit at the end (cuts) | CPU s/1k prompts "
        "| outputs digest |")
    say("|---|---:|---|---:|---|---:|---|---:|---|---:|---|")
    medians: dict[str, tuple[float, float]] = {}
    for c, rs in runs.items():
        whole = statistics.median(r["rate"] for r in rs)
        steady = statistics.median(r["steady_rate"] for r in rs)
        medians[c] = (whole, steady)
        retries: dict[str, int] = {}
        for r in rs:
            for cause, n in (r.get("retries_by_cause") or {}).items():
                retries[cause] = retries.get(cause, 0) + n
        limits = ", ".join(f"{r['concurrency_limit']} ({r['concurrency_cuts']})" for r in rs) if c == "auto" else ""
        cpu = 1000 * sum(r["cpu_s"] for r in rs) / max(1, sum(r["prompts"] for r in rs))
        each = " / ".join(f"{r['rate']:.0f}" for r in rs)
        each_steady = " / ".join(f"{r['steady_rate']:.0f}" for r in rs)
        # Little's law: with C requests always in flight, each takes C·B / rate on average.
        latency = f"{int(c) * BATCH / steady:.2f}" if c != "auto" and steady else ""
        say(f"| {c} | {whole:.0f} | {each} | {steady:.0f} | {each_steady} | {latency} | "
            f"{', '.join(f'{k} {v}' for k, v in sorted(retries.items())) or 'none'} | "
            f"{sum(r.get('failed', 0) for r in rs)} | {limits} | {cpu:.2f} | "
            f"{', '.join(sorted({r.get('outputs_sha', '') for r in rs}))} |")
    digests = {r.get("outputs_sha") for rs in runs.values() for r in rs}
    say(f"\nevery run's greedy outputs identical (by digest): {'yes' if len(digests) == 1 else 'NO'}")
    share: dict[str, Any] = {"identical_outputs": len(digests) == 1}
    for i, label in enumerate(("whole run", "steady state")):
        best = max((c for c in medians if c != "auto"), key=lambda c: medians[c][i])
        ratio = medians["auto"][i] / medians[best][i] if medians[best][i] else float("nan")
        say(f"{label}: best fixed {best} at {medians[best][i]:.0f} prompts/s; auto {medians['auto'][i]:.0f} = "
            f"{ratio:.2f} of it")
        share[label] = {"best_fixed": best, "best_rate": medians[best][i], "auto_rate": medians["auto"][i],
                        "auto_share": ratio}
    return share


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m tests.benchmarks.vllm_auto", description=__doc__.splitlines()[0])
    ap.add_argument("--api-base", help="a running server's http://127.0.0.1:PORT/v1 instead of starting one")
    ap.add_argument("--prompts", type=int, default=2048, help="prompts per contender run")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--fixed", default=",".join(map(str, FIXED)), help="the fixed concurrencies, comma-separated")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp") / "batchrun-bench-vllm-auto")
    ap.add_argument("--json", type=Path, help="also write every figure to this JSON file")
    args = ap.parse_args()
    fixed = tuple(int(x) for x in args.fixed.split(",") if x)
    results = run(args.workdir, args.api_base, args.prompts, args.rounds, fixed)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str), encoding="utf-8")


if __name__ == "__main__":
    main()
