"""Reading CSV and Parquet input in bounded chunks: files, columns, segments, prompts and ids."""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator, Sequence
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, Literal

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from . import csvinput
from .errors import BatchrunError, JobError
from .iddigests import IdDigests
from .storage import InputStore, input_store

if TYPE_CHECKING:
    from .config import JobSpec, StorageSection

PARQUET_BUFFER_BYTES = 1 << 20


def resolve_input(pattern: str, base: Path, storage: StorageSection | None = None) -> list[PurePath]:
    """The input files a pattern names, relative to ``base``, sorted so positions are stable."""
    return list(input_store(pattern, storage).expand(pattern, base))


def detect_format(files: Sequence[PurePath]) -> Literal["csv", "parquet"]:
    """``csv`` or ``parquet``, from the files' extensions (all files must agree)."""
    kinds: set[Literal["csv", "parquet"]] = set()
    for f in files:
        suffixes = [s.lower() for s in f.suffixes]
        if ".parquet" in suffixes or ".pq" in suffixes:
            kinds.add("parquet")
        elif ".csv" in suffixes:
            kinds.add("csv")
        else:
            raise JobError(
                f"cannot tell the format of {f.name} from its extension; set input.format"
            )
    if len(kinds) > 1:
        raise JobError("the input mixes CSV and Parquet files; use one format per job")
    return kinds.pop()


def iter_batches(
    spec: JobSpec, columns: Sequence[str] | None, chunk_rows: int = 65536, *, start_row: int = 0
) -> Iterator[pa.RecordBatch]:
    """Stream the input's rows from ``start_row`` on, in order, chunk by chunk, never holding the
    whole input. Parquet skips to ``start_row`` by its metadata without reading what lies before;
    CSV has no index, so the rows before it are parsed and dropped.

    The one reader of the input: whatever pyarrow raises over a file's bytes (a damaged page, a
    truncated file, text that is not UTF-8) becomes a ``JobError`` naming the file here, and
    where it can the column and row.
    """
    skip = start_row
    row = start_row  # the input row of the next row yielded
    # A glob's files may disagree on a column's nullability, which Arrow would refuse to join.
    conform = spec.input_format == "parquet" and len(spec.input_files) > 1
    store = input_store(spec.input_pattern, spec.storage)
    for f in spec.input_files:
        file_start = row - skip
        try:
            if spec.input_format == "parquet":
                batches, skip = _parquet_batches(store, f, columns, chunk_rows, skip)
            else:
                batches = csvinput.batches(store, f, columns, spec.csv_block_bytes)
            for batch in batches:
                part, skip = _drop_head(batch, skip)
                if part is not None:
                    if spec.input_format == "parquet":
                        # pyarrow's Parquet reader does not check that strings are UTF-8 (its
                        # CSV reader does); polars aborts the process on such a string.
                        part = _checked(part, f, row - file_start)
                        part = _nullable(part) if conform else part
                    row += part.num_rows
                    yield part
        except pa.ArrowMemoryError:
            raise
        except (pa.ArrowException, OSError) as exc:
            raise _unreadable(spec, f, columns, exc, row - file_start, chunk_rows) from None


def read_sample(spec: JobSpec, path: PurePath, columns: Sequence[str]) -> Iterator[pa.RecordBatch]:
    """One file's first row group (Parquet) or first block (CSV) of ``columns``, read and checked
    as ``iter_batches`` reads them: a cheap proof that the file can be read at all."""
    row = 0
    store = input_store(spec.input_pattern, spec.storage)
    try:
        if spec.input_format == "csv":
            batches = csvinput.batches(store, path, columns, spec.csv_block_bytes)
            try:
                yield from itertools.islice(batches, 1)
            finally:
                batches.close()
            return
        pf = _open_parquet(store, path)
        try:
            if pf.metadata.num_row_groups:
                for batch in pf.iter_batches(batch_size=65536, row_groups=[0], columns=list(columns)):
                    yield _checked(batch, path, row)
                    row += batch.num_rows
        finally:
            pf.close()
    except pa.ArrowMemoryError:
        raise
    except (pa.ArrowException, OSError) as exc:
        raise _unreadable(spec, path, columns, exc, row, 65536) from None


def one_line(exc: BaseException) -> str:
    """An exception's message on one line (pyarrow's span several)."""
    text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return " ".join(text.split()) or exc.__class__.__name__


