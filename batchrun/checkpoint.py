"""The run directory: plan, lock, atomic segment commits, and what is done.

Layout of ``<output>.batchrun/``::

    plan.json                  what the run was planned from (input fingerprint, settings, rows)
    lock                       flock'd by the running process; never deleted
    segments/seg-00000042.parquet   results for input rows [42*S, 43*S), one file per segment
    partial/seg-00000042.<run>.parquet  resolved rows of a segment not yet complete
    finished.json              written after the output file was published
    outputs.json               the identities (size, mtime) of output files this job published

The files are the truth. A segment file exists only once every row of its segment is resolved
(answered or failed), its name is fixed by its position, so a retried or concurrent commit
converges on one file. Partial files are subsets of a segment's rows and may overlap: any result
for a row under the same plan is a valid result for it, so overlaps are resolved by taking one.
Every result carries its row's prompt hash, checked again when the output is written.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from .errors import BusyError
from .localfs import (
    STORAGE_ERRNOS,
    atomic_path,
    crashpoint,
    read_json,
    remove_stale_temps,
    storage_error,
    write_checked,
    write_json_atomic,
)
from .plan import Plan
from .segments import ANY_SEGMENT, RESULT_SCHEMA, SegmentFile, SegmentInfo, read_checked


class DamagedStateError(Exception):
    """A checkpoint file did not read back whole; it has been removed and its rows will be redone."""

    def __init__(self, k: int, detail: str):
        self.segment = k
        super().__init__(f"checkpoint segment {k} was damaged ({detail}); its rows will be redone")


class RunState:
    """One job's run directory."""

    def __init__(self, root: Path):
        self.root = root
        self.segments_dir = root / "segments"
        self.partial_dir = root / "partial"
        self.journal_dir = root / "journal"
        self.plan_path = root / "plan.json"
        self.finished_path = root / "finished.json"
        self.outputs_path = root / "outputs.json"
        self.lock_path = root / "lock"
        self.carry_path = root / "carry.parquet"
        self._journal_fds: dict[int, int] = {}  # open journals of segments being worked on

    # -- set-up ---------------------------------------------------------------------------------
    def ensure_dirs(self) -> None:
        try:
            for d in (self.root, self.segments_dir, self.partial_dir, self.journal_dir):
                d.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            if exc.errno in STORAGE_ERRNOS:
                raise storage_error(exc, self.root) from None
            raise

    @contextmanager
    def lock(self, name: str = "lock", *, wait: bool = False) -> Iterator[None]:
        """Hold one of the job's locks, or raise ``BusyError`` naming the process that holds it.

        ``lock`` guards a whole run, ``lock.shard-I-of-N`` one shard, ``plan.lock`` the short
        planning step (waited for), ``merge.lock`` the writing of the output. Locks save money
        (no two runs pay for the same rows); correctness never depends on them.
        """
        self.ensure_dirs()
        path = self.root / name
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            if exc.errno in STORAGE_ERRNOS:
                raise storage_error(exc, path) from None
            raise
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                holder = os.pread(fd, 512, 0).decode("utf-8", "replace").strip() or "unknown process"
                raise BusyError(str(path), holder) from None
            me = f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%dT%H:%M:%S%z')}"
            os.ftruncate(fd, 0)
            os.pwrite(fd, me.encode(), 0)
            yield
        finally:
            os.close(fd)  # closing releases the flock; the file stays

    def holders(self) -> dict[str, str]:
        """Which locks are held right now, and by whom (for ``batchrun status``)."""
        out = {}
        for path in sorted(self.root.glob("lock*")) + sorted(self.root.glob("merge.lock")):
            fd = os.open(path, os.O_RDONLY)
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                out[path.name] = os.pread(fd, 512, 0).decode("utf-8", "replace").strip()
            finally:
                os.close(fd)
        return out

    def shard_count(self) -> int | None:
        """N of the last sharded runs, from their lock files' names (never deleted)."""
        counts = [int(p.name.rsplit("-of-", 1)[1]) for p in self.root.glob("lock.shard-*-of-*")]
        return max(counts, key=counts.count) if counts else None

    def partial_rows(self) -> int:
        total = 0
        for f, _ in self._files(self.partial_dir):
            try:
                total += pq.read_metadata(f).num_rows
            except (OSError, pa.ArrowException):
                continue
        return total

    def reset(self) -> None:
        """Discard all progress (``--restart``): segments, partials, carry, plan, finish marker."""
        self.drop_progress()
        for f in (self.plan_path, self.carry_path):
            f.unlink(missing_ok=True)

    def drop_progress(self) -> None:
        """Remove segments, partials, journals and the finish marker; keep plan, carry and the
        record of outputs published (the file this job wrote stays its own to replace)."""
        for d in (self.segments_dir, self.partial_dir, self.journal_dir):
            if d.exists():
                for f in d.iterdir():
                    f.unlink()
        finished = self.read_finished()
        if finished is not None and finished.get("output"):
            # State written before outputs.json existed recorded the output only here.
            self.record_output(finished["output"])
        self.finished_path.unlink(missing_ok=True)

    # -- carry (incremental runs by id) ----------------------------------------------------------
    def read_carry(self, start: int, stop: int) -> pa.Table | None:
        """Answers carried from a previous input for new rows ``[start, stop)``."""
        if not self.carry_path.exists():
            return None
        try:
            return pq.read_table(
                self.carry_path,
                schema=RESULT_SCHEMA,
                filters=[("row", ">=", start), ("row", "<", stop)],
                page_checksum_verification=True,
            )
        except (OSError, pa.ArrowException):
            self.carry_path.unlink(missing_ok=True)  # damaged: those rows are simply sent again
            return None

    def drop_carry(self) -> None:
        self.carry_path.unlink(missing_ok=True)

    def has_carry(self) -> bool:
        return self.carry_path.exists()

    def carry_metadata(self) -> dict[bytes, bytes] | None:
        """The carry file's footer metadata when it reads back whole; None if none or damaged."""
        try:
            meta = pq.read_schema(self.carry_path).metadata or {}
            pq.read_table(self.carry_path, columns=["id"], page_checksum_verification=True)
        except (OSError, pa.ArrowException):
            return None
        return dict(meta)

    def write_carry(self, table: pa.Table) -> None:
        with atomic_path(self.carry_path, "carry") as tmp:
            write_checked(table, tmp, row_group_size=CARRY_ROW_GROUP)

    def scratch_path(self, name: str) -> Path:
        """A local file for a step's working data, cleared with the leftovers of a crashed run."""
        return self.root / f".{name}"

    def clear_leftovers(self) -> None:
        """Remove what a crashed run can leave in the run directory: ``.tmp-`` files (never
        visible under a final name), and partial files and journals of segments committed since
        they were written. (The output's own temporary files are its store's: ``OutputStore``.)"""
        for d, pattern in (
            (self.root, ".*.tmp-*"),
            (self.segments_dir, ".*.tmp-*"),
            (self.partial_dir, ".*.tmp-*"),
            (self.root, ".incoming.parquet"),  # incremental.py's scratch_path("incoming.parquet")
        ):
            remove_stale_temps(d, pattern)
        for k in self.partial_segments():
            if self.segment_path(k).exists():
                self.drop_partials(k)
        for f, name in self._files(self.journal_dir):
            if self.segment_path(name.k).exists():
                f.unlink(missing_ok=True)

    def has_progress(self) -> bool:
        return any(self._files(self.segments_dir)) or any(self._files(self.partial_dir))

    def result_files(self, *, with_carry: bool = False) -> list[Path]:
        """Every file holding results: committed segments, then partials, each in name order
        (then, ``with_carry``, the answers carried from a previous input)."""
        files = [f for folder in (self.segments_dir, self.partial_dir) for f, _ in sorted(self._files(folder))]
        if with_carry and self.carry_path.exists():
            files.append(self.carry_path)
        return files

    def _files(self, folder: Path) -> Iterator[tuple[Path, SegmentFile]]:
        """The segment files of one of the run directory's folders, each with its parsed name."""
        for f in folder.glob(ANY_SEGMENT):
            name = SegmentFile.parse(f.name)
            if name is not None:
                yield f, name

    # -- plan -----------------------------------------------------------------------------------
    def read_plan(self) -> Plan | None:
        """The pinned plan; None when there is none (or it cannot be read back as JSON)."""
        doc = read_json(self.plan_path)
        return None if doc is None else Plan.from_json(doc, str(self.plan_path))

    def write_plan(self, plan: Plan) -> None:
        write_json_atomic(self.plan_path, plan.to_json(), "plan")

    # -- segments -------------------------------------------------------------------------------
    def segment_path(self, k: int) -> Path:
        return self.segments_dir / SegmentFile(k).name

    def scan_segments(
        self, expected_rows: dict[int, int] | None = None, *, remove_damaged: bool = True
    ) -> dict[int, SegmentInfo]:
        """Committed segments by index, from their footers; unreadable or wrong-sized ones are
        removed so their rows are redone rather than trusted."""
        out: dict[int, SegmentInfo] = {}
        for f, name in self._files(self.segments_dir):
            k = name.k
            try:
                meta = pq.read_metadata(f)
                info = SegmentInfo.of_footer(meta)
            except (ValueError, KeyError, OSError, pa.ArrowException):
                if remove_damaged:
                    f.unlink(missing_ok=True)
                continue
            if expected_rows is not None and expected_rows.get(k) != meta.num_rows:
                if remove_damaged:
                    f.unlink(missing_ok=True)
                continue
            out[k] = info
        return out

    def read_segment(self, k: int) -> pa.Table:
        """Segment ``k``'s results, every page checked against its CRC; ``DamagedStateError``
        (and the file removed, so its rows are redone) when it does not read back whole."""
        path = self.segment_path(k)
        try:
            return read_checked(path)
        except (OSError, pa.ArrowException) as exc:
            path.unlink(missing_ok=True)
            raise DamagedStateError(k, str(exc)) from None

    def commit_segment(self, k: int, table: pa.Table, info: SegmentInfo) -> None:
        """Publish segment ``k`` (every row resolved, sorted by row), then drop its partials."""
        table = table.replace_schema_metadata(info.metadata(k))
        with atomic_path(self.segment_path(k), "segment") as tmp:
            write_checked(table, tmp)
        crashpoint("segment:published")
        self.drop_partials(k)
        self.drop_journal(k)

    # -- partials -------------------------------------------------------------------------------
    def write_partial(self, k: int, run_id: str, table: pa.Table) -> None:
        with atomic_path(self.partial_dir / SegmentFile(k, run_id).name, "partial") as tmp:
            write_checked(table, tmp)

    def partial_segments(self) -> set[int]:
        return {name.k for _, name in self._files(self.partial_dir)}

    def read_partials(self, k: int) -> pa.Table | None:
        """Every row resolved in ``k``'s partial files, one result per row; damaged files dropped."""
        tables = []
        for f in sorted(self.partial_dir.glob(SegmentFile.partials_of(k))):
            try:
                tables.append(read_checked(f))
            except (OSError, pa.ArrowException):
                f.unlink(missing_ok=True)
        if not tables:
            return None
        return pa.concat_tables(tables)

    def drop_partials(self, k: int) -> None:
        for f in self.partial_dir.glob(SegmentFile.partials_of(k)):
            f.unlink(missing_ok=True)

    # -- journal of rows sent ------------------------------------------------------------------
    # Accounting only, never truth: which rows of an unfinished segment were already sent, so a
    # run after a crash can count the prompts it sends a second time. Appends are not fsynced;
    # a power loss can only make that count low.
    def _journal_path(self, k: int) -> Path:
        return self.journal_dir / SegmentFile(k, kind="sent").name

    def journal_sent(self, k: int, rows: list[int]) -> None:
        """Append one batch's rows to segment ``k``'s journal (one write on a kept descriptor:
        this runs once a batch on the event loop)."""
        line = (" ".join(map(str, rows)) + "\n").encode("ascii")
        try:
            fd = self._journal_fds.get(k)
            if fd is None:
                fd = os.open(self._journal_path(k), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                self._journal_fds[k] = fd
            os.write(fd, line)
        except OSError as exc:
            if exc.errno in STORAGE_ERRNOS:
                raise storage_error(exc, self._journal_path(k)) from None
            raise

    def read_journal(self, k: int) -> set[int]:
        try:
            text = self._journal_path(k).read_text(encoding="ascii", errors="replace")
        except FileNotFoundError:
            return set()
        rows: set[int] = set()
        # Only whole lines count: a line torn by a crash or a full disk is left out, so the
        # count of prompts sent twice can come out low, never high.
        for line in text.split("\n")[:-1]:
            try:
                rows.update(int(x) for x in line.split())
            except ValueError:
                continue
        return rows

    def drop_journal(self, k: int) -> None:
        fd = self._journal_fds.pop(k, None)
        if fd is not None:
            os.close(fd)
        self._journal_path(k).unlink(missing_ok=True)

    def close_journals(self) -> None:
        for fd in self._journal_fds.values():
            os.close(fd)
        self._journal_fds.clear()

    # -- finish ---------------------------------------------------------------------------------
    def read_finished(self) -> dict[str, Any] | None:
        return read_json(self.finished_path)

    def write_finished(self, doc: dict[str, Any]) -> None:
        write_json_atomic(self.finished_path, doc, "finished")

    def clear_finished(self) -> None:
        self.finished_path.unlink(missing_ok=True)

    # -- outputs this job wrote -----------------------------------------------------------------
    def record_output(self, identity: dict[str, int]) -> None:
        """Remember an output file this job is about to publish (called before its rename, so a
        crash between the two never leaves the job's own output looking foreign)."""
        known = [i for i in self._recorded_outputs() if i != identity]
        write_json_atomic(self.outputs_path, {"written": [*known[-(OUTPUTS_KEPT - 1):], identity]}, "outputs")

    def wrote_output(self, identity: dict[str, int]) -> bool:
        """Whether the file with this identity at the output path was published by this job."""
        finished = self.read_finished()
        return identity in self._recorded_outputs() or (finished is not None and finished.get("output") == identity)

    def _recorded_outputs(self) -> list[dict[str, int]]:
        doc = read_json(self.outputs_path) or {}
        written = doc.get("written")
        return [i for i in written if isinstance(i, dict)] if isinstance(written, list) else []


OUTPUTS_KEPT = 16
# Row groups of the carry file: read_carry reads only the groups a segment's rows fall in.
CARRY_ROW_GROUP = 16384
