"""Reading CSV input: the header, every column as text, in blocks grown only for rows that need it."""

from __future__ import annotations

import csv
import io
from collections.abc import Generator, Sequence
from pathlib import PurePath
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.csv as pacsv

from .errors import JobError

if TYPE_CHECKING:
    from .storage import InputStore

FIRST_BLOCK_BYTES = 256 << 10


def header(store: InputStore, path: PurePath) -> list[str]:
    """A CSV file's column names, from its header row."""
    # surrogateescape: the file is decoded ahead of the header line, and a bad byte further on
    # is the rows' problem (reported with them when they are read), not the header's.
    try:
        with io.TextIOWrapper(store.open(path), encoding="utf-8-sig", errors="surrogateescape", newline="") as fh:
            names = next(csv.reader(fh), [])
    except csv.Error as exc:
        raise JobError(f"{path.name}: cannot parse the CSV header: {exc}") from None
    except OSError as exc:
        raise JobError(f"cannot read {path.name} as csv: {exc.strerror or exc}") from None
    if not names:
        raise JobError(f"{path.name} is empty: a CSV input needs a header row")
    try:
        "".join(names).encode("utf-8")
    except UnicodeEncodeError:
        raise JobError(f"{path.name}: the header is not UTF-8 text") from None
    return names


def _open(
    store: InputStore, path: PurePath, columns: Sequence[str] | None, block_bytes: int
) -> pacsv.CSVStreamingReader:
    # Every CSV column is read as text: a type guessed from the first block can turn out wrong
    # millions of rows later, and CSV carries text anyway. Nothing is lost; nothing is guessed.
    names = header(store, path)
    return pacsv.open_csv(
        store.open(path),
        read_options=pacsv.ReadOptions(block_size=block_bytes),
        parse_options=pacsv.ParseOptions(newlines_in_values=True),
        convert_options=pacsv.ConvertOptions(
            column_types={n: pa.string() for n in names},
            include_columns=list(columns) if columns is not None else None,
            strings_can_be_null=False,
            quoted_strings_can_be_null=False,
        ),
    )


def batches(
    store: InputStore, path: PurePath, columns: Sequence[str] | None, max_block: int
) -> Generator[pa.RecordBatch, None, None]:
    """A CSV file's batches, read in small blocks, grown only for an input whose rows need it.

    pyarrow's streaming reader reads ahead 32 blocks in the background, so memory grows with
    the block, and the block bounds the longest row it can parse. Reading starts at 256 KB;
    a row that does not fit makes the file be read again from its start with a block four
    times larger (up to ``max_block``), skipping the rows already yielded.
    """
    block = min(FIRST_BLOCK_BYTES, max_block)
    done = 0
    while True:
        reader = None
        skip = done
        try:
            # Opening reads the first block: a first row longer than it fails here already.
            reader = _open(store, path, columns, block)
            for batch in reader:
                if skip >= batch.num_rows:
                    skip -= batch.num_rows
                    continue
                part, skip = (batch.slice(skip) if skip else batch), 0
                done += part.num_rows
                yield part
            return
        except pa.ArrowInvalid as exc:
            if not straddles(exc) or block >= max_block:
                raise
            block = min(block * 4, max_block)
        finally:
            if reader is not None:
                reader.close()


def straddles(exc: pa.ArrowInvalid) -> bool:
    """Whether pyarrow's CSV reader failed on a row longer than its block ("straddling" is its word)."""
    return "straddl" in str(exc)