def _unreadable(
    spec: JobSpec, path: PurePath, columns: Sequence[str] | None, exc: BaseException, at: int, span: int
) -> BatchrunError:
    """The error for a file that failed to read at or after its row ``at``: the store's when it
    stopped answering, else the file's."""
    failure = input_store(spec.input_pattern, spec.storage).read_failure(exc, path)
    if failure is not None:
        return failure
    if isinstance(exc, pa.ArrowInvalid) and csvinput.straddles(exc):
        return JobError(
            f"{path.name}: a CSV row is longer than input.csv_max_row_mb "
            f"({spec.csv_block_bytes / (1 << 20):g} MB); raise it for this input "
            "(memory use grows about 40 times as much)"
        )
    where = ""
    if spec.input_format == "parquet":
        found = _find_damage(input_store(spec.input_pattern, spec.storage), path, columns, at, span)
        if found is not None:
            name, group, lo, hi = found
            where = f" (column {name!r}, row group {group}: rows {lo}-{hi - 1} of the file)"
    return JobError(f"cannot read {path.name} as {spec.input_format}{where}: {one_line(exc)}")


def _find_damage(
    store: InputStore,
    path: PurePath, columns: Sequence[str] | None, at: int, span: int
) -> tuple[str, int, int, int] | None:
    """The first column and row group that fail to read alone, among the row groups a failed
    read of ``span`` rows from row ``at`` touched; None if none does (or the footer itself fails)."""
    try:
        pf = _open_parquet(store, path)
    except (pa.ArrowException, OSError):
        return None
    try:
        meta = pf.metadata
        names = list(columns) if columns else pf.schema_arrow.names
        lo = 0
        for group in range(meta.num_row_groups):
            hi = lo + meta.row_group(group).num_rows
            if hi > at and lo < at + span:
                for name in names:
                    try:
                        for _ in pf.iter_batches(batch_size=4096, row_groups=[group], columns=[name]):
                            pass
                    except (pa.ArrowException, OSError):
                        return name, group, lo, hi
            lo = hi
        return None
    finally:
        pf.close()


def _checked(batch: pa.RecordBatch, path: PurePath, row: int) -> pa.RecordBatch:
    """``batch`` (rows from ``row`` of its file on) if its values are valid (every string UTF-8,
    every offset in bounds); else a ``JobError`` naming the file, column and, for text, the row."""
    try:
        batch.validate(full=True)
        return batch
    except pa.ArrowInvalid:
        pass
    for field, column in zip(batch.schema, batch.columns):
        try:
            column.validate(full=True)
        except pa.ArrowInvalid as exc:
            reason = one_line(exc)
            found = re.search(r"UTF8 sequence at string index (\d+)", reason)
            if found is None:
                raise JobError(
                    f"cannot read {path.name} as parquet: column {field.name!r} holds invalid "
                    f"values in rows {row}-{row + batch.num_rows - 1} of the file ({reason})"
                ) from None
            at = ""
            if pa.types.is_string(field.type) or pa.types.is_large_string(field.type):
                at = f" at row {row + int(found[1])} of the file"
            raise JobError(
                f"{path.name}: column {field.name!r} holds text that is not UTF-8{at}; "
                "Parquet strings must be UTF-8"
            ) from None
    return batch


def _nullable(batch: pa.RecordBatch) -> pa.RecordBatch:
    if all(f.nullable for f in batch.schema):
        return batch
    schema = pa.schema([f.with_nullable(True) for f in batch.schema], metadata=batch.schema.metadata)
    return pa.RecordBatch.from_arrays(batch.columns, schema=schema)


def _drop_head(batch: pa.RecordBatch, skip: int) -> tuple[pa.RecordBatch | None, int]:
    """What is left of ``batch`` after its first ``skip`` rows (None if nothing), and the rows
    still to skip in the batches after it."""
    if skip >= batch.num_rows:
        return None, skip - batch.num_rows
    return (batch.slice(skip) if skip else batch), 0


def _parquet_batches(
    store: InputStore,
    path: PurePath, columns: Sequence[str] | None, chunk_rows: int, skip: int
) -> tuple[Iterator[pa.RecordBatch], int]:
    """Batches of one Parquet file from its first row group holding row ``skip``, and how many
    rows of what they yield are still to skip."""
    pf = _open_parquet(store, path)
    meta = pf.metadata
    first = 0
    while first < meta.num_row_groups and skip >= meta.row_group(first).num_rows:
        skip -= meta.row_group(first).num_rows
        first += 1

    def batches() -> Iterator[pa.RecordBatch]:
        try:
            if first < meta.num_row_groups:
                yield from pf.iter_batches(
                    batch_size=chunk_rows,
                    row_groups=range(first, meta.num_row_groups),
                    columns=list(columns) if columns else None,
                )
        finally:
            pf.close()

    return batches(), skip


