"""Example Airflow DAG: one batchrun job as four mapped shard tasks followed by a merge."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

try:
    from airflow.sdk import DAG
except ImportError:  # Airflow 2
    from airflow import DAG

from batchrun.airflow import BatchrunOperator

JOB = str(Path(__file__).with_name("airflow_example.toml"))

with DAG(
    dag_id="batchrun_example",
    schedule=None,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    tags=["batchrun"],
):
    shards = BatchrunOperator.partial(task_id="shard", job=JOB, retries=2).expand(
        shard=[f"{i}/4" for i in range(1, 5)]
    )
    merge = BatchrunOperator(task_id="merge", job=JOB, merge=True)
    shards >> merge
