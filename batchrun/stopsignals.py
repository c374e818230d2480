"""SIGINT and SIGTERM for a whole run: the first asks the engine to stop, a second exits at once."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable

from .errors import InterruptedRun


class StopSignals:
    """SIGINT and SIGTERM for a whole run, installed once by the runner (CLI runs only).

    While the engine runs, the first signal asks it to stop taking work and give requests in
    flight ``grace_s`` to land and be saved. Outside it (planning, waiting for a lock, writing the
    output) nothing is in flight: the first signal raises ``InterruptedRun`` where the run stands,
    which is safe because every file is published atomically. A second signal exits at once.
    """

    def __init__(self) -> None:
        self.fired: str | None = None
        self._target: tuple[asyncio.AbstractEventLoop, Callable[[str], None]] | None = None

    def __enter__(self) -> StopSignals:
        self._previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def attach(self, loop: asyncio.AbstractEventLoop, stop: Callable[[str], None]) -> None:
        self._target = (loop, stop)

    def detach(self) -> None:
        self._target = None

    def _on_signal(self, signum: int, frame: object) -> None:
        name = signal.Signals(signum).name
        if self.fired is not None:
            # Every file is published atomically, so leaving now is safe; in-flight work is
            # simply redone by the next run.
            os.write(2, b"batchrun: second signal: exiting now; run the same command to resume\n")
            os._exit(130)
        self.fired = name
        if self._target is None:
            raise InterruptedRun(name)
        loop, stop = self._target
        loop.call_soon_threadsafe(stop, name)
