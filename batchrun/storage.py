"""The storage seam: where a job's input is read, its output published and its progress kept.

Three protocols, each with the local filesystem as its first implementation:

- ``InputStore`` (``LocalStore``): the files a pattern names, their size and modification time,
  and a random-access reader over each (pyarrow reads Parquet footers and pages, and CSV blocks,
  through it: ranged reads, never a whole-file copy).
- ``OutputStore`` (``LocalStore``): a file published whole or not at all, small JSON documents
  (the summary, the success marker) beside it, and what identifies a published file.
- ``ProgressStore`` (``checkpoint.RunState``; ``s3state.S3RunState`` on S3): the run state a job
  resumes from.

Locations are paths (``PurePath``): a local path for the local store; an object store would take
``bucket/key`` paths of its own and be chosen by ``input_store``/``output_store`` from the job.
What any implementation must guarantee is written on each method.
"""

from __future__ import annotations

import functools
import glob
import os
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, TypeGuard

import pyarrow as pa

from .errors import BatchrunError, JobError, StorageError
from .localfs import atomic_path, output_temps, read_json, remove_stale_temps, storage_error, write_json_atomic

if TYPE_CHECKING:
    from .config import JobSpec, StorageSection
    from .plan import Plan
    from .s3store import S3Path, S3Store
    from .segments import SegmentInfo


class FileStat(NamedTuple):
    size: int
    mtime_ns: int
    # An object store's version tag (S3's ETag): it changes with every upload, as mtime does on a
    # disk, and unlike an object's Last-Modified (whole seconds) it tells two uploads in a second apart.
    etag: str | None = None


class InputStore(Protocol):
    def expand(self, pattern: str, base: Path) -> Sequence[PurePath]:
        """The files ``pattern`` (a path or a glob, relative to ``base``) names, sorted, so a
        row's position is the same on every run. ``JobError`` saying why when there is none."""
        ...

    def stat(self, path: PurePath) -> FileStat:
        """Size and modification time; ``JobError`` naming the file when it cannot be read."""
        ...

    def open(self, path: PurePath) -> pa.NativeFile:
        """A random-access reader of the file's bytes (seek and ranged reads), closed by the
        caller; ``OSError`` when the file cannot be opened."""
        ...

    def read_failure(self, exc: BaseException, path: PurePath) -> BatchrunError | None:
        """The store's own error when a read of ``path`` failed for the store's sake (it did not
        answer: exit 74, run again), None when the file's bytes are to blame."""
        ...


class OutputStore(Protocol):
    def ready(self, path: PurePath, *, create: bool) -> None:
        """Prove a file can be published at ``path`` (``create``: make its folder and write a
        probe; without it write nothing); ``StorageError`` naming the place if not."""
        ...

    def publish(
        self, path: PurePath, kind: str, before_visible: Callable[[dict[str, int]], None]
    ) -> AbstractContextManager[Path]:
        """A place to write the file that ``path`` will show: on a clean exit of the block the
        file appears there whole, replacing any other; on an error nothing is visible and the
        old file (if any) stays. ``before_visible`` gets the new file's identity before anyone
        can see it there, so a crash in between never leaves a file whose author is unknown."""
        ...

    def identity(self, path: PurePath) -> dict[str, int] | None:
        """What tells this file from any other at that path (None: there is none)."""
        ...

    def exists(self, path: PurePath) -> bool: ...

    def remove(self, path: PurePath) -> None:
        """Remove the file if it is there."""
        ...

    def read_json(self, path: PurePath) -> dict[str, Any] | None:
        """A JSON object; None when it is missing or unreadable."""
        ...

    def write_json(self, path: PurePath, doc: dict[str, Any], kind: str) -> None:
        """Publish a small JSON document, whole or not at all (its folder made if need be)."""
        ...

    def clear_leftovers(self, path: PurePath) -> None:
        """Remove the temporary files or staging objects a crashed publish left beside ``path``
        (never one a live writer may still use)."""
        ...

    def beside(self, path: PurePath, pattern: str) -> Sequence[PurePath]:
        """The files next to ``path`` whose names match the glob ``pattern``, sorted."""
        ...


