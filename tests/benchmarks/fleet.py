"""A fleet of replicas of capacities 1:2:4 against the sum of their capacities (issue 15).

    python -m tests.benchmarks.fleet [--rows N] [--rounds R] [--json PATH]

Three replicas of the reference endpoint's capacity model (``batchrun serve --capacity-prompts K
--queue-prompts K --latency-ms 66``, each in its own process, so their event loops do not share
the run's CPU): 16, 32 and 64 prompt slots answering in 66 ms (ceilings 242, 485 and 970
prompts/s, 1,697 together), each shedding with 503 past twice its capacity in flight. B = 16,
``max_retries = 10``, backoff 0.05-1 s. The runs themselves go in this process (``run_job``).

Controls, measured in the same run: each replica alone at a fixed concurrency that fills exactly
its slots (1, 2 and 4 requests of 16), given a share of the rows in proportion to its capacity so
each control takes about as long as a fleet run; the summed capacity is the sum of their medians.
Contenders through the fleet (``api_base`` listing the three): ``concurrency = "auto"``
(``max_concurrency`` 64) and fixed 2, 4 and 32 per replica (32 is far above every replica's
capacity: it shows requests shed and what is left of the throughput). A fixed setting is a
ceiling, not a constant: a fresh 503 cuts a replica's limit by a quarter and answers bring it
back up (``admission.FixedLimit``), so the limits each run ended at are shown for every fleet run.

In each round every control and contender runs once, in turn, and the order turns by one each
round (the machine is shared and noisy); figures are medians over the rounds. prompts/s is over
the whole run (planning and writing the output included). For each run: how it ended, requests
shed with 503 (counted by the replicas themselves), the split of the prompts the replicas served,
each replica's limit at the end, and the machine's load (1 min) as the run started.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request
from contextlib import ExitStack
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from conftest import prompt_rows, write_csv, write_job

from batchrun import run_job
from batchrun.errors import BatchrunError

from .harness import Endpoint, machine, proc_cpu_s

CAPACITIES = (16, 32, 64)  # prompt slots of each replica: 1:2:4
LATENCY_S = 0.066
BATCH = 16
MAX_CONCURRENCY = 64
FLEET: list[int | str] = ["auto", 2, 4, 32]
TARGET = 0.85  # issue 15: the fleet with auto reaches this share of the summed capacity


def nominal(cap: int) -> float:
    """A replica's ceiling in prompts/s: its slots, each answering once per latency."""
    return cap / LATENCY_S


def alone(cap: int) -> str:
    return f"alone {cap}"


def names() -> list[str]:
    return [alone(c) for c in CAPACITIES] + [f"fleet {c}" for c in FLEET]


def server_stats(ep: Endpoint) -> dict[str, Any]:
    with urllib.request.urlopen(f"{ep.base}/stats", timeout=30) as r:
        stats: dict[str, Any] = json.loads(r.read())
    return stats


def idle(eps: list[Endpoint], timeout_s: float = 30.0) -> list[dict[str, Any]]:
    """Every replica's stats once nothing is in flight there (a run's cancelled requests gone)."""
    deadline = time.monotonic() + timeout_s
    while True:
        stats = [server_stats(ep) for ep in eps]
        if all(s["in_flight"] == 0 for s in stats) or time.monotonic() > deadline:
            return stats
        time.sleep(0.05)


