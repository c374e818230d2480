"""What a run reports: its summary (the line, the file a scheduler reads), the job's counts from
its checkpoint files, and ``batchrun status``."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePath
from typing import Any

from .config import JobSpec, load_job
from .errors import (
    AuthError,
    BatchrunError,
    EndpointError,
    InterruptedRun,
    JobError,
    NotReadyError,
    StateError,
    StorageError,
)
from .segments import EMPTY_PROMPT, SegmentInfo
from .storage import ProgressStore, output_store, progress_store

__all__ = ["RunSummary", "Shard", "job_status"]


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count`` (1-based): the segments ``k`` with ``k % count == index - 1``."""

    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> Shard:
        try:
            index, count = (int(x) for x in text.split("/"))
        except ValueError:
            raise JobError(f"--shard must look like 2/8 (got {text!r})") from None
        if not 1 <= index <= count:
            raise JobError(f"--shard {text}: the index must be between 1 and {max(count, 1)}")
        return cls(index, count)

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    @property
    def slug(self) -> str:
        return f"shard-{self.index}-of-{self.count}"

    def owns(self, k: int) -> bool:
        return k % self.count == self.index - 1


@dataclass
class RunSummary:
    """What a run did; ``exit_code`` is what the CLI exits with."""

    job: str
    status: str
    exit_code: int
    total_rows: int = 0
    succeeded: int = 0
    failed: int = 0
    failed_by_class: dict[str, int] = field(default_factory=dict)
    skipped: int = 0  # rows whose prompt is empty: not sent, not failed
    rows_answered_this_run: int = 0
    rows_reused: int = 0
    requests: int = 0
    prompts_sent: int = 0
    prompts_resent: int = 0
    retries_by_cause: dict[str, int] = field(default_factory=dict)
    throttle_wait_s: float = 0.0
    # Tokens the endpoint reported spending this run (OpenAI protocols' usage; 0 for custom).
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # With concurrency = "auto": requests in flight allowed at the end of the run, and how often
    # the controller lowered it (overload answers or a latency rise).
    concurrency_limit: int | None = None
    concurrency_cuts: int = 0
    # Per replica of endpoint.api_base, in order: requests, prompts, answered, failures_by_class,
    # latency_p50_s/p95_s, out_of_rotation_s, times_taken_out, in_rotation, concurrency_limit.
    replicas: list[dict[str, Any]] = field(default_factory=list)
    incremental: dict[str, int] = field(default_factory=dict)
    duration_s: float = 0.0
    write_output_s: float = 0.0
    rows_per_s: float = 0.0
    started_at: str = ""
    finished_at: str = ""
    shard: str = ""
    output_path: str = ""
    message: str = ""
    echo_match: str = "exact"

    def line(self) -> str:
        """The one summary line printed at the end of a run."""
        return self._line() + _ECHO_NOTES.get(self.echo_match, "")

    def _line(self) -> str:
        if self.status == "nothing_to_do":
            return f"batchrun: nothing to do: all {self.total_rows} rows are done ({self.output_path})"
        if self.status == "shard_complete":
            return (
                f"batchrun: shard {self.shard} complete: {self.succeeded} rows succeeded"
                + (f", {self.failed} failed" if self.failed else "")
                + f"; this run answered {self.rows_answered_this_run} rows in {self.requests} requests; "
                + self.message
            )
        changed = (
            "input changed: {reused} rows reused, {changed} changed, {new} new; ".format(**self.incremental)
            if self.incremental
            else ""
        )
        failed = (
            f", {self.failed} failed ({', '.join(f'{k} {v}' for k, v in sorted(self.failed_by_class.items()))})"
            if self.failed
            else ""
        ) + (f", {self.skipped} skipped (empty prompt)" if self.skipped else "")
        retries = sum(self.retries_by_cause.values())
        causes = ", ".join(f"{k} {v}" for k, v in sorted(self.retries_by_cause.items()))
        throttled = f", {self.throttle_wait_s:.1f}s throttled" if self.throttle_wait_s >= 0.05 else ""
        if self.concurrency_limit is not None:
            throttled += f", concurrency auto: {self.concurrency_limit} in flight at the end ({self.concurrency_cuts} cuts)"
        if self.prompt_tokens or self.completion_tokens:
            throttled += f", {self.prompt_tokens} prompt + {self.completion_tokens} completion tokens"
        if len(self.replicas) > 1:
            throttled += "; replicas: " + ", ".join(_replica_part(r) for r in self.replicas)
        # A run that stopped early wrote no output: say where it stands instead.
        end = (
            f"output: {self.output_path}"
            if self.exit_code in (0, 3)
            else f"stopped (exit {self.exit_code}), progress kept: run the same command to resume"
        )
        return (
            f"batchrun: {self.status}: {self.succeeded}/{self.total_rows} rows succeeded{failed}; "
            f"{changed}this run answered {self.rows_answered_this_run} rows in {self.requests} requests "
            f"({retries} retries{': ' + causes if causes else ''}, {self.prompts_resent} prompts "
            f"resent{throttled}) in {self.duration_s:.1f}s; {end}"
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# Every summary of a run whose answers were not matched by their exact echo says so.
_ECHO_NOTES = {
    "trimmed": '; echoes compared without surrounding whitespace (echo_match = "trimmed")',
    "position": '; outputs matched by position (echo_match = "position"): echoes not checked',
}


def saved_counts(state: ProgressStore, part: Shard | None) -> tuple[int, dict[str, Any]]:
    """The job's rows and its (or the shard's) counts from the committed segments, read without
    changing anything."""
    plan = state.read_plan()
    if plan is None:
        return 0, counts_of({})
    infos = state.scan_segments(plan.sizes(), remove_damaged=False)
    return plan.rows, counts_of({k: i for k, i in infos.items() if part is None or part.owns(k)})


def job_status(job: JobSpec | str | Path) -> dict[str, Any]:
    """What a scheduler wants to know, read from the run state without touching the endpoint."""
    spec = job if isinstance(job, JobSpec) else load_job(job)
    state = progress_store(spec)
    store = output_store(spec)
    plan = state.read_plan()
    out: dict[str, Any] = {"job": str(spec.job_path), "output": str(spec.output_path)}
    if plan is None:
        out.update(
            state="not started", rows=None, done=0, succeeded=0, failed=0, failed_by_class={}, skipped=0,
            pending=None,
        )
    else:
        infos = state.scan_segments(plan.sizes(), remove_damaged=False)
        counts = counts_of(infos)
        done = sum(i.rows for i in infos.values())
        finished = state.read_finished()
        complete = done == plan.rows and finished is not None and finished.get("output") == store.identity(spec.output_path)
        out.update(
            state="complete" if complete else "in progress",
            rows=plan.rows,
            done=done,
            succeeded=counts["succeeded"],
            failed=counts["failed"],
            failed_by_class=counts["failed_by_class"],
            skipped=counts["skipped"],
            pending=plan.rows - done,
            saved_in_partials=state.partial_rows(),
            # Tokens the endpoint reported for the committed segments' requests (OpenAI protocols).
            prompt_tokens=sum(i.prompt_tokens for i in infos.values()),
            completion_tokens=sum(i.completion_tokens for i in infos.values()),
        )
    out["running"] = state.holders()
    out["last_run"] = store.read_json(summary_path(spec, None))
    # Per replica, as the last run ended (its summary's): requests, failures, latency, limits.
    out["replicas"] = (out["last_run"] or {}).get("replicas", [])
    shards = store.beside(spec.output_path, f"{spec.output_path.name}.shard-*.summary.json")
    out["shards"] = {p.name.split(".shard-")[1].removesuffix(".summary.json"): store.read_json(p) for p in shards}
    out["success_marker"] = store.exists(success_path(spec))
    return out


def _replica_part(r: dict[str, Any]) -> str:
    failed = sum(r["failures_by_class"].values())
    p50 = f", p50 {r['latency_p50_s']:.2f}s" if r["latency_p50_s"] is not None else ""
    out = f", {r['out_of_rotation_s']:.0f}s out of rotation" if r["times_taken_out"] else ""
    return f"{r['url']} {r['prompts']} prompts in {r['requests']} requests ({failed} failed{p50}{out})"


def counts_of(infos: dict[int, SegmentInfo]) -> dict[str, Any]:
    by_class: dict[str, int] = {}
    for info in infos.values():
        for cls, n in info.failed_by_class.items():
            if cls != EMPTY_PROMPT:
                by_class[cls] = by_class.get(cls, 0) + n
    failed = sum(i.retryable for i in infos.values())
    skipped = sum(i.skipped for i in infos.values())
    return {
        "succeeded": sum(i.rows for i in infos.values()) - failed - skipped,
        "failed": failed,
        "failed_by_class": dict(sorted(by_class.items())),
        "skipped": skipped,
    }


def set_counts(summary: RunSummary, counts: dict[str, Any]) -> None:
    summary.succeeded = counts["succeeded"]
    summary.failed = counts["failed"]
    summary.failed_by_class = counts["failed_by_class"]
    summary.skipped = counts["skipped"]
    summary.exit_code = 3 if summary.failed else 0


_FAILURE_STATUS = (
    (InterruptedRun, "interrupted"),
    (AuthError, "credentials_refused"),
    (EndpointError, "endpoint_unavailable"),
    (StorageError, "storage_error"),
    (NotReadyError, "not_ready"),
    (JobError, "invalid_job"),
    (StateError, "state_mismatch"),
)


def failure_status(exc: BatchrunError) -> str:
    return next((name for cls, name in _FAILURE_STATUS if isinstance(exc, cls)), "error")


def summary_path(spec: JobSpec, part: Shard | None) -> PurePath:
    suffix = f".{part.slug}.summary.json" if part else ".summary.json"
    return spec.output_path.with_name(spec.output_path.name + suffix)


def success_path(spec: JobSpec) -> PurePath:
    return spec.output_path.with_name(spec.output_path.name + ".SUCCESS")


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


