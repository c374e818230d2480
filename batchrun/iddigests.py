"""Repeated 64-bit digests among millions, found in bounded memory: the duplicate-id check's core."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np


class IdDigests:
    """64-bit digests of every id, to find repeated ones in bounded memory.

    Up to ``_IDS_IN_MEMORY`` digests are kept in memory (8 bytes each); past that they are
    spilled into ``_ID_PARTS`` temporary files by their top bits, and each file is checked on its
    own, so a 100M-row input needs 800 MB of temporary disk but only 1/64 of that in memory.
    """

    def __init__(self) -> None:
        self._held: list[np.ndarray] = []
        self._count = 0
        self._dir: tempfile.TemporaryDirectory[str] | None = None
        self._parts: list[Any] = []

    def __enter__(self) -> IdDigests:
        return self

    def __exit__(self, *exc: object) -> None:
        for f in self._parts:
            f.close()
        if self._dir is not None:
            self._dir.cleanup()

    def add(self, digests: np.ndarray) -> None:
        self._held.append(digests.astype(np.uint64, copy=False))
        self._count += digests.size
        if self._count > _IDS_IN_MEMORY:
            self._spill()

    def _spill(self) -> None:
        if self._dir is None:
            self._dir = tempfile.TemporaryDirectory(prefix="batchrun-ids-")
            self._parts = [open(Path(self._dir.name) / f"{p:02d}", "wb") for p in range(_ID_PARTS)]
        for digests in self._held:
            part = (digests >> np.uint64(64 - _ID_PART_BITS)).astype(np.intp)
            order = np.argsort(part, kind="stable")
            bounds = np.cumsum(np.bincount(part, minlength=_ID_PARTS))
            ordered = digests[order]
            lo = 0
            for p, hi in enumerate(bounds):
                if hi > lo:
                    ordered[lo:hi].tofile(self._parts[p])
                lo = hi
        self._held, self._count = [], 0

    def repeated(self) -> np.ndarray:
        """The digests seen more than once."""
        if self._dir is None:
            return _repeated(np.concatenate(self._held) if self._held else np.empty(0, np.uint64))
        self._spill()
        found = []
        for f in self._parts:
            f.close()
            found.append(_repeated(np.fromfile(f.name, dtype=np.uint64)))
        return np.concatenate(found)


_IDS_IN_MEMORY = 2_000_000
_ID_PART_BITS = 6
_ID_PARTS = 1 << _ID_PART_BITS


def _repeated(digests: np.ndarray) -> np.ndarray:
    digests.sort()
    return np.unique(digests[1:][digests[1:] == digests[:-1]])
