"""The run directory: plan, lock, atomic segment commits, and what is done.

Layout of ``<output>.batchrun/``::

    plan.json                  what the run was planned from (input fingerprint, settings, rows)
    lock                       flock'd by the running process; never deleted
    segments/seg-00000042.parquet   results for input rows [42*S, 43*S), one file per segment
    partial/seg-00000042.<run>.parquet  resolved rows of a segment not yet complete
    finished.json              written after the output file was published

The files are the truth. A segment file exists only once every row of its segment is resolved
(answered or failed), its name is fixed by its position, so a retried or concurrent commit
converges on one file. Partial files are subsets of a segment's rows and may overlap: any result
for a row under the same plan is a valid result for it, so overlaps are resolved by taking one.
Every result carries its row's prompt hash, checked again when the output is written.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from .errors import BusyError, StorageError

PLAN_VERSION = 1
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
    ]
)
_STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


@dataclass(frozen=True)
class SegmentInfo:
    """What a committed segment's footer says of it."""

    rows: int
    failed: int
    retryable: int  # failed rows a rerun sends again (all but empty prompts)
    params_types: dict[str, str] = field(default_factory=dict)

    def metadata(self, k: int) -> dict[str, str]:
        return {
            "batchrun.segment": str(k),
            "batchrun.failed": str(self.failed),
            "batchrun.retryable": str(self.retryable),
            "batchrun.params_types": json.dumps(self.params_types, sort_keys=True),
        }


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _storage_error(exc: OSError, what: Path) -> StorageError:
    reason = {
        errno.ENOSPC: "no space left on device",
        errno.EDQUOT: "disk quota exceeded",
        errno.EFBIG: "file too large for this filesystem or limit",
    }.get(exc.errno or 0, exc.strerror or str(exc))
    return StorageError(f"cannot write {what}: {reason}; free space and run the same command")


@contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; on success fsync it and rename it into place.

    A reader sees the old file or the complete new one, never a half-written one; a crash
    leaves only a ``.tmp-`` file, which the next run ignores and clears.
    """
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, final)
        fsync_dir(final.parent)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.errno in _STORAGE_ERRNOS:
            raise _storage_error(exc, final) from None
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, doc: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError):
        return None


class RunState:
    """One job's run directory."""

    def __init__(self, root: Path):
        self.root = root
        self.segments_dir = root / "segments"
        self.partial_dir = root / "partial"
        self.plan_path = root / "plan.json"
        self.finished_path = root / "finished.json"
        self.lock_path = root / "lock"

    # -- set-up ---------------------------------------------------------------------------------
    def ensure_dirs(self) -> None:
        try:
            for d in (self.root, self.segments_dir, self.partial_dir):
                d.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            if exc.errno in _STORAGE_ERRNOS:
                raise _storage_error(exc, self.root) from None
            raise

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the job's lock, or raise ``BusyError`` naming the process that holds it.

        The lock saves money (no two runs pay for the same rows); correctness never depends on it.
        """
        self.ensure_dirs()
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 512, 0).decode("utf-8", "replace").strip() or "unknown process"
                raise BusyError(str(self.lock_path), holder) from None
            me = f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%dT%H:%M:%S%z')}"
            os.ftruncate(fd, 0)
            os.pwrite(fd, me.encode(), 0)
            yield
        finally:
            os.close(fd)  # closing releases the flock; the file stays

    def reset(self) -> None:
        """Discard all progress (``--restart``): segments, partials, plan and finish marker."""
        for d in (self.segments_dir, self.partial_dir):
            if d.exists():
                for f in d.iterdir():
                    f.unlink()
        for f in (self.plan_path, self.finished_path):
            f.unlink(missing_ok=True)

    def clear_temporaries(self) -> None:
        """Remove ``.tmp-`` files left by a crashed writer (never visible under a final name)."""
        for d in (self.root, self.segments_dir, self.partial_dir):
            for f in d.glob(".*.tmp-*"):
                f.unlink(missing_ok=True)

    # -- plan -----------------------------------------------------------------------------------
    def read_plan(self) -> dict[str, Any] | None:
        return read_json(self.plan_path)

    def write_plan(self, plan: dict[str, Any]) -> None:
        write_json_atomic(self.plan_path, {"version": PLAN_VERSION, **plan})

    # -- segments -------------------------------------------------------------------------------
    def segment_path(self, k: int) -> Path:
        return self.segments_dir / f"seg-{k:08d}.parquet"

    def scan_segments(self, expected_rows: dict[int, int] | None = None) -> dict[int, SegmentInfo]:
        """Committed segments by index, from their footers; unreadable or wrong-sized ones are
        removed so their rows are redone rather than trusted."""
        out: dict[int, SegmentInfo] = {}
        for f in self.segments_dir.glob("seg-*.parquet"):
            try:
                k = int(f.name[4:12])
                meta = pq.read_metadata(f)
                kv = meta.metadata or {}
                info = SegmentInfo(
                    rows=meta.num_rows,
                    failed=int(kv[b"batchrun.failed"]),
                    retryable=int(kv[b"batchrun.retryable"]),
                    params_types=json.loads(kv[b"batchrun.params_types"]),
                )
            except (ValueError, KeyError, OSError, pa.ArrowException):
                f.unlink(missing_ok=True)
                continue
            if expected_rows is not None and expected_rows.get(k) != meta.num_rows:
                f.unlink(missing_ok=True)
                continue
            out[k] = info
        return out

    def read_segment(self, k: int) -> pa.Table:
        return pq.read_table(self.segment_path(k), schema=RESULT_SCHEMA)

    def commit_segment(self, k: int, table: pa.Table, info: SegmentInfo) -> None:
        """Publish segment ``k`` (every row resolved, sorted by row), then drop its partials."""
        table = table.replace_schema_metadata(info.metadata(k))
        with atomic_path(self.segment_path(k)) as tmp:
            pq.write_table(table, tmp, compression="zstd")
        self.drop_partials(k)

    # -- partials -------------------------------------------------------------------------------
    def write_partial(self, k: int, run_id: str, table: pa.Table) -> None:
        with atomic_path(self.partial_dir / f"seg-{k:08d}.{run_id}.parquet") as tmp:
            pq.write_table(table, tmp, compression="zstd")

    def partial_segments(self) -> set[int]:
        out = set()
        for f in self.partial_dir.glob("seg-*.parquet"):
            try:
                out.add(int(f.name[4:12]))
            except ValueError:
                continue
        return out

    def read_partials(self, k: int) -> pa.Table | None:
        """Every row resolved in ``k``'s partial files, one result per row; damaged files dropped."""
        tables = []
        for f in sorted(self.partial_dir.glob(f"seg-{k:08d}.*.parquet")):
            try:
                tables.append(pq.read_table(f, schema=RESULT_SCHEMA))
            except (OSError, pa.ArrowException):
                f.unlink(missing_ok=True)
        if not tables:
            return None
        return pa.concat_tables(tables)

    def drop_partials(self, k: int) -> None:
        for f in self.partial_dir.glob(f"seg-{k:08d}.*.parquet"):
            f.unlink(missing_ok=True)

    # -- finish ---------------------------------------------------------------------------------
    def read_finished(self) -> dict[str, Any] | None:
        return read_json(self.finished_path)

    def write_finished(self, doc: dict[str, Any]) -> None:
        write_json_atomic(self.finished_path, doc)

    def clear_finished(self) -> None:
        self.finished_path.unlink(missing_ok=True)
