"""A real Airflow run: `airflow dags test` on jobs/airflow_dag.py, four mapped shards and a merge.

Airflow is an optional extra and a heavy one, so it lives in a virtual environment of its own,
named by BATCHRUN_AIRFLOW_BIN (the bin/ folder holding `airflow`); CI makes one (.ci/run). Off
CI without it the test is skipped; on CI a missing Airflow is a failure, never a silent skip.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
from pathlib import Path

import polars as pl
import pytest

from batchrun.server import toy_output

REPO = Path(__file__).parent.parent


def _airflow_bin() -> Path:
    configured = os.environ.get("BATCHRUN_AIRFLOW_BIN")
    if configured and (Path(configured) / "airflow").exists():
        return Path(configured)
    if os.environ.get("CI"):
        pytest.fail("CI must provide Airflow: set BATCHRUN_AIRFLOW_BIN to a venv's bin/ with batchrun[airflow]")
    pytest.skip("Airflow is not installed here (set BATCHRUN_AIRFLOW_BIN to a venv with batchrun[airflow])")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_airflow_dag_runs_four_mapped_shards_and_a_merge_into_an_exact_output(tmp_path: Path) -> None:
    bin_dir = _airflow_bin()
    for folder in ("jobs", "sample_data"):
        shutil.copytree(REPO / folder, tmp_path / folder)
    env = {
        **os.environ,
        "AIRFLOW_HOME": str(tmp_path / "airflow-home"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(tmp_path / "jobs"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    env.pop("PYTHONPATH", None)

    def airflow(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(bin_dir / "airflow"), *args], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300
        )

    migrated = airflow("db", "migrate")
    assert migrated.returncode == 0, migrated.stderr[-3000:]
    ran = airflow("dags", "test", "batchrun_example")
    log = ran.stdout + ran.stderr
    assert ran.returncode == 0, log[-5000:]
    for i in range(4):
        assert f"[DAG TEST] end task task_id=shard map_index={i}" in log
    assert "[DAG TEST] end task task_id=merge" in log
    assert "DagRun Finished" in log and "state=success" in log

    with open(tmp_path / "sample_data" / "capitals.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    out = tmp_path / "out" / "airflow_example.parquet"
    df = pl.read_parquet(out)
    assert df["id"].to_list() == [r["id"] for r in rows]  # every row once, in input order
    params = {"max_tokens": 8, "temperature": 0.7}
    for got, row in zip(df.iter_rows(named=True), rows):
        assert got["prompt"] == row["prompt"]
        assert got["error"] is None
        assert got["output"] == toy_output("meta-llama/Llama-2-13b-hf", row["prompt"], params)
    # Each mapped task ran its own shard and reported it; the merge found the output written.
    for i in range(1, 5):
        shard = json.loads((out.parent / f"airflow_example.parquet.shard-{i}-of-4.summary.json").read_text())
        assert shard["shard"] == f"{i}/4" and shard["exit_code"] == 0
    assert json.loads((out.parent / "airflow_example.parquet.SUCCESS").read_text())["rows"] == len(rows)
