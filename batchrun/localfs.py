"""Files on local disk, published so that a reader or a crash never sees half of one: atomic
writes (temporary name, fsync, rename, fsync of the folder), Parquet with page checksums, storage
errors as ``StorageError``, and the crash points the crash tests stop the process at."""

from __future__ import annotations

import errno
import json
import os
import signal
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from .errors import StorageError

STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EACCES, errno.EPERM, errno.EROFS}


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def storage_error(exc: OSError, what: Path) -> StorageError:
    reason = {
        errno.ENOSPC: "no space left on device",
        errno.EDQUOT: "disk quota exceeded",
        errno.EFBIG: "file too large for this filesystem or limit",
    }.get(exc.errno or 0)
    if reason is not None:
        return StorageError(f"cannot write {what}: {reason}; free space and run the same command")
    reason = {errno.EROFS: "read-only file system"}.get(exc.errno or 0, exc.strerror or str(exc))
    return StorageError(f"cannot write {what}: {reason}; make it writable and run the same command")


def crashpoint(step: str) -> None:
    """Kill this process with SIGKILL right after ``step`` when ``BATCHRUN_CRASH_AT`` names it.

    The switch the crash tests use to stop the process at every step of the commit path:
    ``BATCHRUN_CRASH_AT=segment:renamed`` dies at the first such step, ``...@3`` at the third.
    Costs one dictionary lookup when unset.
    """
    wanted = os.environ.get("BATCHRUN_CRASH_AT")
    if not wanted:
        return
    name, _, nth = wanted.partition("@")
    if name != step:
        return
    _crash_counts[step] = _crash_counts.get(step, 0) + 1
    if _crash_counts[step] >= int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)


_crash_counts: dict[str, int] = {}


@contextmanager
def atomic_path(final: Path, kind: str = "file") -> Iterator[Path]:
    """Yield a temporary path beside ``final``; on success fsync it and rename it into place.

    A reader sees the old file or the complete new one, never a half-written one; a crash
    leaves only a ``.tmp-`` file, which the next run ignores and clears. ``kind`` names the
    crash points: ``<kind>:written``, ``<kind>:fsynced``, ``<kind>:renamed``.
    """
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        crashpoint(f"{kind}:written")
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        crashpoint(f"{kind}:fsynced")
        os.replace(tmp, final)
        crashpoint(f"{kind}:renamed")
        fsync_dir(final.parent)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.errno in STORAGE_ERRNOS:
            raise storage_error(exc, final) from None
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, doc: dict[str, Any], kind: str = "json") -> None:
    with atomic_path(path, kind) as tmp:
        tmp.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object from ``path``; None when it is missing, unreadable or not an object."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        return doc if isinstance(doc, dict) else None
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError):
        return None


def writer_gone(tmp: Path) -> bool:
    """Whether the process that was writing ``tmp`` (named ``.x.tmp-PID-RAND``) has ended.

    Shards of one job run side by side: one must never delete another's file mid-write.
    """
    try:
        pid = int(tmp.name.rsplit(".tmp-", 1)[1].split("-")[0])
    except (IndexError, ValueError):
        return True
    return pid != os.getpid() and process_ended(pid)


def remove_stale_temps(folder: Path, pattern: str) -> None:
    """Remove the temporary files ``pattern`` matches in ``folder`` whose writer has ended."""
    if folder.exists():
        for f in folder.glob(pattern):
            if writer_gone(f):
                f.unlink(missing_ok=True)


def output_temps(output: Path) -> str:
    """The glob of the temporary files beside an output: its own, its summaries' and its marker's."""
    return f".{output.name}*.tmp-*"


def process_ended(pid: int) -> bool:
    """Whether no process ``pid`` runs on this host (one of another user's counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def write_checked(table: pa.Table, where: Path | pa.NativeFile, *, row_group_size: int | None = None) -> None:
    # Page checksums let a reader tell a damaged file from a good one instead of trusting it.
    pq.write_table(table, where, compression="zstd", write_page_checksum=True, row_group_size=row_group_size)
