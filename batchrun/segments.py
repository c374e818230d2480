"""What a checkpoint segment holds and how its files are named: the results schema, the footer
(``SegmentInfo``) and the file names (``SegmentFile``), made and parsed here only."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pyarrow as pa
import pyarrow.parquet as pq

from .echoed import params_types

RESULT_SCHEMA = pa.schema(
    [
        ("row", pa.int64()),
        ("prompt_hash", pa.int64()),
        ("id", pa.string()),
        ("output", pa.list_(pa.string())),
        ("params", pa.string()),  # JSON as the endpoint echoed it; typed when the output is written
        ("error", pa.string()),
        ("attempts", pa.int32()),
        ("latency_s", pa.float64()),
        # Filled by OpenAI protocols (null for custom, and in segments written before they existed).
        ("finish_reason", pa.list_(pa.string())),
        ("prompt_tokens", pa.int64()),
        ("completion_tokens", pa.int64()),
    ]
)
# The error class of a row whose prompt is empty: skipped, not sent, not failed.
EMPTY_PROMPT = "empty_prompt"
# The error class of a row whose input cannot be sent at all (a malformed messages value): failed,
# never sent; a rerun finds it failed again until the input is fixed.
INVALID_INPUT = "invalid_input"


@dataclass(frozen=True)
class SegmentInfo:
    """What a committed segment's footer says of it."""

    rows: int
    failed: int  # rows with an error, skipped ones included (as the footer has always said)
    retryable: int  # failed rows a rerun sends again (all but empty prompts)
    params_types: dict[str, str] = field(default_factory=dict)
    failed_by_class: dict[str, int] = field(default_factory=dict)
    # Tokens the endpoint reported for the requests of the run that committed the segment
    # (OpenAI protocols; 0 for custom and for segments written before this was kept).
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @classmethod
    def of(cls, table: pa.Table, failed_by_class: dict[str, int], usage: tuple[int, int] = (0, 0)) -> SegmentInfo:
        """A complete segment's info, from its results, its failed rows counted by class and
        the tokens its requests were reported to spend."""
        failed = sum(failed_by_class.values())
        return cls(
            rows=table.num_rows,
            failed=failed,
            retryable=failed - failed_by_class.get(EMPTY_PROMPT, 0),
            params_types=params_types(table.column("params").unique().to_pylist()),
            failed_by_class=failed_by_class,
            prompt_tokens=usage[0],
            completion_tokens=usage[1],
        )

    @classmethod
    def of_footer(cls, meta: pq.FileMetaData) -> SegmentInfo:
        """What a committed segment's footer records; ``KeyError``/``ValueError`` when it lacks
        what ``metadata`` writes (a file that is not a committed segment)."""
        kv = meta.metadata or {}
        usage = kv.get(b"batchrun.usage")  # absent in footers written before tokens were kept
        prompt, completion = json.loads(usage) if usage is not None else (0, 0)
        return cls(
            rows=meta.num_rows,
            failed=int(kv[b"batchrun.failed"]),
            retryable=int(kv[b"batchrun.retryable"]),
            params_types=json.loads(kv[b"batchrun.params_types"]),
            failed_by_class=json.loads(kv[b"batchrun.failed_by_class"]),
            prompt_tokens=int(prompt),
            completion_tokens=int(completion),
        )

    @property
    def skipped(self) -> int:
        """Rows not sent because their prompt is empty: neither succeeded nor failed."""
        return self.failed_by_class.get(EMPTY_PROMPT, 0)

    def metadata(self, k: int) -> dict[str, str]:
        return {
            "batchrun.segment": str(k),
            "batchrun.failed": str(self.failed),
            "batchrun.retryable": str(self.retryable),
            "batchrun.params_types": json.dumps(self.params_types, sort_keys=True),
            "batchrun.failed_by_class": json.dumps(self.failed_by_class, sort_keys=True),
            "batchrun.usage": json.dumps([self.prompt_tokens, self.completion_tokens]),
        }


@dataclass(frozen=True)
class SegmentFile:
    """A segment's file name, made and parsed here and nowhere else.

    ``seg-00000042.parquet`` (committed results, ``segments/``), ``seg-00000042.<run>.parquet``
    (a partial checkpoint of run ``<run>``, ``partial/``), ``seg-00000042.sent`` (``journal/``).
    """

    k: int
    run: str | None = None
    kind: Literal["parquet", "sent"] = "parquet"

    @classmethod
    def parse(cls, name: str) -> SegmentFile | None:
        """The file a name stands for; None for any other name."""
        m = _SEGMENT_NAME.fullmatch(name)
        if m is None:
            return None
        kind: Literal["parquet", "sent"] = "sent" if m[3] == "sent" else "parquet"
        return cls(int(m[1]), m[2], kind)

    @property
    def name(self) -> str:
        return f"seg-{self.k:08d}" + (f".{self.run}" if self.run else "") + f".{self.kind}"

    @staticmethod
    def partials_of(k: int) -> str:
        """The glob of segment ``k``'s partial files."""
        return f"seg-{k:08d}.*.parquet"


_SEGMENT_NAME = re.compile(r"seg-(\d{8,})(?:\.([A-Za-z0-9_-]+))?\.(parquet|sent)")
# Every file of the three folders; SegmentFile.parse tells which belongs to which segment.
ANY_SEGMENT = "seg-*"


def read_checked(source: Path | pa.NativeFile) -> pa.Table:
    return pq.read_table(source, schema=RESULT_SCHEMA, page_checksum_verification=True)
