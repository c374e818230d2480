"""Input identity: what a plan pins about each input file, and how a later run checks it cheaply.

A plan records, per file, its name, size, ``mtime_ns`` and the sha256 of its whole content. A
later run trusts a file whose size and mtime both equal the plan's without reading it (so a
resume stays fast), and hashes whole any file whose mtime changed: the same bytes (a copy, a
``touch``) are accepted and the new mtime recorded, other bytes are a changed input. A file
edited in place that keeps its size and has its mtime set back (``os.utime``) is trusted: that is
the documented limit of trusting metadata.

Plans of version 1 recorded ``sample_sha256``: the whole file's sha256 up to 64 MB, its first
and last MB above. They are still compared that way, so they resume as they did.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import PurePath

from .errors import JobError
from .plan import FileMark, Plan
from .storage import FileStat, InputStore

# sha256 over a whole file ran at 1.5 GB/s on the development machine (0.70 s for 1 GiB from the
# page cache, 0.90 s once the cache was dropped; AMD EPYC with SHA extensions, OpenSSL 3.0, 2
# shared cores): a 23 GB input costs about 16 s when a plan is made, and nothing on a resume
# that finds sizes and mtimes unchanged. hashlib.file_digest and a 1 MB read loop ran alike.
_BLOCK = 1 << 20
# Version 1 plans: files up to this size were hashed whole, larger ones by head and tail.
_LEGACY_WHOLE = 64 << 20


@dataclass(frozen=True)
class InputCheck:
    """Whether the input holds the bytes a plan was made from.

    ``refreshed``: the plan's fingerprint with the mtimes of files proved unchanged by hashing
    (None when nothing needs writing back). ``hashes``: every sha256 computed on the way, by
    (path, size, mtime_ns), so a new plan need not hash a file twice.
    """

    same: bool
    refreshed: list[FileMark] | None
    hashes: dict[tuple[str, int, int], str]


def file_sha256(store: InputStore, path: PurePath) -> str:
    """The sha256 of a file's whole content, read in 1 MB blocks."""
    try:
        h = hashlib.sha256()
        with store.open(path) as fh:
            # read_buffer hands pyarrow's buffer to the hash without a copy into bytes
            while (block := fh.read_buffer(_BLOCK)).size:
                h.update(block)
        return h.hexdigest()
    except OSError as exc:
        raise JobError(f"cannot read {path.name}: {exc.strerror or exc}") from None


def take(store: InputStore, files: Sequence[PurePath], known: dict[tuple[str, int, int], str] | None = None) -> list[FileMark]:
    """Each file's path, size, mtime and whole-content sha256, as a new plan records them."""
    out: list[FileMark] = []
    for f in files:
        # stat before hashing: a file written to while it is hashed ends with a later mtime than
        # the one recorded, so the next run hashes it again instead of trusting a mixed digest.
        st = store.stat(f)
        digest = (known or {}).get((str(f), st.size, st.mtime_ns)) or file_sha256(store, f)
        mark: FileMark = {"path": str(f), "size": st.size, "mtime_ns": st.mtime_ns, "sha256": digest}
        if st.etag is not None:
            mark["etag"] = st.etag
        out.append(mark)
    return out


def identity(fingerprint: Sequence[FileMark]) -> list[tuple[object, ...]]:
    """What the bytes are, as a comparable value: name, size and digest of every file, in order.

    The directory may move with the job, and a copy changes mtime: neither is part of it.
    """
    return [
        (PurePath(str(f["path"])).name, f["size"], f.get("sha256") or f.get("sample_sha256")) for f in fingerprint
    ]


def check(store: InputStore, plan: Plan, files: Sequence[PurePath]) -> InputCheck:
    """Compare the input files with the fingerprint ``plan`` pinned, reading as little as it can."""
    recorded = plan.fingerprint
    if plan.version == 1:
        return InputCheck(identity(recorded) == identity(_legacy(store, files)), None, {})
    if [PurePath(str(r["path"])).name for r in recorded] != [f.name for f in files]:
        return InputCheck(False, None, {})
    refreshed: list[FileMark] = []
    hashes: dict[tuple[str, int, int], str] = {}
    touched = False
    for rec, f in zip(recorded, files):
        st = store.stat(f)
        if st.size != rec["size"]:
            return InputCheck(False, None, hashes)
        if _unchanged(rec, st):
            refreshed.append({**rec, "path": str(f)})
            continue
        digest = file_sha256(store, f)
        hashes[(str(f), st.size, st.mtime_ns)] = digest
        if digest != rec["sha256"]:
            return InputCheck(False, None, hashes)
        refreshed.append({**rec, "path": str(f), "mtime_ns": st.mtime_ns})
        if st.etag is not None:
            refreshed[-1]["etag"] = st.etag
        touched = True
    return InputCheck(True, refreshed if touched else None, hashes)


def _unchanged(rec: FileMark, st: FileStat) -> bool:
    """Whether a file of the recorded size can be trusted without reading it: on a store, its
    ETag is the one recorded (a new upload, even of the same bytes, changes it: then it is hashed);
    on a disk, its mtime is."""
    if "etag" in rec or st.etag is not None:
        return rec.get("etag") == st.etag
    return st.mtime_ns == rec["mtime_ns"]


def _legacy(store: InputStore, files: Sequence[PurePath]) -> list[FileMark]:
    """Fingerprints as version 1 made them (whole up to 64 MB, first and last MB above)."""
    out: list[FileMark] = []
    for f in files:
        size = store.stat(f).size
        if size <= _LEGACY_WHOLE:
            digest = file_sha256(store, f)
        else:
            h = hashlib.sha256()
            with store.open(f) as fh:
                h.update(fh.read(_BLOCK))
                fh.seek(size - _BLOCK)
                h.update(fh.read(_BLOCK))
            digest = h.hexdigest()
        out.append({"path": str(f), "size": size, "sample_sha256": digest})
    return out
