"""S3 and S3-compatible stores behind the storage seam, through pyarrow's own ``S3FileSystem``.

Input is read with ranged GETs (``open`` is pyarrow's random-access reader: a Parquet footer and
the pages asked for, never a whole-object download). Output is published whole or not at all,
which pyarrow alone does not give: its upload stream *completes* the multipart upload when it is
closed, also when the block writing it raised and when it is garbage-collected, so a stream cut
short by an exception becomes a short object at its key (checked against SeaweedFS: pyarrow
26 has no ``abort`` in Python). Hence ``S3Store.publish``:

1. the block writes a local temporary file;
2. its size and SHA-256 are computed: the file's identity;
3. it is uploaded from a thread of its own to a staging key beside the final one
   (``.NAME.tmp-PID-RAND``), and the staged size is checked; Python runs signal handlers in the
   main thread only, so a SIGTERM or Ctrl-C waits for the upload to end instead of cutting it;
   a failed part makes pyarrow's close fail, and a process killed mid-upload leaves an
   incomplete multipart upload, which S3 never shows;
4. ``before_visible(identity)`` records it in the run state;
5. the staged object is copied to the final key server-side (CopyObject: the object appears
   whole or not at all, replacing the old one) and the staging key is removed. The copy is
   sent through a client that waits up to ``COPY_SILENCE_S`` for its answer: AWS keeps a long
   copy's connection alive with whitespace, but SeaweedFS answers only when it has copied every
   byte (54 s for a 4.7 GB output here), and the SDK's default gives up after 3 s of silence
   (``curlCode: 28``) and retries, starting the copy again each time.

The identity is ``{"size", "sha256_64"}`` (the first 64 bits of the SHA-256): known before the
object exists, unlike its ETag or modification time, and read back with one HEAD because the
full digest travels in the object's ``Content-Type`` as a parameter
(``application/vnd.apache.parquet; x-batchrun-sha256=...``): pyarrow sends and returns only
``Content-Type``, ``Content-Language``, ``Cache-Control``, ``Expires`` and ``ACL``, no
``x-amz-meta-*``. CopyObject keeps it. An object without it (not written by batchrun) has the
identity ``{"size", "etag_64"}``, which no recorded identity equals, so it is never taken for
the job's own.

A crash between 4 and 5 leaves the recorded identity and the old object (or none): nothing
whose author is unknown. A crash after 5 leaves the new object, already recorded. A crash in 3
leaves at most a staging object or an incomplete upload: never the final key. Objects larger
than CopyObject's 5 GiB limit on AWS are uploaded straight to the final key from the upload
thread after ``before_visible``; the only gap left there is an error raised inside pyarrow's
write other than a failed request (a 10 MB allocation failing), after which pyarrow's close
would complete a short object: its size is checked and such an object removed.

Credentials come from the AWS SDK's default chain only (``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN``, ``AWS_PROFILE`` and ``~/.aws``, web
identity, container and instance roles); no message names one.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from fnmatch import fnmatchcase
from pathlib import Path, PurePath, PurePosixPath
from typing import Any, NoReturn
from urllib.parse import SplitResult, urlsplit

import pyarrow as pa
from pyarrow import fs as pafs

from .errors import BatchrunError, JobError, ObjectStoreError, StoreFault, StoreUnreachableError
from .localfs import STORAGE_ERRNOS, crashpoint, storage_error
from .storage import FileStat

STAGING_STALE_S = 600.0  # a staging object this old is a crashed writer's (clear_leftovers)
COPY_LIMIT = 5 << 30  # CopyObject copies at most 5 GiB on AWS S3; larger objects are uploaded in place
COPY_SILENCE_S = 600.0  # how long a server-side copy may go without a byte of its answer (module docstring)
UPLOAD_CHUNK = 8 << 20
FLUSH_EVERY = 4  # chunks between waits for the parts in flight: pyarrow queues them unbounded
DIGEST_PARAM = "x-batchrun-sha256"
JSON_MAX_BYTES = 16 << 20  # a summary or marker is a few KB; anything larger is not ours
_CONTENT_TYPES = {
    ".parquet": "application/vnd.apache.parquet",
    ".json": "application/json",
    ".csv": "text/csv",
}


def json_object(data: bytes) -> dict[str, Any] | None:
    """``data`` as a JSON object; None when it is not one (a damaged or foreign document)."""
    try:
        doc = json.loads(data.decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        return None
    return doc if isinstance(doc, dict) else None


class S3Path(PurePosixPath):
    """An S3 location, ``bucket/key/parts``; ``str()`` gives ``s3://bucket/key``.

    A pure path, so ``parent``, ``name``, ``/``, ``with_suffix`` and ``match`` work as on a local
    path and keep the class.
    """

    def __str__(self) -> str:
        return "s3://" + super().__str__()

    @classmethod
    def parse(cls, url: str) -> S3Path:
        """``s3://bucket/key`` as an ``S3Path``; ``JobError`` for anything else."""
        if not url.startswith("s3://") or not url[5:].split("/", 1)[0]:
            raise JobError(f"{url!r} is not an S3 location (s3://bucket/key)")
        return cls(url[5:])

    @property
    def bucket(self) -> str:
        return self.parts[0]

    @property
    def key(self) -> str:
        return "/".join(self.parts[1:])

    @property
    def fs_path(self) -> str:
        """``bucket/key``, as pyarrow's S3FileSystem names it."""
        return super().__str__()