class ProgressStore(Protocol):
    """A job's run state: the one truth a run resumes from (``checkpoint.RunState`` on a local
    folder; see its module for the layout and RELIABILITY.md for what each step must survive).

    What an implementation must guarantee: a committed segment is published whole under the one
    name its index gives it, so a retried or concurrent commit converges on one file; it reads
    back whole or raises ``checkpoint.DamagedStateError`` (and is then removed, its rows redone);
    a partial save is a subset of a segment's rows and may overlap others; the plan is written
    once per plan and read before anything is sent; ``record_output`` is durable before the
    output it names becomes visible. Locks only save money: correctness never depends on them.
    """

    @property
    def root(self) -> PurePath:
        """Where the state is, named in messages ("the progress in ..."): a local path or s3://."""
        ...

    # set-up, locks, housekeeping
    def ensure_dirs(self) -> None: ...
    def lock(self, name: str = "lock", *, wait: bool = False) -> AbstractContextManager[None]: ...
    def holders(self) -> dict[str, str]: ...
    def shard_count(self) -> int | None: ...
    def clear_leftovers(self) -> None: ...
    def reset(self) -> None: ...
    def drop_progress(self) -> None: ...
    def has_progress(self) -> bool: ...
    def scratch_path(self, name: str) -> Path: ...

    # the plan
    def read_plan(self) -> Plan | None: ...
    def write_plan(self, plan: Plan) -> None: ...

    # committed segments, partial saves, the journal of prompts sent
    def scan_segments(
        self, expected_rows: dict[int, int] | None = None, *, remove_damaged: bool = True
    ) -> dict[int, SegmentInfo]: ...
    def read_segment(self, k: int) -> pa.Table: ...
    def commit_segment(self, k: int, table: pa.Table, info: SegmentInfo) -> None: ...
    def write_partial(self, k: int, run_id: str, table: pa.Table) -> None: ...
    def read_partials(self, k: int) -> pa.Table | None: ...
    def partial_rows(self) -> int: ...
    def result_files(self, *, with_carry: bool = False) -> list[Path]:
        """Every file of results, as local files the caller reads but never removes (an object
        store downloads its objects to its scratch folder and removes them itself)."""
        ...

    def journal_sent(self, k: int, rows: list[int]) -> None: ...
    def read_journal(self, k: int) -> set[int]: ...
    def close_journals(self) -> None: ...

    # answers carried from a previous input (incremental runs by id)
    def has_carry(self) -> bool: ...
    def read_carry(self, start: int, stop: int) -> pa.Table | None: ...
    def carry_metadata(self) -> dict[bytes, bytes] | None: ...
    def write_carry(self, table: pa.Table) -> None: ...
    def drop_carry(self) -> None: ...

    # the finish, and the outputs this job published
    def read_finished(self) -> dict[str, Any] | None: ...
    def write_finished(self, doc: dict[str, Any]) -> None: ...
    def clear_finished(self) -> None: ...
    def record_output(self, identity: dict[str, int]) -> None: ...
    def wrote_output(self, identity: dict[str, int]) -> bool: ...


