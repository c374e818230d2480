"""The planning step's look at the input, before anything is sent: which files a job's input
names, their format and schema, the types a prompt, template or id column may have, and a
readable sample of every file. ``open_job`` is ``load_job`` with this step."""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, Literal

import pyarrow as pa
import pyarrow.parquet as pq

from . import csvinput, source
from .errors import JobError
from .prompts import render_prompts
from .storage import InputStore, input_store
from .wire import COLUMNS, result_columns

if TYPE_CHECKING:
    from .config import InputFiles, InputSection, JobSpec, StorageSection

# Columns batchrun adds to every output row of a custom job (OpenAI protocols add more); an
# input column with one of these names is refused.
RESULT_COLUMNS = COLUMNS["custom"]


def open_job(path: str | Path) -> JobSpec:
    """``load_job`` and the input check together: every problem of the job file and of its
    input in one ``JobError``."""
    from .config import load_job

    return load_job(path, scan_input=scan_input)


def with_input(spec: JobSpec) -> JobSpec:
    """``spec`` with its input looked at (a spec from ``load_job`` has not been); ``JobError``
    listing the input's problems."""
    if spec.input is not None:
        return spec
    from .config import InputSection
    section = InputSection(
        path=spec.input_pattern, prompt_column=spec.prompt_column, template=spec.template,
        messages_column=spec.messages_column, id_column=spec.id_column, format=spec.input_format_option,
    )
    found, problems = scan_input(
        section, spec.job_path.parent, spec.template_fields, result_columns(spec), spec.storage
    )
    if problems:
        raise JobError([f"{spec.job_path}: {p}" for p in problems])
    return spec.model_copy(update={"input": found})


def scan_input(
    inp: InputSection,
    base: Path,
    template_fields: tuple[str, ...],
    added: tuple[str, ...] = RESULT_COLUMNS,
    storage: StorageSection | None = None,
) -> tuple[InputFiles | None, list[str]]:
    """The files ``inp`` names, their format and columns, and what is wrong with them for this
    job (each problem worded "input.<key>: ...")."""
    from .config import InputFiles

    problems: list[str] = []
    try:
        files = tuple(source.resolve_input(inp.path, base, storage))
        fmt: Literal["csv", "parquet"] = inp.format or source.detect_format(files)
        schema = read_schema(files, fmt, input_store(inp.path, storage))
    except JobError as exc:
        return None, [f"input.path: {p}" for p in exc.problems]
    columns = tuple(schema.names)
    problems += column_type_problems(
        schema, prompt_column=inp.prompt_column, template_fields=template_fields, id_column=inp.id_column,
        messages_column=inp.messages_column,
    )
    wanted = [("prompt_column", inp.prompt_column), ("id_column", inp.id_column)]
    wanted += [("messages_column", inp.messages_column)]
    wanted += [("template", f) for f in template_fields]
    for key, col in wanted:
        if col is not None and col not in columns:
            problems.append(
                f"input.{key}: column {col!r} is not in the input (columns: {', '.join(columns)})"
                + _near_column(col, columns)
            )
    clash = [c for c in columns if c in added]
    if clash:
        problems.append(
            f"input.path: input column(s) {', '.join(map(repr, clash))} clash with "
            f"the columns batchrun adds ({', '.join(added)}); rename them"
        )
    return InputFiles(files=files, format=fmt, columns=columns), problems


def _near_column(name: str, columns: tuple[str, ...]) -> str:
    by_lower = {c.lower(): c for c in columns}
    near = difflib.get_close_matches(name.lower(), list(by_lower), n=1)
    return f"; did you mean '{by_lower[near[0]]}'?" if near else ""


def read_schema(files: Sequence[PurePath], fmt: str, store: InputStore) -> pa.Schema:
    """The input's columns and their types (CSV: all text); every file of a glob must have the
    same columns, in order, of the same types (Arrow cannot join a column of two types)."""
    first: pa.Schema | None = None
    problems = []
    for f in files:
        schema = _file_schema(store, f, fmt)
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