def s3_filesystem(
    *, endpoint_url: str | None = None, region: str | None = None, allow_http: bool = False,
    request_timeout: float | None = None,
) -> pafs.S3FileSystem:
    """pyarrow's ``S3FileSystem`` for AWS (no ``endpoint_url``) or an S3-compatible store.

    Credentials are left to the AWS SDK's default chain; none is ever passed or read here.
    ``http://`` is taken for a loopback endpoint only, unless ``allow_http``: on any other host
    the credentials' signatures and the data would cross the network in clear.
    ``request_timeout``: seconds a request may go without a byte back (the SDK's default is 3;
    pyarrow's documentation says it is ignored on Linux, but libcurl's low-speed limit takes it).
    """
    options: dict[str, Any] = {"region": region} if region else {}
    if request_timeout is not None:
        options["request_timeout"] = request_timeout
    if endpoint_url:
        url = check_endpoint_url(endpoint_url, allow_http=allow_http)
        options.update(endpoint_override=url.netloc, scheme=url.scheme)
    return pafs.S3FileSystem(**options)


def check_endpoint_url(endpoint_url: str, *, allow_http: bool = False) -> SplitResult:
    """``storage.endpoint_url`` split, or ``JobError`` saying what is wrong with it."""
    url = urlsplit(endpoint_url)
    if url.scheme not in ("http", "https") or not url.hostname or url.path not in ("", "/"):
        raise JobError(f"storage.endpoint_url: must be http(s)://host[:port] (got {endpoint_url!r})")
    if url.scheme == "http" and not allow_http and url.hostname not in ("127.0.0.1", "localhost", "::1"):
        raise JobError(
            f"storage.endpoint_url: plain http to {url.hostname} would send the data in clear; "
            "use https (or set storage.allow_http = true on a network you trust)"
        )
    return url