class LocalStore:
    """Local disks: glob, ``open``, write-fsync-rename and a folder probe."""

    # -- input ---------------------------------------------------------------------------------
    def expand(self, pattern: str, base: Path) -> list[PurePath]:
        full = pattern if os.path.isabs(pattern) else str(base / pattern)
        if glob.has_magic(full):
            found = sorted(Path(p).resolve() for p in glob.glob(full, recursive=True))
            files: list[PurePath] = [p for p in found if p.is_file()]
            if not files:
                dirs = " (it matches only directories)" if found else ""
                raise JobError(f"no file matches {pattern!r}{dirs} (looked in {base})")
            return files
        path = Path(full).resolve()
        if path.is_dir():
            raise JobError(
                f"{path} is a directory; name a file, or a glob such as '{pattern.rstrip('/')}/*.parquet'"
            )
        if not path.is_file():
            raise JobError(f"input file not found: {path}")
        return [path]

    def stat(self, path: PurePath) -> FileStat:
        try:
            st = Path(path).stat()
        except OSError as exc:
            raise JobError(f"cannot read {path.name}: {exc.strerror or exc}") from None
        return FileStat(st.st_size, st.st_mtime_ns)

    def open(self, path: PurePath) -> pa.NativeFile:
        return pa.OSFile(str(path), "rb")

    def read_failure(self, exc: BaseException, path: PurePath) -> BatchrunError | None:
        return None  # a local read that fails is the file's (its errors name the file already)

    # -- output --------------------------------------------------------------------------------
    def ready(self, path: PurePath, *, create: bool) -> None:
        # ``create`` writes and removes a probe file: the only proof that holds for root and on
        # read-only mounts alike. Without it (``validate`` writes nothing), the nearest existing
        # folder is asked with access(2), which sees modes and read-only mounts.
        folder = Path(path).parent
        if not create:
            existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
            if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
                raise StorageError(f"cannot write {folder}: the folder {existing} is not writable")
            return
        probe = folder / f".{path.name}.tmp-{os.getpid()}-probe-{uuid.uuid4().hex[:8]}"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            os.close(fd)
            probe.unlink()
        except OSError as exc:
            raise storage_error(exc, folder) from None

    @contextmanager
    def publish(
        self, path: PurePath, kind: str, before_visible: Callable[[dict[str, int]], None]
    ) -> Iterator[Path]:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path, kind) as tmp:
            yield tmp
            identity = self.identity(tmp)
            assert identity is not None, f"{kind}: nothing was written to {tmp}"
            before_visible(identity)

    def identity(self, path: PurePath) -> dict[str, int] | None:
        # Size and modification time in nanoseconds: a rename keeps both, a rewrite changes them.
        try:
            st = Path(path).stat()
        except FileNotFoundError:
            return None
        return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}

    def exists(self, path: PurePath) -> bool:
        return Path(path).exists()

    def remove(self, path: PurePath) -> None:
        Path(path).unlink(missing_ok=True)

    def read_json(self, path: PurePath) -> dict[str, Any] | None:
        return read_json(Path(path))

    def write_json(self, path: PurePath, doc: dict[str, Any], kind: str) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(Path(path), doc, kind)

    def beside(self, path: PurePath, pattern: str) -> list[PurePath]:
        return sorted(Path(path).parent.glob(pattern))

    def clear_leftovers(self, path: PurePath) -> None:
        remove_stale_temps(Path(path).parent, output_temps(Path(path)))


LOCAL = LocalStore()


def input_store(pattern: str, storage: StorageSection | None = None) -> InputStore:
    """The store an input path or glob (``input.path``) is read from: ``s3://`` on S3 (through
    ``[storage]``), anything else the local disk."""
    if pattern.startswith("s3://"):
        return s3_store(storage)
    return LOCAL


def output_store(spec: JobSpec) -> OutputStore:
    """The store a job's output and its reports (summary, success marker) are published to."""
    if _on_s3(spec.output_path):
        return s3_store(spec.storage)
    return LOCAL


def progress_store(spec: JobSpec) -> ProgressStore:
    """Where a job's run state is kept (``output.state_dir``)."""
    if _on_s3(spec.state_dir):
        from .s3state import S3RunState

        state: ProgressStore = S3RunState(spec.state_dir, s3_store(spec.storage).fs)
        return state
    from .checkpoint import RunState

    assert isinstance(spec.state_dir, Path)
    return RunState(spec.state_dir)


def s3_store(storage: StorageSection | None) -> S3Store:
    """The ``s3store.S3Store`` of a job's ``[storage]`` (one per set of options in a process:
    pyarrow's S3 client is made once and shared)."""
    options = (None, None, False) if storage is None else (storage.endpoint_url, storage.region, storage.allow_http)
    return _s3_store(*options)


@functools.lru_cache(maxsize=8)
def _s3_store(endpoint_url: str | None, region: str | None, allow_http: bool) -> S3Store:
    from .s3store import COPY_SILENCE_S, S3Store, s3_filesystem

    filesystem = s3_filesystem(endpoint_url=endpoint_url, region=region, allow_http=allow_http)
    # The output's server-side copy may stay silent for as long as the store takes to copy it.
    copying = s3_filesystem(endpoint_url=endpoint_url, region=region, allow_http=allow_http,
                            request_timeout=COPY_SILENCE_S)
    return S3Store(filesystem, endpoint_url=endpoint_url, copy_filesystem=copying)


def _on_s3(location: PurePath) -> TypeGuard[S3Path]:
    from .s3store import S3Path

    return isinstance(location, S3Path)