def _file_schema(store: InputStore, path: PurePath, fmt: str) -> pa.Schema:
    if fmt == "csv":
        return pa.schema([(name, pa.string()) for name in csvinput.header(store, path)])
    try:
        with store.open(path) as fh:
            return pq.read_schema(fh)
    except (pa.ArrowException, OSError) as exc:
        raise JobError(f"cannot read {path.name} as parquet: {source.one_line(exc)}") from None


def column_type_problems(
    schema: pa.Schema,
    *,
    prompt_column: str | None,
    template_fields: Sequence[str],
    id_column: str | None,
    messages_column: str | None = None,
) -> list[str]:
    """What is wrong with the types of the columns a job names (columns it lacks are left to
    the caller): a prompt is made of text or numbers, an id of a scalar that prints exactly."""
    types = dict(zip(schema.names, schema.types))
    problems = []
    if prompt_column in types and not _text_or_number(types[prompt_column]):
        problems.append(
            f"input.prompt_column: column {prompt_column!r} is {_shown(types[prompt_column])}, not "
            "text or a number; a prompt must be text (numbers are sent as their text)"
        )
    for name in template_fields:
        if name in types and not _text_or_number(types[name]):
            problems.append(
                f"input.template: column {name!r} is {_shown(types[name])}, not text or a number; a "
                "template may only name text or number columns"
            )
    if messages_column in types and not _messages_type(types[messages_column]):
        problems.append(
            f"input.messages_column: column {messages_column!r} is {_shown(types[messages_column])}; messages "
            "are a list<struct<role, content>> column, or JSON text of one"
        )
    if id_column in types and not _id_type(types[id_column]):
        problems.append(
            f"input.id_column: column {id_column!r} is {_shown(types[id_column])}, which cannot be "
            "an id; use a column of text, integers or dates"
        )
    return problems


def _shown(t: pa.DataType) -> str:
    """A type as a user knows it: ``list<string>``, not the child field names a writer chose."""
    if pa.types.is_map(t):
        return f"map<{_shown(t.key_type)}, {_shown(t.item_type)}>"
    if pa.types.is_fixed_size_list(t):
        return f"fixed_size_list<{_shown(t.value_type)}>[{t.list_size}]"
    if isinstance(t, (pa.ListType, pa.LargeListType, pa.ListViewType, pa.LargeListViewType)):
        return f"{str(t).split('<', 1)[0]}<{_shown(t.value_type)}>"
    if pa.types.is_struct(t):
        return "struct<" + ", ".join(f"{f.name}: {_shown(f.type)}" for f in t) + ">"
    return str(t)


def _text_or_number(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        return _text_or_number(t.value_type)
    # null: a column with no value at all (every row an empty prompt, none sent).
    return _is_text(t) or pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t) or pa.types.is_null(t)


def _messages_type(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        return _messages_type(t.value_type)
    if _is_text(t) or pa.types.is_null(t):
        return True
    is_list = isinstance(t, (pa.ListType, pa.LargeListType, pa.ListViewType, pa.LargeListViewType))
    return is_list and pa.types.is_struct(t.value_type)


def _id_type(t: pa.DataType) -> bool:
    """Types whose values print as one exact, stable text (checkpoint files keep ids as text)."""
    if pa.types.is_dictionary(t):
        return _id_type(t.value_type)
    return _is_text(t) or any(
        check(t)
        for check in (
            pa.types.is_integer, pa.types.is_floating, pa.types.is_decimal, pa.types.is_boolean,
            pa.types.is_date, pa.types.is_timestamp, pa.types.is_time,
        )
    )


def _is_text(t: pa.DataType) -> bool:
    return bool(pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t))


def check_sample(spec: JobSpec) -> None:
    """Read and render a sample of every input file as a run would, cheaply: the first block of
    a CSV file, the first row group of a Parquet file's prompt and id columns (never a whole
    file, in bounded memory). Raises ``JobError`` naming the file that cannot be read."""
    columns = list(dict.fromkeys([*spec.prompt_columns, *([spec.id_column] if spec.id_column else [])]))
    for f in spec.input_files:
        for batch in source.read_sample(spec, f, columns):
            table = pa.Table.from_batches([batch])
            render_prompts(table, spec)
            if spec.id_column:
                source.id_strings(table, spec.id_column)
