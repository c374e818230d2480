"""Adaptive concurrency against fixed settings on the reference endpoint's capacity model.

    python -m tests.benchmarks.adaptive [--rows N] [--rounds R]

A server with 64 prompt slots answering in 66 ms (ceiling 970 prompts/s) that sheds with 503 past
128 prompts in flight, B = 16. In each round every contender runs once, in turn (so a change in
the machine's load falls on all): ``concurrency = "auto"`` and a sweep of fixed settings. Prints
prompts/s (whole run), requests shed, and how the run ended; the best fixed setting is the sweep's
highest median, and ``auto`` is given as a share of it.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from conftest import prompt_rows, write_csv, write_job
from endpoint import LiveEndpoint

from batchrun import run_job
from batchrun.errors import BatchrunError
from batchrun.server import ServerOptions

CONTENDERS: list[int | str] = ["auto", 2, 4, 6, 8, 12, 16, 32]


def one(conc: int | str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    folder = Path(tempfile.mkdtemp(prefix="adaptive-"))
    write_csv(folder / "input.csv", rows)
    options = ServerOptions(latency_s=0.066, capacity_prompts=64, queue_prompts=64)
    with LiveEndpoint(options) as ep:
        job = write_job(folder, ep.url, run={
            "batch_size": 16, "concurrency": conc, "max_concurrency": 64, "max_retries": 10,
            "retry_backoff_s": 0.05, "retry_backoff_max_s": 1.0,
        })
        started = time.monotonic()
        try:
            summary = run_job(job)
            ended, limit = summary.status, summary.concurrency_limit
        except BatchrunError as exc:
            summary, ended, limit = exc.summary, f"exit {exc.exit_code}", None
        wall = time.monotonic() - started
        shed, requests = ep.stats.shed, ep.stats.requests + ep.stats.shed
    answered = summary.rows_answered_this_run if summary is not None else 0
    return {"concurrency": conc, "rate": answered / wall, "shed": shed, "requests": requests,
            "ended": ended, "limit": limit}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=8000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    rows = prompt_rows(args.rows)
    runs: dict[str, list[dict[str, Any]]] = {str(c): [] for c in CONTENDERS}
    for _ in range(args.rounds):
        for c in CONTENDERS:
            runs[str(c)].append(one(c, rows))
    print(f"machine: {platform.machine()}, Python {platform.python_version()}; {args.rows} rows, {args.rounds} rounds")
    print("| concurrency | prompts/s (median) | each round | shed / requests | ended | limit at the end |")
    print("|---|---:|---|---:|---|---|")
    medians = {}
    for c, rs in runs.items():
        medians[c] = statistics.median(r["rate"] for r in rs)
        each = " / ".join(f"{r['rate']:.0f}" for r in rs)
        print(f"| {c} | {medians[c]:.0f} | {each} | "
              f"{sum(r['shed'] for r in rs)} / {sum(r['requests'] for r in rs)} | "
              f"{', '.join(sorted({r['ended'] for r in rs}))} | {', '.join(str(r['limit']) for r in rs)} |")
    best = max((c for c in medians if c != "auto"), key=lambda c: medians[c])
    print(f"\nbest fixed: {best} at {medians[best]:.0f} prompts/s; auto {medians['auto']:.0f} = "
          f"{medians['auto'] / medians[best]:.2f} of it")
    if args.json:
        args.json.write_text(json.dumps(runs, indent=2))


if __name__ == "__main__":
    main()
