"""Shared fixtures: a live endpoint on loopback and job files written into a temporary folder."""

from __future__ import annotations

import csv
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from endpoint import LiveEndpoint  # noqa: E402

from batchrun import server  # noqa: E402

MODEL = "custom/test-model"
PARAMS = {"max_tokens": 6, "temperature": 0.5, "top_p": 0.9, "top_k": 20}


@pytest.fixture
def endpoint() -> Iterator[LiveEndpoint]:
    with LiveEndpoint() as ep:
        yield ep


def prompt_rows(n: int, *, start: int = 0) -> list[dict[str, Any]]:
    """``n`` rows with unique ids and unique prompts (so any misplaced output is visible)."""
    return [{"id": f"r{i:06d}", "topic": f"topic {i}", "prompt": f"Prompt number {i}: say something"} for i in range(start, start + n)]


def write_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return repr(v)


def write_job(
    folder: Path,
    api_base: str,
    *,
    input_path: str = "input.csv",
    output_path: str = "out/result.parquet",
    input: dict[str, Any] | None = None,
    endpoint: dict[str, Any] | None = None,
    params: dict[str, Any] | None = None,
    run: dict[str, Any] | None = None,
    name: str = "job.toml",
) -> Path:
    """Write a job file whose sections default to a fast, small test job."""
    sections = {
        "input": {"path": input_path, "prompt_column": "prompt", "id_column": "id", **(input or {})},
        "endpoint": {"api_base": api_base, "model": MODEL, "timeout_s": 10, **(endpoint or {})},
        "params": params if params is not None else dict(PARAMS),
        "run": {
            "batch_size": 4,
            "concurrency": 2,
            "max_retries": 3,
            "retry_backoff_s": 0.01,
            "retry_backoff_max_s": 0.05,
            **(run or {}),
        },
        "output": {"path": output_path},
    }
    lines = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in values.items() if v is not None]
        lines.append("")
    path = folder / name
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def expected_output(prompt: str, params: dict[str, Any] | None = None, model: str = MODEL) -> list[str]:
    """What the reference model answers for ``prompt``: the proof that an output is its row's."""
    return server.toy_output(model.removeprefix("custom/"), prompt, dict(PARAMS if params is None else params))


def assert_exact(output: Path, rows: list[dict[str, Any]], params: dict[str, Any] | None = None) -> pl.DataFrame:
    """Every input row exactly once, in input order, each with its own prompt's output."""
    df = pl.read_parquet(output)
    assert df.height == len(rows)
    assert df["id"].to_list() == [r["id"] for r in rows]
    assert df["prompt"].to_list() == [r["prompt"] for r in rows]
    for got, r in zip(df.select("prompt", "output", "error").iter_rows(named=True), rows):
        assert got["error"] is None, got
        assert got["output"] == expected_output(r["prompt"], params), got
    return df
