"""Incremental runs by id: carry the answers of unchanged rows from the previous plan to a new one.

With an id column, a grown or edited input need not be paid for again. The previous answers
(committed segments, partial files, and any carry file not yet used up) are joined by id with the
new input's ids and prompt hashes; a row whose id and prompt are both unchanged keeps its answer,
every other row is sent. The join runs in polars over Parquet files, not over Python objects.

Crash safety: ``carry.parquet`` is published atomically before the old progress is removed, and
it is itself one of the inputs of the next join, so a crash at any step only repeats the step.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from . import source
from .prompts import render_prompts
from .segments import RESULT_SCHEMA

if TYPE_CHECKING:
    from .config import JobSpec
    from .storage import ProgressStore


def carry_forward(spec: JobSpec, state: ProgressStore, input_identity: object) -> dict[str, int]:
    """Write ``carry.parquet`` for the new input, drop the old progress, return the counts.

    The carry file records the input it was made for and its counts: a run that crashed after
    publishing it but before pinning the new plan picks it up as it is, instead of joining again
    against a carry that no longer holds the changed rows (and so miscounting them as new).
    """
    assert spec.id_column is not None
    made_for = json.dumps(input_identity, sort_keys=True)
    counts = _carry_counts(state, made_for)
    if counts is None:
        counts = _join_previous(spec, state, made_for)
    state.drop_progress()
    return counts


def _carry_counts(state: ProgressStore, made_for: str) -> dict[str, int] | None:
    """The counts of a carry file already made for this very input, if there is one."""
    meta = state.carry_metadata()
    if meta is None or meta.get(b"batchrun.carry_for", b"").decode() != made_for:
        return None
    counts: dict[str, int] = json.loads(meta[b"batchrun.carry_counts"])
    return counts


# What OpenAI protocols keep of an answer beside its output (null for custom).
_ANSWER_EXTRAS = ("finish_reason", "prompt_tokens", "completion_tokens")


def _join_previous(spec: JobSpec, state: ProgressStore, made_for: str) -> dict[str, int]:
    incoming = state.scratch_path("incoming.parquet")
    rows = _write_incoming(spec, incoming)
    previous = [f for f in state.result_files(with_carry=True) if _readable(f)]
    if previous:
        prev = (
            # missing_columns: segments written before a column existed read it as null.
            pl.scan_parquet(
                previous, schema=pl.DataFrame(RESULT_SCHEMA.empty_table()).schema, missing_columns="insert"
            )
            .filter(pl.col("error").is_null() & pl.col("id").is_not_null())
            .select("id", "prompt_hash", "output", "params", "attempts", "latency_s", *_ANSWER_EXTRAS)
            .unique(subset=["id"], keep="first", maintain_order=True)
            .rename({"prompt_hash": "previous_hash"})
        )
        joined = pl.scan_parquet(incoming).join(prev, on="id", how="inner")
        matched = joined.select(pl.len()).collect().item()
        carried = (
            joined.filter(pl.col("prompt_hash") == pl.col("previous_hash"))
            .select(
                "row", "prompt_hash", "id", "output", "params",
                pl.lit(None, dtype=pl.String).alias("error"), "attempts", "latency_s", *_ANSWER_EXTRAS,
            )
            .sort("row")
            .collect()
            .to_arrow()
            .cast(RESULT_SCHEMA)
        )
    else:
        matched = 0
        carried = RESULT_SCHEMA.empty_table()
    counts = {"reused": carried.num_rows, "changed": matched - carried.num_rows, "new": rows - matched}
    carried = carried.replace_schema_metadata(
        {"batchrun.carry_for": made_for, "batchrun.carry_counts": json.dumps(counts)}
    )
    state.write_carry(carried)
    incoming.unlink(missing_ok=True)
    return counts


def _write_incoming(spec: JobSpec, path: Path) -> int:
    """(row, id, prompt_hash) of every row of the new input, streamed to a Parquet file."""
    id_column = spec.id_column
    assert id_column is not None
    columns = list(dict.fromkeys([*spec.prompt_columns, id_column]))
    schema = pa.schema([("row", pa.int64()), ("id", pa.string()), ("prompt_hash", pa.int64())])
    row = 0
    with pq.ParquetWriter(path, schema) as writer:
        for _, table in source.iter_segments(spec, columns, 65536):
            n = table.num_rows
            writer.write_table(
                pa.table(
                    {
                        "row": pa.array(range(row, row + n), pa.int64()),
                        "id": source.id_strings(table, id_column),
                        "prompt_hash": render_prompts(table, spec).hashes(),
                    },
                    schema=schema,
                )
            )
            row += n
    return row


def _readable(path: Path) -> bool:
    try:
        pq.read_table(path, columns=["id"], page_checksum_verification=True)
        return True
    except (OSError, pa.ArrowException):
        return False
