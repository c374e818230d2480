"""An Airflow operator for batchrun jobs: ``pip install 'batchrun[airflow]'`` (Airflow is optional).

    from batchrun.airflow import BatchrunOperator

    shards = BatchrunOperator.partial(task_id="shard", job=JOB).expand(
        shard=[f"{i}/4" for i in range(1, 5)]
    )
    shards >> BatchrunOperator(task_id="merge", job=JOB, merge=True)

The task's return value (pushed to XCom as ``return_value``) is the run summary as a dict; a
failed run also pushes its summary under the key ``summary`` before failing the task with the
reason and the exit code. Retries are safe: a rerun resumes, and an overlapping retry finds the
job busy and fails without touching it.
"""

from __future__ import annotations

from typing import Any

try:  # Airflow 3: the task SDK
    from airflow.sdk import BaseOperator
except ImportError:  # Airflow 2
    from airflow.models import BaseOperator
from airflow.exceptions import AirflowException

from .errors import BatchrunError
from .memory import use_lean_memory_pool
from .runner import merge_job, run_job


class BatchrunOperator(BaseOperator):  # type: ignore[misc]  # Airflow is untyped here
    """Run (``shard="I/N"`` for one shard) or merge a batchrun job file."""

    template_fields = ("job", "shard")

    def __init__(
        self,
        *,
        job: str,
        shard: str | None = None,
        merge: bool = False,
        fail_on_failed_rows: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if merge and shard:
            raise ValueError("BatchrunOperator: merge=True takes no shard")
        self.job = job
        self.shard = shard
        self.merge = merge
        self.fail_on_failed_rows = fail_on_failed_rows

    def execute(self, context: Any) -> dict[str, Any]:
        use_lean_memory_pool()  # the task's process is ours for the run
        try:
            summary = merge_job(self.job) if self.merge else run_job(self.job, shard=self.shard or None)
        except BatchrunError as exc:
            failed = getattr(exc, "summary", None)
            if failed is not None:
                context["ti"].xcom_push(key="summary", value=failed.to_dict())
            raise AirflowException(f"batchrun exited {exc.exit_code}: {exc}") from exc
        self.log.info("%s", summary.line())
        result = summary.to_dict()
        if summary.exit_code == 3 and self.fail_on_failed_rows:
            context["ti"].xcom_push(key="summary", value=result)
            raise AirflowException(
                f"batchrun exited 3: {summary.failed} rows failed {summary.failed_by_class}; "
                "rerun the task to retry them"
            )
        return result
