"""The final Parquet output: every input row once, in input order, with its result, streamed."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import source
from .echoed import merge_kind
from .errors import StateError
from .plan import Plan
from .prompts import render_prompts
from .segments import EMPTY_PROMPT, SegmentInfo
from .storage import ProgressStore, output_store
from .wire import result_columns

if TYPE_CHECKING:
    from .config import JobSpec

# Output row groups: segments (a few thousand rows each) are gathered into row groups of up to
# this many rows or bytes. One row group per segment would leave a 10M-row output with thousands
# of row groups, whose metadata the writer keeps in memory until the footer (tens of MB).
ROW_GROUP_ROWS = 128 * 1024
ROW_GROUP_BYTES = 8 << 20

_ARROW_OF = {"bool": pa.bool_(), "int": pa.int64(), "float": pa.float64(), "str": pa.string()}


@dataclass
class OutputStats:
    rows: int = 0
    succeeded: int = 0
    skipped: int = 0
    failed_by_class: Counter[str] = field(default_factory=Counter)

    @property
    def failed(self) -> int:
        return sum(self.failed_by_class.values())


def params_struct(types: dict[str, str]) -> pa.DataType:
    fields = [pa.field(k, _ARROW_OF.get(v, pa.string())) for k, v in sorted(types.items())]
    # Parquet cannot store a struct without fields; a run whose endpoint echoed no params at all
    # still gets a params column, holding nulls.
    return pa.struct(fields or [pa.field("echoed", pa.string())])


def _typed_params(column: pa.ChunkedArray, struct: pa.StructType) -> pa.Array:
    # Echoed params take few distinct values, so decode each distinct value once and gather.
    uniques = pc.unique(column)
    decoded: list[dict[str, Any] | None] = []
    for raw in uniques.to_pylist():
        if raw is None:
            decoded.append(None)
            continue
        doc = json.loads(raw)
        row = {}
        for f in struct:
            v = doc.get(f.name)
            if v is not None and f.type == pa.string() and not isinstance(v, str):
                v = json.dumps(v, sort_keys=True)
            elif v is not None and f.type == pa.float64():
                v = float(v)
            row[f.name] = v
        decoded.append(row)
    table = pa.array(decoded, type=struct)
    return table.take(pc.index_in(column, value_set=uniques))


def write_output(
    spec: JobSpec, state: ProgressStore, plan: Plan, infos: dict[int, SegmentInfo]
) -> OutputStats:
    """Join the input with the committed segments, segment by segment, into ``spec.output_path``.

    Each result's row number, prompt hash and id are checked against the input row it is joined
    to, so an output can never be written onto a row it was not answered for. The counts come
    from the segments' footers (``infos``), which were written with their rows.
    """
    seg_rows = plan.segment_rows
    types: dict[str, str] = {}
    for info in infos.values():
        for key, kind in info.params_types.items():
            types[key] = merge_kind(types.get(key), kind)
    struct = params_struct(types)
    columns = result_columns(spec)
    stats = OutputStats()
    # The store records the new file's identity in the run state before it shows at the output
    # path: the file that appears there is then known as this job's.
    with output_store(spec).publish(spec.output_path, "output", state.record_output) as tmp:
        writer: _GroupedWriter | None = None
        try:
            for k, inp in source.iter_segments(spec, None, seg_rows):
                res = state.read_segment(k)
                _check_alignment(spec, k, seg_rows, inp, res)
                out = inp
                for name in columns:
                    col = _typed_params(res.column("params"), struct) if name == "params" else res.column(name)
                    out = out.append_column(name, col)
                if writer is None:
                    writer = _GroupedWriter(tmp, out.schema, _statistics_columns(out.schema, spec.id_column))
                writer.write(out)
                stats.rows += out.num_rows
                stats.skipped += infos[k].skipped
                stats.failed_by_class.update(
                    {cls: n for cls, n in infos[k].failed_by_class.items() if cls != EMPTY_PROMPT}
                )
            if writer is None:
                raise StateError("the input has no rows; nothing to write")
            if stats.rows != plan.rows:
                # Before the file is published: an output that does not match the plan never shows.
                raise StateError(f"the input now has {stats.rows} rows, the plan {plan.rows}")
            writer.flush()
        finally:
            if writer is not None:
                writer.close()
    stats.succeeded = stats.rows - stats.failed - stats.skipped
    return stats


def _statistics_columns(schema: pa.Schema, id_column: str | None) -> list[str]:
    """Leaf columns that get min/max statistics: the id column and every column that is not text
    or binary. Parquet keeps the min and max of every column of every row group in the footer, in
    memory until the file is closed: for free text (prompts, outputs, carried-through documents of
    a few KB) that is kilobytes per row group, 19 MB of footer at 10M rows of 3 KB, and a min/max
    of free text helps no reader skip anything."""

    def leaves(path: str, typ: pa.DataType) -> list[tuple[str, pa.DataType]]:
        if pa.types.is_struct(typ):
            return [leaf for f in typ for leaf in leaves(f"{path}.{f.name}", f.type)]
        if pa.types.is_list(typ) or pa.types.is_large_list(typ):
            return leaves(f"{path}.list.element", typ.value_type)
        return [(path, typ)]

    def textual(typ: pa.DataType) -> bool:
        if pa.types.is_dictionary(typ):
            return textual(typ.value_type)
        kinds = ("is_string", "is_large_string", "is_binary", "is_large_binary", "is_string_view", "is_binary_view")
        return any(getattr(pa.types, k, lambda _: False)(typ) for k in kinds)  # the views: pyarrow >= 16

    out = []
    for column in schema:
        for path, typ in leaves(column.name, column.type):
            if column.name == id_column or not textual(typ):
                out.append(path)
    return out


class _GroupedWriter:
    """A Parquet writer that gathers tables into row groups of bounded rows and bytes."""

    def __init__(self, path: Path, schema: pa.Schema, statistics: list[str]) -> None:
        self._writer = pq.ParquetWriter(path, schema, compression="zstd", write_statistics=statistics)
        self._pending: list[pa.Table] = []
        self._rows = 0
        self._bytes = 0

    def write(self, table: pa.Table) -> None:
        self._pending.append(table)
        self._rows += table.num_rows
        self._bytes += table.nbytes
        if self._rows >= ROW_GROUP_ROWS or self._bytes >= ROW_GROUP_BYTES:
            self.flush()

    def flush(self) -> None:
        if self._pending:
            table = pa.concat_tables(self._pending)
            self._pending, self._rows, self._bytes = [], 0, 0
            self._writer.write_table(table, row_group_size=table.num_rows)

    def close(self) -> None:
        self._pending = []
        self._writer.close()


def _check_alignment(spec: JobSpec, k: int, seg_rows: int, inp: pa.Table, res: pa.Table) -> None:
    start = k * seg_rows
    rows = res.column("row").to_numpy()
    if res.num_rows != inp.num_rows or not np.array_equal(rows, np.arange(start, start + inp.num_rows)):
        raise StateError(
            f"checkpoint segment {k} does not cover input rows {start}..{start + inp.num_rows - 1}; "
            "run with --restart to redo the job"
        )
    expected = render_prompts(inp, spec).hashes()
    if not np.array_equal(expected, res.column("prompt_hash").to_numpy()):
        bad = int(np.argmax(expected != res.column("prompt_hash").to_numpy()))
        raise StateError(
            f"checkpoint segment {k} holds a result for another prompt at input row {start + bad}; "
            "the input changed under the run: run with --restart"
        )
    if spec.id_column:
        if source.id_strings(inp, spec.id_column) != res.column("id").to_pylist():
            raise StateError(f"checkpoint segment {k} ids differ from the input's; run with --restart")