def one(name: str, eps: list[Endpoint], conc: int | str, inp: Path, rows: int, workdir: Path) -> dict[str, Any]:
    """One run of ``rows`` rows to ``eps`` (one replica: a string ``api_base``; several: a list)."""
    folder = Path(tempfile.mkdtemp(prefix=name.replace(" ", "-") + "-", dir=workdir))
    api_base: str | list[str] = eps[0].url if len(eps) == 1 else [ep.url for ep in eps]
    job = write_job(folder, api_base, input_path=str(inp), run={
        "batch_size": BATCH, "concurrency": conc, "max_concurrency": MAX_CONCURRENCY, "max_retries": 10,
        "retry_backoff_s": 0.05, "retry_backoff_max_s": 1.0,
    })
    before = idle(eps)
    server_cpu = [proc_cpu_s(ep.proc.pid) for ep in eps if ep.proc is not None]
    load = os.getloadavg()[0]
    cpu = time.process_time()
    started = time.monotonic()
    try:
        summary = run_job(job)
        ended = summary.status
    except BatchrunError as exc:
        summary, ended = exc.summary, f"exit {exc.exit_code}"
    wall = time.monotonic() - started
    client_cpu = time.process_time() - cpu
    after = idle(eps)
    server_cpu = [proc_cpu_s(ep.proc.pid) - c for ep, c in zip(eps, server_cpu) if ep.proc is not None]
    shutil.rmtree(folder, ignore_errors=True)
    answered = summary.rows_answered_this_run if summary is not None else 0
    replicas = summary.replicas if summary is not None else []
    return {
        "name": name, "concurrency": conc, "rows": rows, "answered": answered, "wall_s": wall,
        "rate": answered / wall, "ended": ended,
        "served": [a["prompts"] - b["prompts"] for a, b in zip(after, before)],
        "shed": [a["shed"] - b["shed"] for a, b in zip(after, before)],
        "requests": [a["requests"] + a["shed"] - b["requests"] - b["shed"] for a, b in zip(after, before)],
        "limit": summary.concurrency_limit if summary is not None else None,
        "limits": [r.get("concurrency_limit") for r in replicas],
        "cuts": summary.concurrency_cuts if summary is not None else 0,
        "taken_out": sum(r.get("times_taken_out", 0) for r in replicas),
        "failed_rows": summary.failed if summary is not None else 0,
        "replicas": replicas,
        "client_cpu_s": client_cpu, "server_cpu_s": server_cpu, "load": load,
    }


def fmt_split(served: list[int]) -> str:
    total = sum(served)
    return ":".join(f"{s / total:.2f}" for s in served) if total else ""


