"""What batchrun checks of its input before it sends anything: the files' schema."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from . import csvinput, source
from .errors import JobError


def read_schema(files: Sequence[Path], fmt: str) -> pa.Schema:
    """The input's columns and their types (CSV: all text); every file of a glob must have the
    same columns, in order, of the same types (Arrow cannot join a column of two types)."""
    first: pa.Schema | None = None
    problems = []
    for f in files:
        schema = _file_schema(f, fmt)
        if first is None:
            first = schema
        elif schema.names != first.names:
            raise JobError(
                f"{f.name} has columns {schema.names}, but {files[0].name} has {first.names}; "
                "every input file must have the same columns"
            )
        else:
            problems += [
                f"column {a.name!r} is {a.type} in {files[0].name} but {b.type} in {f.name}; "
                "every input file must give a column the same type"
                for a, b in zip(first, schema)
                if not a.type.equals(b.type)
            ]
    if problems:
        raise JobError(problems)
    names = first.names if first is not None else []
    if len(set(names)) != len(names):
        dup = sorted({c for c in names if names.count(c) > 1})
        raise JobError(f"the input has duplicate column names: {dup}")
    return first if first is not None else pa.schema([])


def _file_schema(path: Path, fmt: str) -> pa.Schema:
    if fmt == "csv":
        return pa.schema([(name, pa.string()) for name in csvinput.header(path)])
    try:
        return pq.read_schema(path)
    except (pa.ArrowException, OSError) as exc:
        raise JobError(f"cannot read {path.name} as parquet: {source.one_line(exc)}") from None