def _open_parquet(store: InputStore, path: PurePath) -> pq.ParquetFile:
    # pre_buffer (pyarrow's default) keeps every row group read until the file is closed: a
    # 3 GB input held 2.6 GB by its end. buffer_size streams each column chunk page by page
    # instead of reading it whole (a row group of wide rows can be gigabytes). Pages written
    # with a checksum are checked against it: without, a damaged page can decode to other values.
    return pq.ParquetFile(
        store.open(path), pre_buffer=False, buffer_size=PARQUET_BUFFER_BYTES, page_checksum_verification=True
    )


def iter_segments(
    spec: JobSpec, columns: Sequence[str] | None, segment_rows: int, *, start: int = 0
) -> Iterator[tuple[int, pa.Table]]:
    """Yield ``(k, table)`` for ``k >= start``, table holding input rows
    ``[k*segment_rows, (k+1)*segment_rows)``."""
    pending: list[pa.RecordBatch] = []
    held = 0
    k = start
    for batch in iter_batches(spec, columns, max(segment_rows, 1024), start_row=start * segment_rows):
        if batch.num_rows == 0:
            continue
        pending.append(batch)
        held += batch.num_rows
        while held >= segment_rows:
            table = pa.Table.from_batches(pending)
            yield k, table.slice(0, segment_rows)
            k += 1
            rest = table.slice(segment_rows)
            pending, held = rest.to_batches(), rest.num_rows
    if held:
        yield k, pa.Table.from_batches(pending)


def id_strings(table: pa.Table, column: str) -> list[str | None]:
    """Ids as text, the form checkpoint files keep them in (whatever the column's type)."""
    values: list[str | None] = _id_text(table.column(column)).to_list()
    return values


def _id_text(column: pa.Array | pa.ChunkedArray) -> pl.Series:
    series = pl.from_arrow(column)
    assert isinstance(series, pl.Series)  # an Arrow array (not a table) becomes a Series
    return series.cast(pl.String)


def count_rows_and_check_ids(spec: JobSpec) -> int:
    """Count the input's rows; with an id column, refuse null or duplicate ids, naming some."""
    if spec.input_format == "parquet" and spec.id_column is None:
        return sum(_parquet_rows(spec, f) for f in spec.input_files)
    cols = [spec.id_column] if spec.id_column else [spec.columns[0]]
    total = 0
    with IdDigests() as digests:
        for batch in iter_batches(spec, cols):
            total += batch.num_rows
            if spec.id_column:
                ids = _id_text(batch.column(0))
                if ids.null_count():
                    row = total - batch.num_rows + int(ids.is_null().arg_true()[0])
                    raise JobError(
                        f"{spec.job_path}: input.id_column: column {spec.id_column!r} is null at "
                        f"input row {row}; ids must be set on every row"
                    )
                digests.add(ids.hash(seed=0).to_numpy())
        clash = digests.repeated()
    if clash.size:
        _refuse_duplicate_ids(spec, clash)
    return total


def _parquet_rows(spec: JobSpec, path: PurePath) -> int:
    try:
        with input_store(spec.input_pattern, spec.storage).open(path) as fh:
            rows: int = pq.read_metadata(fh).num_rows
        return rows
    except (pa.ArrowException, OSError) as exc:
        raise _unreadable(spec, path, None, exc, 0, 0) from None


def _refuse_duplicate_ids(spec: JobSpec, clash: np.ndarray) -> None:
    # A repeated digest may be a hash collision: it is confirmed against the real ids in a second
    # pass, so a collision alone never refuses a job.
    suspects = pl.Series(clash)
    assert spec.id_column is not None
    seen: dict[str, int] = {}
    for batch in iter_batches(spec, [spec.id_column]):
        ids = _id_text(batch.column(0))
        for value in ids.filter(ids.hash(seed=0).is_in(suspects.implode())).to_list():
            seen[value] = seen.get(value, 0) + 1
    dups = [v for v, n in seen.items() if n > 1]
    if dups:
        shown = ", ".join(repr(v) for v in dups[:5])
        more = f" and {len(dups) - 5} more" if len(dups) > 5 else ""
        raise JobError(
            f"{spec.job_path}: input.id_column: column {spec.id_column!r} must be unique; "
            f"duplicated: {shown}{more}"
        )
