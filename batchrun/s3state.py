"""Run state on an object store (S3): ``checkpoint.RunState``'s layout under a prefix, every write
one PUT of a whole object, and leases where the local disk has ``flock``.

Layout of ``s3://bucket/prefix/`` (the names of ``checkpoint.RunState``)::

    plan.json, finished.json, outputs.json, carry.parquet
    segments/seg-00000042.parquet          committed results, one object per segment
    partial/seg-00000042.<run>.parquet     resolved rows of a segment not yet complete
    journal/seg-00000042.<writer>-<n>.sent rows sent (accounting only), one object per flush
    lock, lock.shard-I-of-N, plan.lock, merge.lock   leases (JSON), deleted on release
    shards/lock.shard-I-of-N               a marker per shard lease ever taken (never deleted)

**Commit.** S3 has no rename, but a PUT is atomic and read-after-write consistent: an object is
written whole to memory first (Parquet with page checksums, or JSON) and then handed to one
output stream in one ``write`` and closed. pyarrow completes the upload on ``close`` (also when a
``with`` block raises, and from a destructor), so nothing half-made is ever written to a stream.
A process killed mid-upload leaves no object (an unfinished multipart upload, which is
invisible); measured on SeaweedFS for 4-120 MB objects killed at random points. A segment has one
possible name, so whoever commits it converges on one object. Bytes are fetched first (retried)
and parsed after: only a parse failure is damage (the object is then deleted and its rows
redone); a store that does not answer is a ``StorageError``, never damage.

**The plan, written once.** SeaweedFS honours ``If-None-Match: *`` on PUT (a second create gets
412), but pyarrow's S3 filesystem cannot send it (``open_output_stream`` metadata that is not a
header it knows is dropped: both PUTs succeed). So write-once is kept by a rule: the runner plans
under the ``plan.lock`` lease (waited for); ``write_plan`` reads the plan again just before its
PUT and leaves in place a plan this store never saw (the first plan pinned stays), and waits
``settle_s`` after its own PUT; the runner then works under the plan it reads back, and checks it
against its job when it is not the one it made (``StateError`` if it does not fit). Two planners
end under different plans only if one's PUT lands more than ``settle_s`` after its check, and even
then two planners of one job and input make plans that differ only in ``created_at``, so segments
committed under either fit the other.

**Leases** (``lock``; what one holds is in ``leases``). A lease object holds its holder (pid, host, since), a random token and an
expiry (the holder's wall clock + ``lease_ttl_s``, 30 s); a daemon thread renews it every
``renew_every_s`` (10 s) while the block runs. To take one: read it; held and unexpired ->
``BusyError`` naming the holder (or poll every ``poll_s`` with ``wait``); else PUT our own token,
wait ``settle_s`` (a racer's PUT lands meanwhile), read it back, and hold it only if the token is
still ours. Release deletes it if it is still ours. A holder on this host (same boot, same pid
namespace) whose process has ended is seen as gone at once; any other dead holder's lease runs
out 20-30 s after its death (30 s after its last renewal), so a waiting run takes over within
about 30 s + ``poll_s`` + ``settle_s``. Clocks: expiry is written by the holder's clock and read
by the reader's, assuming they agree within a few seconds (NTP); a skew of s seconds moves the
takeover by s, and a holder whose clock is more than 20 s behind could be overtaken while alive.
As with ``flock``, a lease only saves money: two runs working at once never make a row lost or
duplicated, because the commit rule above does not depend on it.

**Journal** of rows sent (accounting only, never truth). No appends on S3: a batch's rows are
kept in memory and uploaded as one small immutable object with the segment's next partial save
(and at the end of a run); committing a segment deletes its journal objects. Rows sent since the
last upload are not in the journal after a crash, so the count of prompts sent twice can come
out low, never high.

**Errors.** Each call is retried with backoff (``retry_delays_s``) when the store does not answer
or answers 5xx/throttling; then, or at once for any other failure (access denied, no such
bucket), a ``StorageError`` (exit 74) names the operation and ``s3://bucket/key``. pyarrow's
messages quote no credential; the AWS variables' values are removed from them all the same.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import tempfile
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from . import leases
from .checkpoint import CARRY_ROW_GROUP, OUTPUTS_KEPT, DamagedStateError
from .errors import BusyError, StorageError
from .localfs import crashpoint, process_ended, write_checked
from .plan import Plan
from .s3store import S3Path, json_object, run_to_end, scrub_secrets
from .segments import RESULT_SCHEMA, SegmentFile, SegmentInfo, read_checked

log = logging.getLogger("batchrun")
T = TypeVar("T")

# AWS error names (as pyarrow words them) and texts that mean "try again": the store did not
# answer, or answered that it is busy or failing. Anything else is not retried.
_TRANSIENT = re.compile(
    r"NETWORK_CONNECTION|curlCode|INTERNAL_FAILURE|SERVICE_UNAVAILABLE|SLOW_DOWN|THROTTLING|"
    r"REQUEST_TIMEOUT|Connection reset|timed out|response code: 5\d\d|HTTP 5\d\d"
)
_FOOTER_TAIL = 64 * 1024  # one ranged read holds a segment's footer (a few KB) in practice
_COPY_CHUNK = 8 * 1024 * 1024


@dataclass(frozen=True)
class S3StateOptions:
    """Timings of the leases and the retries (tests shorten them)."""

    lease_ttl_s: float = 30.0
    renew_every_s: float = 10.0
    settle_s: float = 1.0  # between our PUT of a lease and reading it back
    poll_s: float = 2.0  # between looks at a lease held by another run, with ``wait``
    retry_delays_s: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0, 8.0)
    scan_threads: int = 16  # footers read at once by scan_segments


class S3RunState:
    """One job's run state under ``root`` (``s3://bucket/prefix``), through ``filesystem``."""

    def __init__(self, root: S3Path, filesystem: pafs.FileSystem, *, options: S3StateOptions | None = None):
        self.root = root
        self.fs = filesystem
        self.opts = options or S3StateOptions()
        self._base = root.fs_path.rstrip("/")
        self._scratch: Path | None = None
        self._carry_local: Path | None = None  # the carry object's local copy, once looked for
        self._carry_looked = False
        self._seen_plan: Plan | None = None  # the plan this store last read or wrote
        self._plan_read = False
        self._journal: dict[int, list[str]] = {}  # lines not yet uploaded, by segment
        self._journal_lock = threading.Lock()
        self._writer = uuid.uuid4().hex[:12]  # names this store's journal objects
        self._journal_seq = 0

    # -- keys, calls, errors --------------------------------------------------------------------
    def _key(self, *parts: str) -> str:
        return "/".join((self._base, *parts))

    def _call(self, op: str, key: str, fn: Callable[[], T], *, retry: bool = True) -> T:
        """``fn()``, retried while the store does not answer; ``StorageError`` naming ``op`` and
        the object when it keeps failing or fails for good. ``FileNotFoundError`` passes."""
        delays = self.opts.retry_delays_s if retry else ()
        for attempt in range(len(delays) + 1):
            try:
                return fn()
            except FileNotFoundError:
                raise
            except OSError as exc:
                if attempt == len(delays) or not _TRANSIENT.search(str(exc)):
                    raise _storage_error(op, key, exc, attempt + 1) from None
                time.sleep(delays[attempt] * random.uniform(0.5, 1.0))
        raise AssertionError("unreachable")

    def _get(self, key: str, op: str = "read") -> bytes | None:
        """The object's bytes; None when there is none."""

        def get() -> bytes:
            with self.fs.open_input_stream(key) as f:
                return bytes(f.read())

        try:
            return self._call(op, key, get)
        except FileNotFoundError:
            return None

    def _get_range(self, info: pafs.FileInfo, offset: int, length: int) -> bytes:
        def get() -> bytes:
            # A HEAD, then a ranged GET (pyarrow's Python API takes no listing's FileInfo here).
            with self.fs.open_input_file(info.path) as f:
                return bytes(f.read_at(length, offset))

        return self._call("read", info.path, get)

    def _put(self, key: str, data: bytes | pa.Buffer, kind: str | None, *, retry: bool = True) -> None:
        """Publish ``data`` as the object ``key``, whole or not at all.

        The crash points match ``atomic_path``'s: ``<kind>:written`` and ``<kind>:fsynced`` with
        the object made but not sent, ``<kind>:renamed`` once it is visible under its name.
        """
        if kind is not None:
            crashpoint(f"{kind}:written")
            crashpoint(f"{kind}:fsynced")

        def put() -> None:
            out = self.fs.open_output_stream(key)
            # One write of the whole object: pyarrow completes an upload when the stream is
            # closed (also from a destructor), so nothing partial may ever be in it.
            out.write(data)
            out.close()

        # In a thread of its own: a signal's InterruptedRun, raised in the main thread only,
        # then lands after the upload, never between the stream's opening and its one write
        # (the stream, dropped empty, would publish an empty object).
        self._call("write", key, lambda: run_to_end(put), retry=retry)
        if kind is not None:
            crashpoint(f"{kind}:renamed")

    def _delete(self, key: str, *, retry: bool = True) -> None:
        try:
            self._call("delete", key, lambda: self.fs.delete_file(key), retry=retry)
        except FileNotFoundError:
            pass

    def _delete_all(self, folder: str) -> None:
        """Delete every object under ``folder`` (batched deletes)."""
        self._call("delete", folder + "/", lambda: self.fs.delete_dir_contents(folder, missing_dir_ok=True))

    def _list(self, folder: str) -> list[pafs.FileInfo]:
        """The objects right under ``folder`` (a key prefix), sorted by name."""
        selector = pafs.FileSelector(folder, allow_not_found=True, recursive=False)
        infos = self._call("list", folder + "/", lambda: self.fs.get_file_info(selector))
        return sorted((i for i in infos if i.type == pafs.FileType.File), key=lambda i: i.path)

    def _exists(self, key: str) -> bool:
        info: pafs.FileInfo = self._call("read", key, lambda: self.fs.get_file_info(key))
        return bool(info.type == pafs.FileType.File)

    def _files(self, folder: str) -> Iterator[tuple[pafs.FileInfo, SegmentFile]]:
        for info in self._list(self._key(folder)):
            name = SegmentFile.parse(info.base_name)
            if name is not None:
                yield info, name

    def _get_json(self, key: str) -> dict[str, Any] | None:
        data = self._get(key)
        return None if data is None else json_object(data)

    def _put_json(self, key: str, doc: dict[str, Any], kind: str | None) -> None:
        self._put(key, (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode("utf-8"), kind)

    def _download(self, key: str, dest: Path) -> bool:
        """Copy an object to a local file, streamed; False when there is no such object."""
        tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")

        def copy() -> None:
            with self.fs.open_input_stream(key) as src, open(tmp, "wb") as out:
                while chunk := src.read(_COPY_CHUNK):
                    out.write(chunk)

        try:
            self._call("read", key, copy)
        except FileNotFoundError:
            tmp.unlink(missing_ok=True)
            return False
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        os.replace(tmp, dest)
        return True

    # -- set-up, leases, housekeeping ------------------------------------------------------------
    def ensure_dirs(self) -> None:
        """Nothing to make: an object store has no folders (the first PUT proves the place)."""

    @contextmanager
    def lock(self, name: str = "lock", *, wait: bool = False) -> Iterator[None]:
        """Hold the lease ``name`` (the names of ``RunState.lock``), or raise ``BusyError`` naming
        its holder; see the module's docstring for the protocol. It only saves money."""
        key = self._key(name)
        token = uuid.uuid4().hex
        leases.register(key, token)
        try:
            self._acquire(key, token, wait)
        except (BusyError, StorageError):
            leases.forget(key, token)
            raise
        except BaseException:
            leases.forget(key, token)
            self._release(key, token)  # interrupted while taking it: do not leave it behind
            raise
        stop = threading.Event()
        renewer = threading.Thread(target=self._renew, args=(key, token, stop), name=f"lease {name}", daemon=True)
        renewer.start()
        try:
            if name.startswith("lock.shard-"):
                # Leases are deleted on release; shard_count needs to know the shards ever run.
                marker = self._key("shards", name)
                if not self._exists(marker):
                    self._put(marker, b"", None)
            yield
        finally:
            stop.set()
            renewer.join()
            leases.forget(key, token)
            self._release(key, token)

    def _acquire(self, key: str, token: str, wait: bool) -> None:
        while True:
            current = self._read_lease(key)
            if current is None or leases.lease_gone(key, current):
                self._put_json(key, leases.lease_doc(token, self.opts.lease_ttl_s), None)
                time.sleep(self.opts.settle_s)  # a racer's PUT lands meanwhile; the last one wins
                current = self._read_lease(key)
                if current is not None and current.get("token") == token:
                    return
            if not wait:
                raise BusyError(f"s3://{key}", leases.holder_of(current))
            time.sleep(self.opts.poll_s)

    def _read_lease(self, key: str) -> dict[str, Any] | None:
        return self._get_json(key)

    def _renew(self, key: str, token: str, stop: threading.Event) -> None:
        while not stop.wait(self.opts.renew_every_s):
            try:
                current = self._read_lease(key)
                if stop.is_set():
                    return
                if current is None or current.get("token") != token:
                    log.warning(
                        "the lease %s was taken by %s; another run may send the same rows (the output "
                        "stays exact)", f"s3://{key}", leases.holder_of(current),
                    )
                    return
                self._put_json(key, leases.lease_doc(token, self.opts.lease_ttl_s, since=current.get("since")), None)
            except StorageError as exc:
                log.warning("could not renew the lease s3://%s: %s", key, exc)

    def _release(self, key: str, token: str) -> None:
        try:
            current = self._read_lease(key)
            if current is not None and current.get("token") == token:
                self._delete(key)
        except StorageError as exc:
            # Not fatal: the lease runs out on its own within lease_ttl_s.
            log.warning("could not release the lease s3://%s: %s", key, exc)

    def holders(self) -> dict[str, str]:
        """Which leases are held right now (unexpired), and by whom."""
        out = {}
        for info in self._list(self._base):
            name = info.base_name
            if not (name.startswith("lock") or name == "merge.lock"):
                continue
            lease = self._read_lease(info.path)
            if lease is not None and not leases.lease_gone(info.path, lease):
                out[name] = leases.holder_of(lease)
        return out

    def shard_count(self) -> int | None:
        """N of the last sharded runs, from the markers of their leases (never deleted)."""
        names = [i.base_name for i in self._list(self._key("shards"))]
        counts = [int(n.rsplit("-of-", 1)[1]) for n in names if re.fullmatch(r"lock\.shard-\d+-of-\d+", n)]
        return max(counts, key=counts.count) if counts else None

    def partial_rows(self) -> int:
        total = 0
        for info, _ in self._files("partial"):
            meta = self._footer(info)
            total += meta.num_rows if meta is not None else 0
        return total

    def reset(self) -> None:
        """Discard all progress (``--restart``): segments, partials, carry, plan, finish marker."""
        self.drop_progress()
        self._delete(self._key("plan.json"))
        self.drop_carry()

    def drop_progress(self) -> None:
        """Remove segments, partials, journals and the finish marker; keep plan, carry and the
        record of outputs published."""
        for folder in ("segments", "partial", "journal"):
            self._delete_all(self._key(folder))
        with self._journal_lock:
            self._journal.clear()
        finished = self.read_finished()
        if finished is not None and finished.get("output"):
            self.record_output(finished["output"])
        self.clear_finished()
        self._clear_downloads()

    def scratch_path(self, name: str) -> Path:
        """A local file for a step's working data (in a temporary folder of this process, which
        ``clear_leftovers`` removes once the process has ended)."""
        return self._scratch_dir() / name

    def _scratch_dir(self) -> Path:
        if self._scratch is None or not self._scratch.exists():
            self._scratch = Path(tempfile.mkdtemp(prefix=f"{self._scratch_prefix()}{os.getpid()}-"))
            # Removed when this object goes or the interpreter exits; after a kill, by the next
            # run's clear_leftovers.
            weakref.finalize(self, shutil.rmtree, self._scratch, True)
        return self._scratch

    def _scratch_prefix(self) -> str:
        return f"batchrun-state-{sha256(str(self.root).encode()).hexdigest()[:12]}-"

    def clear_leftovers(self) -> None:
        """Remove what a crashed run can leave: partial saves and journals of segments committed
        since they were written, and scratch folders of ended processes. No ``.tmp`` object exists
        on the store (a PUT is whole); the output's own leftovers are its store's (``OutputStore``)."""
        committed = {name.k for _, name in self._files("segments")}
        for folder in ("partial", "journal"):
            for info, name in self._files(folder):
                if name.k in committed:
                    self._delete(info.path)
        for d in Path(tempfile.gettempdir()).glob(f"{self._scratch_prefix()}*"):
            pid = d.name.removeprefix(self._scratch_prefix()).split("-")[0]
            if d != self._scratch and pid.isdigit() and process_ended(int(pid)):
                shutil.rmtree(d, ignore_errors=True)

    def has_progress(self) -> bool:
        return any(self._files("segments")) or any(self._files("partial"))

    def result_files(self, *, with_carry: bool = False) -> list[Path]:
        """Every object holding results (committed segments, then partials, each in name order,
        then with ``with_carry`` the carried answers), downloaded to local files of the scratch
        folder that ``drop_progress`` and the next call remove."""
        self._clear_downloads()
        folder = self._scratch_dir() / "results"
        folder.mkdir()
        files = []
        for sub in ("segments", "partial"):
            for info, _ in self._files(sub):
                dest = folder / f"{sub}-{info.base_name}"
                if self._download(info.path, dest):
                    files.append(dest)
        if with_carry:
            dest = folder / "carry.parquet"
            if self._download(self._key("carry.parquet"), dest):
                files.append(dest)
        return files

    def _clear_downloads(self) -> None:
        if self._scratch is not None:
            shutil.rmtree(self._scratch / "results", ignore_errors=True)

    # -- carry (incremental runs by id) ----------------------------------------------------------
    def _carry_copy(self) -> Path | None:
        """The carry object as a local file, looked for once and fetched once (reads of it then
        never touch the network); None when there is none."""
        if self._carry_looked and (self._carry_local is None or self._carry_local.exists()):
            return self._carry_local
        self._carry_looked, self._carry_local = True, None
        key = self._key("carry.parquet")
        if self._exists(key):
            dest = self._scratch_dir() / "carry.parquet"
            self._carry_local = dest if self._download(key, dest) else None
        return self._carry_local

    def _forget_carry(self) -> None:
        if self._carry_local is not None:
            self._carry_local.unlink(missing_ok=True)
        self._carry_looked, self._carry_local = False, None

    def read_carry(self, start: int, stop: int) -> pa.Table | None:
        """Answers carried from a previous input for new rows ``[start, stop)``."""
        local = self._carry_copy()
        if local is None:
            return None
        try:
            return pq.read_table(
                local, schema=RESULT_SCHEMA, filters=[("row", ">=", start), ("row", "<", stop)],
                page_checksum_verification=True,
            )
        except (OSError, pa.ArrowException):
            self.drop_carry()  # damaged: those rows are simply sent again
            return None

    def drop_carry(self) -> None:
        self._delete(self._key("carry.parquet"))
        self._forget_carry()

    def has_carry(self) -> bool:
        return self._exists(self._key("carry.parquet"))

    def carry_metadata(self) -> dict[bytes, bytes] | None:
        """The carry object's footer metadata when it reads back whole; None if none or damaged."""
        local = self._carry_copy()
        if local is None:
            return None
        try:
            meta = pq.read_schema(local).metadata or {}
            pq.read_table(local, columns=["id"], page_checksum_verification=True)
        except (OSError, pa.ArrowException):
            return None
        return dict(meta)

    def write_carry(self, table: pa.Table) -> None:
        self._put(self._key("carry.parquet"), _parquet(table, row_group_size=CARRY_ROW_GROUP), "carry")
        self._forget_carry()

    # -- plan -----------------------------------------------------------------------------------
    def read_plan(self) -> Plan | None:
        """The pinned plan; None when there is none (or it cannot be read back as JSON)."""
        self._seen_plan, self._plan_read = self._fetch_plan(), True
        return self._seen_plan

    def _fetch_plan(self) -> Plan | None:
        doc = self._get_json(self._key("plan.json"))
        return None if doc is None else Plan.from_json(doc, str(self.root / "plan.json"))

    def write_plan(self, plan: Plan) -> None:
        """Pin ``plan`` with one PUT, unless a plan this store never saw is there: another run
        pinned it at the same moment (past the plan lease), and the first plan stays. The caller
        uses the plan it reads back, checked against its job when it is not its own; the pause
        after the PUT lets a racer's PUT land before that read-back."""
        stored = self._fetch_plan()
        if stored is not None and stored != plan and not (self._plan_read and stored == self._seen_plan):
            log.warning("another run pinned a plan in %s at the same moment; this run checks it and uses it", self.root)
            return
        self._put_json(self._key("plan.json"), plan.to_json(), "plan")
        self._seen_plan, self._plan_read = plan, True
        time.sleep(self.opts.settle_s)

    # -- segments -------------------------------------------------------------------------------
    def _segment_key(self, k: int) -> str:
        return self._key("segments", SegmentFile(k).name)

    def _footer(self, info: pafs.FileInfo) -> pq.FileMetaData | None:
        """A Parquet object's footer by ranged reads (usually one); None when it is not one."""
        size = info.size or 0
        if size < 12:
            return None
        try:
            tail = self._get_range(info, size - min(size, _FOOTER_TAIL), min(size, _FOOTER_TAIL))
        except FileNotFoundError:
            return None  # deleted since the listing
        if tail[-4:] != b"PAR1":
            return None
        length = int.from_bytes(tail[-8:-4], "little")
        if length + 12 > size:
            return None
        if length + 8 > len(tail):
            try:
                tail = self._get_range(info, size - length - 8, length + 8)
            except FileNotFoundError:
                return None
        try:
            # The footer alone, behind the leading magic: read_metadata parses only the footer.
            return pq.read_metadata(pa.BufferReader(b"PAR1" + tail[-(length + 8):]))
        except (OSError, pa.ArrowException):
            return None

    def scan_segments(
        self, expected_rows: dict[int, int] | None = None, *, remove_damaged: bool = True
    ) -> dict[int, SegmentInfo]:
        """Committed segments by index, from their footers (ranged reads, several at once);
        unreadable or wrong-sized ones are deleted so their rows are redone rather than trusted."""
        found = list(self._files("segments"))
        with ThreadPoolExecutor(max_workers=max(1, min(self.opts.scan_threads, len(found)))) as pool:
            footers = list(pool.map(lambda item: self._footer(item[0]), found))
        out: dict[int, SegmentInfo] = {}
        for (info, name), meta in zip(found, footers):
            k = name.k
            try:
                if meta is None:
                    raise ValueError("not a Parquet file")
                seg = SegmentInfo.of_footer(meta)
            except (ValueError, KeyError):
                if remove_damaged:
                    self._delete(info.path)
                continue
            if expected_rows is not None and expected_rows.get(k) != seg.rows:
                if remove_damaged:
                    self._delete(info.path)
                continue
            out[k] = seg
        return out

    def read_segment(self, k: int) -> pa.Table:
        """Segment ``k``'s results, every page checked against its CRC; ``DamagedStateError``
        (and the object deleted, so its rows are redone) when it does not read back whole."""
        key = self._segment_key(k)
        data = self._get(key)
        try:
            if data is None:
                raise OSError("it is missing")
            return read_checked(pa.BufferReader(data))
        except (OSError, pa.ArrowException) as exc:
            self._delete(key)
            raise DamagedStateError(k, str(exc)) from None

    def commit_segment(self, k: int, table: pa.Table, info: SegmentInfo) -> None:
        """Publish segment ``k`` (every row resolved, sorted by row), then drop its partials."""
        self._put(self._segment_key(k), _parquet(table.replace_schema_metadata(info.metadata(k))), "segment")
        crashpoint("segment:published")
        self.drop_partials(k)
        self.drop_journal(k)

    # -- partials -------------------------------------------------------------------------------
    def write_partial(self, k: int, run_id: str, table: pa.Table) -> None:
        self._put(self._key("partial", SegmentFile(k, run_id).name), _parquet(table), "partial")
        self._flush_journal(k)

    def read_partials(self, k: int) -> pa.Table | None:
        """Every row resolved in ``k``'s partial objects; damaged ones deleted."""
        tables = []
        for info, name in self._files("partial"):
            if name.k != k:
                continue
            data = self._get(info.path)
            if data is None:
                continue  # committed and dropped meanwhile by another run
            try:
                tables.append(read_checked(pa.BufferReader(data)))
            except (OSError, pa.ArrowException):
                self._delete(info.path)
        return pa.concat_tables(tables) if tables else None

    def drop_partials(self, k: int) -> None:
        for info, name in self._files("partial"):
            if name.k == k:
                self._delete(info.path)

    # -- journal of rows sent ------------------------------------------------------------------
    def journal_sent(self, k: int, rows: list[int]) -> None:
        """Remember one batch's rows for segment ``k``'s journal (memory only: this runs on the
        event loop; the lines are uploaded with the segment's next partial save)."""
        with self._journal_lock:
            self._journal.setdefault(k, []).append(" ".join(map(str, rows)) + "\n")

    def _flush_journal(self, k: int, *, retry: bool = True) -> None:
        with self._journal_lock:
            lines = self._journal.pop(k, None)
            if not lines:
                return
            self._journal_seq += 1
            name = SegmentFile(k, f"{self._writer}-{self._journal_seq:06d}", kind="sent").name
        self._put(self._key("journal", name), "".join(lines).encode("ascii"), None, retry=retry)

    def read_journal(self, k: int) -> set[int]:
        text = []
        for info, name in self._files("journal"):
            if name.k == k and name.kind == "sent":
                data = self._get(info.path)
                text.append((data or b"").decode("ascii", "replace"))
        with self._journal_lock:
            text.extend(self._journal.get(k, []))
        rows: set[int] = set()
        for chunk in text:
            for line in chunk.split("\n")[:-1]:  # whole lines only
                try:
                    rows.update(int(x) for x in line.split())
                except ValueError:
                    continue
        return rows

    def drop_journal(self, k: int) -> None:
        with self._journal_lock:
            self._journal.pop(k, None)
        for info, name in self._files("journal"):
            if name.k == k:
                self._delete(info.path)

    def close_journals(self) -> None:
        """Upload what the journals hold (once, best effort: it is accounting, and a run that
        stops because the store is down must not wait for it again)."""
        with self._journal_lock:
            pending = list(self._journal)
        for k in pending:
            try:
                self._flush_journal(k, retry=False)
            except StorageError as exc:
                log.warning("could not save the journal of rows sent: %s", exc)
                return

    # -- finish ---------------------------------------------------------------------------------
    def read_finished(self) -> dict[str, Any] | None:
        return self._get_json(self._key("finished.json"))

    def write_finished(self, doc: dict[str, Any]) -> None:
        self._put_json(self._key("finished.json"), doc, "finished")

    def clear_finished(self) -> None:
        self._delete(self._key("finished.json"))

    # -- outputs this job wrote -----------------------------------------------------------------
    def record_output(self, identity: dict[str, int]) -> None:
        """Remember an output file this job is about to publish (before it becomes visible)."""
        known = [i for i in self._recorded_outputs() if i != identity]
        doc = {"written": [*known[-(OUTPUTS_KEPT - 1):], identity]}
        self._put_json(self._key("outputs.json"), doc, "outputs")

    def wrote_output(self, identity: dict[str, int]) -> bool:
        finished = self.read_finished()
        return identity in self._recorded_outputs() or (finished is not None and finished.get("output") == identity)

    def _recorded_outputs(self) -> list[dict[str, int]]:
        doc = self._get_json(self._key("outputs.json")) or {}
        written = doc.get("written")
        return [i for i in written if isinstance(i, dict)] if isinstance(written, list) else []


# -- helpers ---------------------------------------------------------------------------------------
def _parquet(table: pa.Table, *, row_group_size: int | None = None) -> pa.Buffer:
    """The whole Parquet file in memory (the options of local checkpoint files)."""
    sink = pa.BufferOutputStream()
    write_checked(table, sink, row_group_size=row_group_size)
    return sink.getvalue()


def _storage_error(op: str, key: str, exc: OSError, attempts: int) -> StorageError:
    text = str(exc)
    m = re.search(r"AWS Error (.*?)(?: \(Request ID: [^)]*\))?\.?$", text, re.S)
    reason = m[1] if m else text
    reason = scrub_secrets(reason.split("; Details:")[0].strip())
    if _TRANSIENT.search(text):
        return StorageError(
            f"cannot {op} s3://{key}: the store did not answer ({reason}; {attempts} attempts); "
            "progress so far is kept: check that the store is up and run the same command"
        )
    return StorageError(f"cannot {op} s3://{key}: {reason}")