class S3Store:
    """``InputStore`` and ``OutputStore`` over ``S3Path`` locations (see the module docstring).

    ``scratch_dir`` is where ``publish`` has its local temporary file written (the system's
    temporary folder by default): it needs room for the whole output. ``copy_filesystem`` sends
    ``publish``'s server-side copy: the same store, with a ``request_timeout`` of
    ``COPY_SILENCE_S`` (``storage.s3_store`` makes it; ``filesystem`` when not given).
    """

    def __init__(
        self,
        filesystem: pafs.S3FileSystem,
        *,
        endpoint_url: str | None = None,
        scratch_dir: Path | None = None,
        copy_filesystem: pafs.S3FileSystem | None = None,
    ):
        self.fs = filesystem
        self.copy_fs = copy_filesystem or filesystem
        self.where = endpoint_url or "AWS S3"  # named in messages
        self.scratch_dir = scratch_dir

    # -- input ---------------------------------------------------------------------------------
    def expand(self, pattern: str, base: PurePath | None = None) -> list[S3Path]:
        """The objects an ``s3://bucket/key`` or glob (``*``, ``?``, ``[...]``, ``**``) names,
        sorted by key parts. A glob lists only below its longest literal prefix, and recursively
        only when it spans several levels. ``base`` is unused: S3 locations are absolute."""
        loc = S3Path.parse(pattern)
        parts = loc.parts[1:]
        if not parts:
            raise JobError(f"{pattern!r} names a whole bucket; name an object, or a glob such as '{str(loc)}/*.parquet'")
        first = next((i for i, p in enumerate(parts) if glob.has_magic(p)), None)
        if first is None:
            info = self._info(loc, "read")
            if info.type == pafs.FileType.File:
                return [loc]
            if info.type == pafs.FileType.Directory:
                raise JobError(
                    f"{loc} is a folder (a prefix of other keys); name an object, or a glob such as '{loc}/*.parquet'"
                )
            self._missing(loc, "read")
        top = S3Path(loc.bucket, *parts[:first])
        rest = parts[first:]
        selector = pafs.FileSelector(top.fs_path, recursive=len(rest) > 1 or "**" in rest, allow_not_found=True)
        infos = self._call("list", top, self.fs.get_file_info, selector)
        hits = [(S3Path(i.path), i.type) for i in infos]
        hits = [(p, kind) for p, kind in hits if _glob_match(parts, p.parts[1:])]
        files = sorted(p for p, kind in hits if kind == pafs.FileType.File)
        if not files:
            self._require_bucket(top, "list")  # a listing in a missing bucket is merely empty
            dirs = " (it matches only folders)" if hits else ""
            raise JobError(f"no object matches {pattern!r}{dirs} (listed {top}/)")
        return files

    def stat(self, path: PurePath) -> FileStat:
        """Size, Last-Modified and ETag. S3 keeps whole seconds: an object rewritten with the
        same size within a second keeps its size and mtime; its ETag tells such rewrites apart,
        and is what input change detection trusts (``fingerprint``)."""
        loc = _s3(path)
        info = self._info(loc, "read")
        if info.type != pafs.FileType.File:
            self._missing(loc, "read")
        return FileStat(info.size, info.mtime_ns or 0, self.etag(loc))

    def read_failure(self, exc: BaseException, path: PurePath) -> BatchrunError | None:
        """A read that failed because the store stopped answering (after pyarrow's retries) is
        ``StoreUnreachableError`` (exit 74, progress kept); any other failure is the object's."""
        if isinstance(exc, OSError):
            error = self._error(exc, "read", _s3(path))
            if error.fault is StoreFault.UNREACHABLE:
                return error
        return None

    def etag(self, path: PurePath) -> str | None:
        """The object's ETag (one HEAD), None when there is no object. It changes with every
        write of new content; it is the MD5 of the bytes only for single-part, unencrypted
        uploads, so it is compared, never computed."""
        head = self._head(_s3(path), "read")
        return None if head is None else head.get("ETag", "").strip('"') or None

    def open(self, path: PurePath) -> pa.NativeFile:
        """pyarrow's random-access reader: one HEAD, then a ranged GET per read."""
        loc = _s3(path)
        try:
            return self.fs.open_input_file(loc.fs_path)
        except FileNotFoundError:
            self._missing(loc, "read")
        except OSError as exc:
            raise self._error(exc, "read", loc) from None

    # -- output --------------------------------------------------------------------------------
    def ready(self, path: PurePath, *, create: bool) -> None:
        """Without ``create``: the bucket exists and these credentials may see it (a HEAD).
        With it: a probe object is written beside ``path`` and removed."""
        loc = _s3(path)
        if not loc.key:
            raise JobError(f"{loc} names a bucket; name an object such as '{loc}/answers.parquet'")
        if not create:
            self._require_bucket(loc, "check")
            return
        self._require_bucket(loc, "write")
        probe = loc.with_name(f".{loc.name}.tmp-{os.getpid()}-probe-{uuid.uuid4().hex[:8]}")
        self._upload(probe, b"", _content_type(probe.name), error_at=loc)
        self._remove(probe, error_at=loc)

    @contextmanager
    def publish(
        self, path: PurePath, kind: str, before_visible: Callable[[dict[str, int]], None]
    ) -> Iterator[Path]:
        """A local file to write; on a clean exit it becomes the object at ``path`` whole, after
        ``before_visible`` got its identity (the module docstring says how and why)."""
        loc = _s3(path)
        self._require_bucket(loc, "write")
        with tempfile.TemporaryDirectory(prefix="batchrun-s3-", dir=self.scratch_dir) as folder:
            tmp = Path(folder) / loc.name
            try:
                yield tmp
            except OSError as exc:
                if exc.errno in STORAGE_ERRNOS:
                    raise storage_error(exc, Path(folder)) from None
                raise
            assert tmp.is_file(), f"{kind}: nothing was written to {tmp}"
            size, digest = _sha256(tmp)
            identity = {"size": size, "sha256_64": int(digest[:16], 16)}
            content_type = _content_type(loc.name, digest)
            if size > COPY_LIMIT:
                before_visible(identity)
                crashpoint(f"{kind}:written")
                crashpoint(f"{kind}:fsynced")
                self._upload_checked(loc, tmp, content_type, size, error_at=loc)
            else:
                staging = loc.with_name(f".{loc.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
                try:
                    self._upload_checked(staging, tmp, content_type, size, error_at=loc)
                    crashpoint(f"{kind}:written")
                    before_visible(identity)
                    crashpoint(f"{kind}:fsynced")
                    self._call("write", loc, self.copy_fs.copy_file, staging.fs_path, loc.fs_path)
                finally:
                    self._remove_quietly(staging)
            crashpoint(f"{kind}:renamed")

    def identity(self, path: PurePath) -> dict[str, int] | None:
        """``{"size", "sha256_64"}`` of an object ``publish`` wrote, ``{"size", "etag_64"}`` of any
        other, None when there is none (one HEAD)."""
        head = self._head(_s3(path), "read")
        if head is None:
            return None
        size = int(head.get("Content-Length", "0"))
        found = re.search(DIGEST_PARAM + r"=([0-9a-f]{64})", head.get("Content-Type", ""))
        if found is not None:
            return {"size": size, "sha256_64": int(found[1][:16], 16)}
        etag = hashlib.sha256(head.get("ETag", "").encode()).hexdigest()
        return {"size": size, "etag_64": int(etag[:16], 16)}

    def exists(self, path: PurePath) -> bool:
        loc = _s3(path)
        return bool(self._info(loc, "read").type == pafs.FileType.File)

    def remove(self, path: PurePath) -> None:
        """Remove the object if it is there."""
        loc = _s3(path)
        self._remove(loc, error_at=loc)

    def read_json(self, path: PurePath) -> dict[str, Any] | None:
        """A JSON object; None when it is missing, not JSON, not an object or over 16 MB."""
        loc = _s3(path)
        try:
            with self.fs.open_input_stream(loc.fs_path, compression=None) as f:
                data = f.read(JSON_MAX_BYTES + 1)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise self._error(exc, "read", loc) from None
        if len(data) > JSON_MAX_BYTES:
            return None
        return json_object(data)

    def write_json(self, path: PurePath, doc: dict[str, Any], kind: str) -> None:
        """One PUT of the whole document from the upload thread: it shows whole or not at all."""
        loc = _s3(path)
        data = (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode("utf-8")
        self._require_bucket(loc, "write")
        crashpoint(f"{kind}:written")
        crashpoint(f"{kind}:fsynced")
        self._upload(loc, data, _content_type(loc.name), error_at=loc)
        crashpoint(f"{kind}:renamed")

    def beside(self, path: PurePath, pattern: str) -> list[S3Path]:
        """Objects next to ``path`` whose names match the glob ``pattern``, sorted."""
        loc = _s3(path)
        folder = loc.parent
        selector = pafs.FileSelector(folder.fs_path, recursive=False, allow_not_found=True)
        infos = self._call("list", folder, self.fs.get_file_info, selector)
        return sorted(
            S3Path(i.path) for i in infos
            if i.type == pafs.FileType.File and fnmatchcase(S3Path(i.path).name, pattern)
        )

    def leftovers(self, path: PurePath) -> list[S3Path]:
        """Staging objects a crashed ``publish`` left beside ``path`` (``.NAME.tmp-PID-RAND``)."""
        loc = _s3(path)
        return self.beside(loc, f".{loc.name}*.tmp-*")

    def clear_leftovers(self, path: PurePath, *, older_than_s: float = STAGING_STALE_S) -> None:
        """Remove staging objects beside ``path`` older than ``older_than_s``. A writer on another
        host cannot be asked whether it lives (no pid to check), but a staging object is copied to
        its final key the moment its upload ends: one that has sat for minutes is a crashed
        writer's, and removing a live one would only fail that writer's publish, never show a
        partial output."""
        now_ns = time.time_ns()
        for loc in self.leftovers(path):
            info = self._info(loc, "check")
            if info.mtime_ns is not None and now_ns - info.mtime_ns > older_than_s * 1e9:
                self.remove(loc)

    # -- requests and their errors -------------------------------------------------------------
    def _call(self, operation: str, loc: S3Path, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return fn(*args)
        except OSError as exc:
            raise self._error(exc, operation, loc) from None

    def _info(self, loc: S3Path, operation: str) -> Any:
        return self._call(operation, loc, self.fs.get_file_info, loc.fs_path)

    def _head(self, loc: S3Path, operation: str) -> dict[str, str] | None:
        """The object's headers as pyarrow reports them (Content-Length, Content-Type, ETag,
        Last-Modified...), None when there is no object. One HEAD request, no GET."""
        try:
            f = self.fs.open_input_file(loc.fs_path)
        except (FileNotFoundError, IsADirectoryError):
            return None
        except OSError as exc:
            raise self._error(exc, operation, loc) from None
        with f:
            meta = f.metadata()
        return {str(k): v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for k, v in meta.items()}

    def _require_bucket(self, loc: S3Path, operation: str) -> None:
        """A HEAD of the bucket: SeaweedFS creates a missing bucket on the first upload to it,
        where AWS refuses; checking first gives the same answer on both."""
        bucket = S3Path(loc.bucket)
        if self._call(operation, loc, self.fs.get_file_info, bucket.fs_path).type == pafs.FileType.NotFound:
            raise ObjectStoreError(
                f"cannot {operation} {loc}: the bucket '{loc.bucket}' does not exist at {self.where}",
                fault=StoreFault.NO_BUCKET, operation=operation, location=str(loc),
            )

    def _missing(self, loc: S3Path, operation: str) -> NoReturn:
        self._require_bucket(loc, operation)
        raise ObjectStoreError(
            f"cannot {operation} {loc}: no such object", fault=StoreFault.NO_OBJECT, operation=operation,
            location=str(loc),
        )

    def _error(self, exc: OSError, operation: str, loc: S3Path) -> ObjectStoreError:
        """pyarrow's OSError as an ``ObjectStoreError`` naming the operation, the location and
        the cause; pyarrow's own text only for causes not known here, with secrets removed."""
        text = " ".join(str(exc).split())
        found = re.search(r"AWS Error (\w+) during (\w+) operation:?\s*(.*)", text)
        code = found[1] if found else ""
        detail = scrub_secrets(re.sub(r"\s*\(Request ID: [^)]*\)", "", found[3] if found else text))[:300]
        fault = _fault(exc, code, text)
        where = f"cannot {operation} {loc}"
        if fault is StoreFault.NO_BUCKET:
            msg = f"{where}: the bucket '{loc.bucket}' does not exist at {self.where}"
        elif fault is StoreFault.NO_OBJECT:
            msg = f"{where}: no such object"
        elif fault is StoreFault.ACCESS_DENIED and _credential_source() is None:
            fault = StoreFault.NO_CREDENTIALS
            msg = (
                f"{where}: no AWS credentials were found, and {self.where} refused the unsigned request "
                f"({code}); set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE for a profile "
                "in ~/.aws/credentials"
            )
        elif fault is StoreFault.ACCESS_DENIED:
            msg = (
                f"{where}: {self.where} refused the credentials ({code}); check the access key and secret "
                f"key that the environment or the AWS profile provides, and that they may {operation} "
                f"in bucket '{loc.bucket}'"
            )
        elif fault is StoreFault.UNREACHABLE:
            msg = (
                f"{where}: the S3 endpoint {self.where} did not answer ({detail}); check storage.endpoint_url "
                "and that the store is up, then run the same command"
            )
        else:
            msg = f"{where}: {detail}"
        if fault is StoreFault.UNREACHABLE:
            return StoreUnreachableError(msg, fault=fault, operation=operation, location=str(loc))
        return ObjectStoreError(msg, fault=fault, operation=operation, location=str(loc))

    # -- uploads -------------------------------------------------------------------------------
    def _upload(self, loc: S3Path, source: Path | bytes, content_type: str, *, error_at: S3Path) -> None:
        try:
            run_to_end(lambda: _upload_stream(self.fs, loc.fs_path, source, content_type))
        except OSError as exc:
            raise self._error(exc, "write", error_at) from None

    def _upload_checked(self, loc: S3Path, source: Path, content_type: str, size: int, *, error_at: S3Path) -> None:
        self._upload(loc, source, content_type, error_at=error_at)
        info = self._info(loc, "write")
        if info.type != pafs.FileType.File or info.size != size:
            self._remove_quietly(loc)
            raise ObjectStoreError(
                f"cannot write {error_at}: the upload ended with {info.size} bytes of {size}; run the same command",
                fault=StoreFault.OTHER, operation="write", location=str(error_at),
            )

    def _remove(self, loc: S3Path, *, error_at: S3Path) -> None:
        try:
            self.fs.delete_file(loc.fs_path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise self._error(exc, "remove", error_at) from None

    def _remove_quietly(self, loc: S3Path) -> None:
        # Clean-up on a path that is already failing (the store may be down): ``leftovers`` finds
        # what is left.
        try:
            self.fs.delete_file(loc.fs_path)
        except OSError:
            pass


def _upload_stream(filesystem: pafs.S3FileSystem, key: str, source: Path | bytes, content_type: str) -> None:
    out = filesystem.open_output_stream(key, metadata={"Content-Type": content_type})
    try:
        if isinstance(source, bytes):
            out.write(source)
        else:
            with pa.OSFile(str(source), "rb") as src:
                chunks = 0
                while chunk := src.read_buffer(UPLOAD_CHUNK):
                    out.write(chunk)
                    chunks += 1
                    if chunks % FLUSH_EVERY == 0:
                        out.flush()  # waits for the parts in flight; raises if one failed
    except BaseException:
        # After a failed part pyarrow's close fails too (its error is sticky), so nothing is
        # completed; closing here, not in a garbage collection at exit, keeps the exit clean.
        try:
            out.close()
        except OSError:
            pass
        raise
    out.close()


def run_to_end(work: Callable[[], None]) -> None:
    """Run ``work`` in a thread of its own and return when it has ended, even if this thread is
    interrupted meanwhile: Python runs signal handlers in the main thread only, so SIGTERM's
    ``InterruptedRun`` or a Ctrl-C is raised here, after the upload ended whole or failed,
    never half-way through it (pyarrow would complete the half it had)."""
    failed: list[BaseException] = []

    def target() -> None:
        try:
            work()
        except BaseException as exc:
            failed.append(exc.with_traceback(None))

    worker = threading.Thread(target=target, name="batchrun-s3-upload")
    worker.start()
    interrupted: BaseException | None = None
    while worker.is_alive():
        try:
            worker.join()
        except BaseException as exc:
            interrupted = interrupted or exc
    if interrupted is not None:
        raise interrupted
    if failed:
        raise failed[0]


def _s3(path: PurePath | str) -> S3Path:
    if isinstance(path, S3Path):
        return path
    if isinstance(path, str):
        return S3Path.parse(path)
    raise TypeError(f"the S3 store takes S3Path locations, not {type(path).__name__} ({path})")


def _glob_match(pattern: tuple[str, ...] | list[str], key: tuple[str, ...] | list[str]) -> bool:
    """Whether key parts match glob parts as ``glob.glob(recursive=True)`` would: ``*``, ``?`` and
    ``[...]`` within one part, ``**`` across any number of parts; names starting with a dot only
    when the pattern part does too."""
    if not pattern:
        return not key
    head, rest = pattern[0], pattern[1:]
    if head == "**":
        for i in range(len(key) + 1):
            if _glob_match(rest, key[i:]):
                return True
            if i < len(key) and key[i].startswith("."):
                return False
        return False
    if not key:
        return False
    name = key[0]
    if glob.has_magic(head):
        if name.startswith(".") and not head.startswith("."):
            return False
        if not fnmatchcase(name, head):
            return False
    elif name != head:
        return False
    return _glob_match(rest, key[1:])


def _fault(exc: OSError, code: str, text: str) -> StoreFault:
    if code == "NO_SUCH_BUCKET":
        return StoreFault.NO_BUCKET
    if isinstance(exc, FileNotFoundError) or code in ("NO_SUCH_KEY", "RESOURCE_NOT_FOUND"):
        return StoreFault.NO_OBJECT
    if code in ("ACCESS_DENIED", "SIGNATURE_DOES_NOT_MATCH", "INVALID_ACCESS_KEY_ID", "MISSING_AUTHENTICATION_TOKEN",
                "INVALID_CLIENT_TOKEN_ID", "EXPIRED_TOKEN", "UNRECOGNIZED_CLIENT"):
        return StoreFault.ACCESS_DENIED
    if code in ("NETWORK_CONNECTION", "REQUEST_TIMEOUT", "SERVICE_UNAVAILABLE") or "curlCode" in text:
        return StoreFault.UNREACHABLE
    return StoreFault.OTHER


def _credential_source() -> str | None:
    """Where the AWS SDK's default chain would find credentials, as far as can be told without a
    request (the instance metadata service is asked only on EC2); None when nowhere."""
    env = os.environ
    if env.get("AWS_ACCESS_KEY_ID") or env.get("AWS_ACCESS_KEY"):
        return "environment"
    if env.get("AWS_WEB_IDENTITY_TOKEN_FILE") and env.get("AWS_ROLE_ARN"):
        return "web identity"
    if env.get("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI") or env.get("AWS_CONTAINER_CREDENTIALS_FULL_URI"):
        return "container"
    for name, default in (("AWS_SHARED_CREDENTIALS_FILE", "~/.aws/credentials"), ("AWS_CONFIG_FILE", "~/.aws/config")):
        if Path(os.path.expanduser(env.get(name) or default)).is_file():
            return "profile"
    if env.get("AWS_EC2_METADATA_DISABLED", "").lower() != "true":
        return "instance metadata"
    return None


def scrub_secrets(text: str) -> str:
    """``text`` without any credential the environment holds (an S3 error body may quote one)."""
    for name in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID", "AWS_SECRET_KEY", "AWS_ACCESS_KEY"):
        value = os.environ.get(name, "")
        if len(value) >= 4:
            text = text.replace(value, "***")
    return text


def _sha256(path: Path) -> tuple[int, str]:
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
        return os.fstat(f.fileno()).st_size, digest


def _content_type(name: str, digest: str | None = None) -> str:
    base = _CONTENT_TYPES.get(PurePosixPath(name).suffix.lower(), "application/octet-stream")
    return f"{base}; {DIGEST_PARAM}={digest}" if digest else base

