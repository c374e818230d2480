"""What every benchmark needs: the reference endpoint in its own process, children measured by wait4.

The driver process stays small on purpose (no pyarrow, polars or aiohttp import here): a child's
``ru_maxrss`` can include its parent's resident set at fork time, so a light parent keeps the
children's peak RSS figures honest. Heavy work (data generation, every contender) runs in children.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
BATCHRUN = str(Path(sys.executable).with_name("batchrun"))
PARAMS = {"max_tokens": 8, "temperature": 0.7, "top_p": 1.0, "top_k": 40}
MODEL = "custom/bench-model"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Endpoint:
    """``batchrun serve`` in its own process on a free loopback port."""

    def __init__(self, latency_ms: float = 0.0, per_prompt_ms: float = 0.0, *,
                 capacity_prompts: int | None = None, queue_prompts: int = 0):
        self.latency_ms = latency_ms
        self.per_prompt_ms = per_prompt_ms
        self.capacity_prompts = capacity_prompts  # the capacity model (``batchrun serve --capacity-prompts``)
        self.queue_prompts = queue_prompts
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.url = f"{self.base}/inference"
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Endpoint:
        cmd = [
            BATCHRUN, "serve", "--host", "127.0.0.1", "--port", str(self.port),
            "--latency-ms", str(self.latency_ms), "--per-prompt-ms", str(self.per_prompt_ms),
        ]
        if self.capacity_prompts is not None:
            cmd += ["--capacity-prompts", str(self.capacity_prompts), "--queue-prompts", str(self.queue_prompts)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the endpoint exited at start ({self.proc.returncode}): {' '.join(cmd)}")
            try:
                with urllib.request.urlopen(f"{self.base}/health", timeout=1) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.05)
        self.__exit__(None, None, None)
        raise RuntimeError("the endpoint did not come up within 30 s")

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.base}/stats", timeout=60) as r:
            return json.loads(r.read())

    def cpu_s(self) -> float:
        """CPU seconds the endpoint process has used so far (from /proc, no psutil)."""
        assert self.proc is not None
        return proc_cpu_s(self.proc.pid)


def proc_cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks  # utime, stime


@dataclass
class ChildResult:
    """A finished child: exit code, wall time, CPU and peak RSS from wait4, and its JSON report."""

    cmd: list[str]
    code: int
    wall_s: float
    cpu_s: float
    maxrss_mb: float
    report: dict[str, Any] = field(default_factory=dict)
    stdout: str = ""
    stderr: str = ""


def run_child(cmd: list[str], *, timeout_s: float | None = None, env: dict[str, str] | None = None,
              on_start: Any = None) -> ChildResult:
    """Run ``cmd`` and reap it with ``os.wait4`` to get its own rusage (user+sys, ru_maxrss).

    A child that prints a JSON object as its last stdout line has it parsed into ``report``.
    ``on_start(proc)`` runs right after the start (the resume benchmark polls the endpoint there).
    """
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=REPO, env=env)
        extra = on_start(proc) if on_start is not None else None
        deadline = None if timeout_s is None else started + timeout_s
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if deadline is not None and time.monotonic() > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.01)
        wall = time.monotonic() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout = out.read().decode("utf-8", "replace")
        stderr = err.read().decode("utf-8", "replace")
    report: dict[str, Any] = {}
    for line in reversed(stdout.strip().splitlines()):
        if line.startswith("{"):
            try:
                report = json.loads(line)
            except ValueError:
                pass
            break
    if isinstance(extra, dict):
        report.setdefault("on_start", extra)
    return ChildResult(
        cmd=cmd, code=proc.returncode, wall_s=wall, cpu_s=usage.ru_utime + usage.ru_stime,
        maxrss_mb=usage.ru_maxrss / 1024, report=report, stdout=stdout, stderr=stderr,
    )


def py_module(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", f"tests.benchmarks.{module}", *args]


def machine() -> dict[str, str]:
    model = "?"
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "nproc": str(os.cpu_count()),
        "cpu": model,
        "memory": f"{mem_gib:.0f} GiB",
        "python": platform.python_version(),
        "kernel": platform.release(),
        "load": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


def driver_maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_job(path: Path, *, input_path: Path, output_path: Path, api_base: str, batch_size: int,
              concurrency: int, id_column: str | None = "id", timeout_s: float = 120,
              checkpoint_rows: int | None = None) -> Path:
    lines = [
        "[input]",
        f'path = "{input_path}"',
        'prompt_column = "prompt"',
    ]
    if id_column:
        lines.append(f'id_column = "{id_column}"')
    lines += [
        "", "[endpoint]", f'api_base = "{api_base}"', f'model = "{MODEL}"', f"timeout_s = {timeout_s}",
        "", "[params]", *(f"{k} = {v!r}" for k, v in PARAMS.items()),
        "", "[run]", f"batch_size = {batch_size}", f"concurrency = {concurrency}", "max_retries = 3",
    ]
    if checkpoint_rows:
        lines.append(f"checkpoint_rows = {checkpoint_rows}")
    lines += ["", "[output]", f'path = "{output_path}"', ""]
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
