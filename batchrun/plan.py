"""The plan a job's progress is made under: a typed, versioned record, read and written here only.

A plan pins the input (its files' fingerprints), the settings that shape the outputs, and how the
rows are cut into segments. Every run of the job reads it before sending anything; a run whose
input or settings differ is refused (or, with an id column, planned again incrementally).

Versions: 1 fingerprinted large files by their first and last MB; 2 (today) by a whole-file
SHA-256. A version-1 plan is still read (its fingerprints compared the old way); a plan from a
newer batchrun is refused rather than half understood.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, TypedDict

from .errors import StateError

PLAN_VERSION = 2


class FileMark(TypedDict, total=False):
    """One input file as the plan pinned it (version 2: ``sha256``; version 1: ``sample_sha256``)."""

    path: str
    size: int
    mtime_ns: int
    sha256: str
    sample_sha256: str
    etag: str  # objects on a store: what tells one upload from another (absent for local files)


@dataclass(frozen=True)
class Plan:
    rows: int
    segment_rows: int
    fingerprint: list[FileMark]
    settings: dict[str, Any]
    created_at: str = ""
    # With an id column, a changed input is planned again: how many rows were reused, changed, new.
    incremental: dict[str, int] | None = None
    version: int = PLAN_VERSION
    # Keys a later batchrun of the same version may add; kept so a rewrite does not drop them.
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def segment_count(self) -> int:
        return math.ceil(self.rows / self.segment_rows)

    def sizes(self) -> dict[int, int]:
        """Rows in each segment, by index: all ``segment_rows`` but the last."""
        return segment_sizes(self.rows, self.segment_rows)

    def with_fingerprint(self, fingerprint: list[FileMark]) -> Plan:
        return replace(self, fingerprint=fingerprint)

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            **self.extra,
            "version": self.version,
            "rows": self.rows,
            "segment_rows": self.segment_rows,
            "fingerprint": list(self.fingerprint),
            "settings": self.settings,
            "created_at": self.created_at,
        }
        if self.incremental is not None:
            doc["incremental"] = self.incremental
        return doc

    @classmethod
    def from_json(cls, doc: dict[str, Any], where: str) -> Plan:
        """The plan in ``doc``; ``StateError`` naming ``where`` for one this batchrun cannot use."""
        version = doc.get("version", 1)
        if type(version) is not int or version < 1:
            raise StateError(f"{where}: the plan's version is not a positive integer (got {version!r})")
        if version > PLAN_VERSION:
            raise StateError(
                f"the saved progress was planned by a newer batchrun (plan version {version}); "
                "run it with that version, or run with --restart to discard it"
            )
        rows, seg, marks, settings = (doc.get(k) for k in ("rows", "segment_rows", "fingerprint", "settings"))
        problems = []
        if type(rows) is not int or rows < 0:
            problems.append(f"rows is {rows!r}")
        if type(seg) is not int or seg < 1:
            problems.append(f"segment_rows is {seg!r}")
        if not isinstance(marks, list) or not all(isinstance(m, dict) for m in marks):
            problems.append("fingerprint is not a list of objects")
        if settings is None:
            settings = {}  # plans of the first versions had none: every setting then reads as changed
        if not isinstance(settings, dict):
            problems.append("settings is not an object")
        incremental = doc.get("incremental")
        if incremental is not None and not isinstance(incremental, dict):
            problems.append("incremental is not an object")
        if problems:
            raise StateError(
                f"{where}: the plan is malformed ({'; '.join(problems)}); "
                "run with --restart to discard the saved progress"
            )
        assert isinstance(rows, int) and isinstance(seg, int) and isinstance(marks, list)
        assert isinstance(settings, dict)
        known = {"version", "rows", "segment_rows", "fingerprint", "settings", "created_at", "incremental"}
        return cls(
            rows=rows, segment_rows=seg, fingerprint=marks, settings=settings,
            created_at=str(doc.get("created_at", "")), incremental=incremental, version=version,
            extra={k: v for k, v in doc.items() if k not in known},
        )


def segment_sizes(rows: int, seg_rows: int) -> dict[int, int]:
    n = math.ceil(rows / seg_rows)
    return {k: min(seg_rows, rows - k * seg_rows) for k in range(n)}