def run(rows: int, rounds: int, workdir: Path) -> dict[str, Any]:
    info = machine()
    info["platform"] = platform.platform()
    when = time.strftime("%Y-%m-%d %H:%M")
    total_cap = sum(CAPACITIES)
    # Each control gets rows in proportion to its replica's capacity (whole batches): about as
    # long a run as the fleet's.
    rows_alone = {c: max(BATCH, round(rows * c / total_cap / BATCH) * BATCH) for c in CAPACITIES}
    data = {n: write_csv(workdir / f"input-{n}.csv", prompt_rows(n)) for n in {rows, *rows_alone.values()}}
    runs: dict[str, list[dict[str, Any]]] = {n: [] for n in names()}
    with ExitStack() as stack:
        eps = [stack.enter_context(Endpoint(LATENCY_S * 1000, capacity_prompts=c, queue_prompts=c))
               for c in CAPACITIES]
        plan: list[tuple[str, list[Endpoint], int | str, int]] = [
            (alone(c), [ep], c // BATCH, rows_alone[c]) for c, ep in zip(CAPACITIES, eps)
        ] + [(f"fleet {c}", eps, c, rows) for c in FLEET]
        # An unrecorded warm-up run through the fleet: the first run_job pays for lazy imports.
        warm = min(rows, 512)
        one("warm-up", eps, "auto", write_csv(workdir / "input-warm.csv", prompt_rows(warm)), warm, workdir)
        for r in range(rounds):
            for name, targets, conc, n in plan[r % len(plan):] + plan[:r % len(plan)]:
                result = one(name, targets, conc, data[n], n, workdir)
                runs[name].append(result)
                print(f"  round {r + 1}: {name}: {result['rate']:.0f} prompts/s, {result['ended']}, "
                      f"shed {sum(result['shed'])}/{sum(result['requests'])}, load {result['load']:.2f}", file=sys.stderr, flush=True)
    return {"date": when, "machine": info, "rows": rows, "rows_alone": rows_alone, "rounds": rounds, "runs": runs}


def report(fig: dict[str, Any]) -> dict[str, Any]:
    """Print the table and the headline figures; returns the figures (medians and shares)."""
    info, runs = fig["machine"], fig["runs"]
    print(f"# fleet: {fig['date']}; machine: {info['nproc']} cores ({info['cpu']}), {info['memory']}, "
          f"Python {info['python']}, {info['platform']}, load {info['load']}")
    caps = "/".join(str(c) for c in CAPACITIES)
    noms = [nominal(c) for c in CAPACITIES]
    print(f"replicas: {caps} prompt slots (queue = capacity), {LATENCY_S * 1000:.0f} ms: nominal "
          f"{'/'.join(f'{x:.0f}' for x in noms)} = {sum(noms):,.0f} prompts/s; B = {BATCH}; "
          f"{fig['rows']:,} rows through the fleet, "
          f"{'/'.join(str(fig['rows_alone'][c]) for c in CAPACITIES)} alone; {fig['rounds']} rounds")
    medians = {n: statistics.median(r["rate"] for r in rs) for n, rs in runs.items()}
    summed = sum(medians[alone(c)] for c in CAPACITIES)
    print()
    print("| run | concurrency | prompts/s (median) | each round | of summed capacity | of nominal | "
          "split of prompts served | shed / requests | ended | limits at the end |")
    print("|---|---|---:|---|---:|---:|---|---:|---|---|")
    shares: dict[str, float] = {}
    for n, rs in runs.items():
        is_alone = n.startswith("alone")
        nom = nominal(int(n.split()[1])) if is_alone else sum(noms)
        of_summed = "" if is_alone else f"{medians[n] / summed:.3f}"
        if not is_alone:
            shares[n] = medians[n] / summed
        served = [sum(r["served"][i] for r in rs) for i in range(len(rs[0]["served"]))]
        shed, requests = sum(sum(r["shed"]) for r in rs), sum(sum(r["requests"]) for r in rs)
        limits = "" if is_alone else ", ".join("+".join(str(x) for x in r["limits"]) for r in rs)
        each = " / ".join(f"{r['rate']:.0f}" for r in rs)
        print(f"| {n} | {rs[0]['concurrency']} | {medians[n]:,.0f} | {each} | "
              f"{of_summed} | {medians[n] / nom:.3f} | {'' if is_alone else fmt_split(served)} | "
              f"{shed} / {requests}{f' ({shed / requests:.0%})' if shed and requests else ''} | "
              f"{', '.join(sorted({r['ended'] for r in rs}))} | {limits} |")
    auto = runs["fleet auto"]
    per_round = [a["rate"] / sum(runs[alone(c)][i]["rate"] for c in CAPACITIES) for i, a in enumerate(auto)]
    print(f"\nsummed capacity (the replicas alone, medians): {summed:,.0f} prompts/s = "
          f"{summed / sum(noms):.3f} of nominal {sum(noms):,.0f}")
    verdict = "met" if shares["fleet auto"] >= TARGET else "NOT met"
    print(f"fleet auto: {medians['fleet auto']:,.0f} prompts/s = {shares['fleet auto']:.3f} of summed capacity "
          f"(round by round {' / '.join(f'{s:.3f}' for s in per_round)}; {medians['fleet auto'] / sum(noms):.3f} "
          f"of nominal): target {TARGET} {verdict}")
    far = runs[f"fleet {FLEET[-1]}"]
    shed, requests = sum(sum(r["shed"]) for r in far), sum(sum(r["requests"]) for r in far)
    print(f"fleet fixed {FLEET[-1]}: {medians[f'fleet {FLEET[-1]}']:,.0f} prompts/s = "
          f"{shares[f'fleet {FLEET[-1]}']:.3f} of summed capacity, {shed} of {requests} requests shed "
          f"({shed / max(requests, 1):.0%}), failed rows {sum(r['failed_rows'] for r in far)}, "
          f"replicas taken out {sum(r['taken_out'] for r in far)} times")
    loads = [statistics.median(r["load"] for rs in runs.values() for r in rs[i:i + 1]) for i in range(fig["rounds"])]
    print(f"machine load (1 min) as the runs started, median by round: {' / '.join(f'{x:.2f}' for x in loads)}")
    cpu = [(r["client_cpu_s"] + sum(r["server_cpu_s"])) / r["wall_s"] for rs in runs.values() for r in rs]
    print(f"CPU (client + replicas) per second of run: {min(cpu):.2f}-{max(cpu):.2f} of {info['nproc']} cores")
    return {"medians": medians, "summed_capacity": summed, "nominal_capacity": sum(noms),
            "shares": shares, "auto_share_by_round": per_round}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=16000, help="rows of each fleet run (the controls get their share)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--workdir", type=Path, help="where inputs and runs go (default: a temporary folder)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="fleet-bench-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        fig = run(args.rows, args.rounds, workdir)
    fig["figures"] = report(fig)
    if args.json:
        args.json.write_text(json.dumps(fig, indent=2))


if __name__ == "__main__":
    main()
