"""Arrow's allocator for batchrun's own processes: jemalloc, which hands freed memory back.

pyarrow's default allocator (mimalloc) keeps per-thread heaps: the finish of a run over 3 KB rows
peaked at 297 MB with it and 220 MB with jemalloc. The choice is made through
``ARROW_DEFAULT_MEMORY_POOL`` before pyarrow is first imported, since only then does it reach
the allocations Arrow's C++ readers and writers make for themselves (``pa.set_memory_pool``
later changes Python-side allocations only, which measured 255 MB).

Arrow's jemalloc also returns freed pages at once (``dirty_decay_ms:0``) instead of keeping them
for about a second (Arrow's default, purged by a background thread). A run streams its whole
input through buffers of a few MB, and that second held tens of MB of pages already freed: a
whole run over 1M rows of 3 KB peaked at 228 MB with the default and 185 MB with a decay of 0
(decays of 10-100 ms still left most of it). The price is page faults: the finish of that run
spent 7.5 s of system time instead of 2.2 (user time 19 s either way); over narrow rows the
client's CPU per 1,000 prompts grew by 0.002-0.008 s (tests/benchmarks/RESULTS.md). The decay
is read when jemalloc starts, from ``JE_ARROW_MALLOC_CONF``: ``pa.jemalloc_set_decay_ms`` later
reaches only arenas created after it (measured: no gain on a whole run).

Called by batchrun's own entry points (the CLI, the Airflow operator), never by ``run_job``: the
allocator is process-wide, and a library should not choose it for its host. An explicit
``ARROW_DEFAULT_MEMORY_POOL`` or ``JE_ARROW_MALLOC_CONF`` is left alone.
"""

from __future__ import annotations

import os
import sys


def use_lean_memory_pool() -> None:
    if os.environ.get("ARROW_DEFAULT_MEMORY_POOL") or not sys.platform.startswith("linux"):
        return  # pyarrow's wheels carry jemalloc on Linux; elsewhere Arrow would warn and ignore it
    if "pyarrow" not in sys.modules:
        os.environ["ARROW_DEFAULT_MEMORY_POOL"] = "jemalloc"
        os.environ.setdefault("JE_ARROW_MALLOC_CONF", "dirty_decay_ms:0,muzzy_decay_ms:0")
        return
    import pyarrow as pa

    try:
        pa.set_memory_pool(pa.jemalloc_memory_pool())
        pa.jemalloc_set_decay_ms(0)  # too late for arenas jemalloc already made; the rest get it
    except NotImplementedError:  # a pyarrow built without jemalloc
        pass


def release_free_memory() -> None:
    """Hand memory freed by the run so far back to the system before a phase that needs its own.

    The requests phase leaves freed Python objects (parsed responses, in-flight bookkeeping) in
    glibc's heaps, which keep them for reuse, and the finish stacks its own peak on top.
    ``malloc_trim`` returns those pages; Arrow's pool gives back what it caches. Measured (before
    Arrow's jemalloc returned pages at once): a whole run over 1M rows of 3 KB peaked at 258 MB
    with this against 265-268 without. Both calls are no-ops where they do not apply.
    """
    import gc

    gc.collect()
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
            pass
    import pyarrow as pa

    pa.default_memory_pool().release_unused()
