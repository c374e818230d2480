"""What a person at a terminal sees: a progress bar that log lines never break, and plain
progress lines on a terminal that reports no size (0x0)."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

from conftest import prompt_rows, write_csv, write_job
from endpoint import LiveEndpoint

from batchrun.server import ServerOptions

BATCHRUN = Path(sys.executable).with_name("batchrun")


def run_on_pty(args: list[str], cwd: Path, rows: int, cols: int, timeout: float = 60) -> tuple[int, str, str]:
    """Run batchrun with stderr on a new pty of ``rows`` x ``cols``; return exit code, stdout and
    everything the pty showed."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    proc = subprocess.Popen(
        [str(BATCHRUN), *args], cwd=cwd, stdout=subprocess.PIPE, stderr=follower, stdin=subprocess.DEVNULL
    )
    os.close(follower)
    shown = bytearray()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([leader], [], [], 0.1)
        if ready:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: every holder of the follower side has closed it
                break
            if not chunk:
                break
            shown += chunk
        elif proc.poll() is not None:
            break
    os.close(leader)
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out.decode(), shown.decode("utf-8", "replace")


def slow_job(folder: Path, url: str) -> Path:
    write_csv(folder / "input.csv", prompt_rows(40))
    return write_job(folder, url, run={"batch_size": 2, "concurrency": 1})


def test_a_terminal_of_size_0x0_gets_plain_progress_lines_not_a_bar(tmp_path: Path) -> None:
    with LiveEndpoint(ServerOptions(latency_s=0.02)) as ep:
        job = slow_job(tmp_path, ep.url)
        code, out, shown = run_on_pty([str(job), "--log-interval", "0.1"], tmp_path, 0, 0)
    assert code == 0, shown
    assert out.startswith("batchrun: complete: 40/40 rows succeeded")
    assert re.search(r"batchrun INFO progress: \d+/40 rows done, 0 failed", shown), shown
    assert "row/s" not in shown and "\r" not in shown.replace("\r\n", "\n"), "a bar was drawn"


def test_on_a_sized_terminal_log_lines_are_written_above_the_bar_never_inside_it(tmp_path: Path) -> None:
    """The endpoint answers 503 to a few requests mid-run, so warnings are logged while the bar is
    drawn: each starts on a line of its own, and the bar is drawn again after it."""
    faulted = {8, 9, 14}
    with LiveEndpoint(ServerOptions(latency_s=0.02), rule=lambda n, p: "503" if n in faulted else None) as ep:
        job = slow_job(tmp_path, ep.url)
        code, out, shown = run_on_pty([str(job)], tmp_path, 24, 100)
    assert code == 0, shown
    assert out.startswith("batchrun: complete: 40/40 rows succeeded")
    assert "row/s" in shown or "row]" in shown, f"no bar was drawn: {shown!r}"
    warnings = [m.start() for m in re.finditer(r"\d\d:\d\d:\d\d batchrun WARNING ", shown)]
    assert warnings, shown
    for at in warnings:
        # Whatever stood on the line before the warning was cleared first (tqdm writes "\r", blanks, "\r").
        line_start = max(shown.rfind("\n", 0, at), shown.rfind("\r", 0, at)) + 1
        assert line_start == at, f"a log line broke into the bar: {shown[max(0, at - 80):at + 40]!r}"
