"""The contenders, each run as its own process so its CPU and peak RSS are its own.

    python -m tests.benchmarks.baselines blast    --url U --concurrency C --batch B --prompts N
    python -m tests.benchmarks.baselines grouped  --url U --concurrency C --batch B --input F --out O
    python -m tests.benchmarks.baselines single   --url U --concurrency C --input F --out O --limit N
    python -m tests.benchmarks.baselines litellm  --url U --concurrency C --input F --limit N
    python -m tests.benchmarks.baselines batchrun --job JOB [--split]
    python -m tests.benchmarks.baselines openai   --url API_BASE --concurrency C --batch B --input F --limit N

Each prints one JSON line: prompts done, work seconds, the steady rate (prompts/s between 10% and
90% of the prompts answered, so start-up and the tail are left out), the process's CPU seconds
during the work (``getrusage``, all threads) and its VmHWM. The hand-written loops are what a user
would write in an afternoon: read the input in chunks, group B prompts per request, keep C requests
in flight, check each echoed prompt, keep the outputs, write one Parquet at the end; no checkpoint,
no retry.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .harness import MODEL, PARAMS

MODEL_NAME = MODEL.removeprefix("custom/")


def cpu_now() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def vmhwm_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def steady_rate(samples: list[tuple[float, int]], total: int, lo: float = 0.1, hi: float = 0.9) -> float:
    """Prompts/s between the moments ``lo`` and ``hi`` of ``total`` prompts were answered."""
    t_lo = n_lo = None
    for t, n in samples:
        if t_lo is None and n >= lo * total:
            t_lo, n_lo = t, n
        if t_lo is not None and n >= hi * total and t > t_lo:
            return (n - n_lo) / (t - t_lo)
    if len(samples) >= 2 and samples[-1][0] > samples[0][0]:
        return (samples[-1][1] - samples[0][1]) / (samples[-1][0] - samples[0][0])
    return 0.0


def report(kind: str, prompts: int, work_s: float, cpu_s: float, samples: list[tuple[float, int]], **extra: Any) -> None:
    doc = {
        "kind": kind,
        "prompts": prompts,
        "work_s": work_s,
        "rate": prompts / work_s if work_s else 0.0,
        "steady_rate": steady_rate(samples, prompts),
        "work_cpu_s": cpu_s,
        "vmhwm_mb": vmhwm_mb(),
        **extra,
    }
    print(json.dumps(doc), flush=True)


# -- the hand-written loops -------------------------------------------------------------------------
def read_rows(path: Path, limit: int | None, chunk: int = 65536) -> Iterator[tuple[list[str], list[str]]]:
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    seen = 0
    if path.suffix == ".csv":
        batches: Any = pacsv.open_csv(path, convert_options=pacsv.ConvertOptions(include_columns=["id", "prompt"]))
    else:
        batches = pq.ParquetFile(path).iter_batches(batch_size=chunk, columns=["id", "prompt"])
    for rb in batches:
        ids, prompts = rb.column(0).to_pylist(), rb.column(1).to_pylist()
        if limit is not None and seen + len(ids) > limit:
            ids, prompts = ids[: limit - seen], prompts[: limit - seen]
        seen += len(ids)
        yield ids, prompts
        if limit is not None and seen >= limit:
            return


async def grouped_loop(url: str, path: Path, out: Path | None, concurrency: int, batch: int,
                       limit: int | None) -> tuple[int, list[tuple[float, int]]]:
    import aiohttp

    queue: asyncio.Queue[tuple[list[str], list[str]] | None] = asyncio.Queue(maxsize=concurrency)
    results: list[tuple[list[str], list[list[str]]]] = []
    samples: list[tuple[float, int]] = []
    done = 0
    t0 = time.monotonic()

    async def produce() -> None:
        for ids, prompts in read_rows(path, limit):
            for i in range(0, len(ids), batch):
                await queue.put((ids[i : i + batch], prompts[i : i + batch]))
        for _ in range(concurrency):
            await queue.put(None)

    async def work(session: aiohttp.ClientSession) -> None:
        nonlocal done
        while (item := await queue.get()) is not None:
            ids, prompts = item
            body = json.dumps({"model": MODEL_NAME, "params": {"prompt": prompts, **PARAMS}}).encode()
            async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as resp:
                raw = await resp.read()
            doc = json.loads(raw)
            data = doc["data"]
            if doc.get("message") != "ok" or len(data) != len(prompts):
                raise RuntimeError(f"bad response: {raw[:200]!r}")
            outputs = []
            for sent, item_ in zip(prompts, data):
                if item_["prompt"] != sent:
                    raise RuntimeError("echo mismatch")
                outputs.append(item_["output"])
            results.append((ids, outputs))
            done += len(prompts)
            samples.append((time.monotonic() - t0, done))

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=300)) as session:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(produce())
            for _ in range(concurrency):
                tg.create_task(work(session))
    if out is not None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        ids = [i for chunk, _ in results for i in chunk]
        outs = [o for _, chunk in results for o in chunk]
        pq.write_table(pa.table({"id": ids, "output": outs}), out, compression="zstd")
    return done, samples


async def blast(url: str, concurrency: int, batch: int, prompts: int) -> tuple[int, list[tuple[float, int]]]:
    """Pre-built request bodies, responses read and not parsed: the endpoint's own ceiling."""
    import aiohttp

    from .data import prompt_of

    bodies = [
        json.dumps(
            {"model": MODEL_NAME, "params": {"prompt": [prompt_of(i) for i in range(lo, min(prompts, lo + batch))], **PARAMS}}
        ).encode()
        for lo in range(0, prompts, batch)
    ]
    sizes = [min(batch, prompts - lo) for lo in range(0, prompts, batch)]
    samples: list[tuple[float, int]] = []
    done = 0
    nxt = 0
    t0 = time.monotonic()

    async def work(session: aiohttp.ClientSession) -> None:
        nonlocal done, nxt
        while nxt < len(bodies):
            k = nxt
            nxt += 1
            async with session.post(url, data=bodies[k], headers={"Content-Type": "application/json"}) as resp:
                await resp.read()
                if resp.status != 200:
                    raise RuntimeError(f"HTTP {resp.status}")
            done += sizes[k]
            samples.append((time.monotonic() - t0, done))

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=300)) as session:
        async with asyncio.TaskGroup() as tg:
            for _ in range(concurrency):
                tg.create_task(work(session))
    return done, samples


async def openai_loop(api_base: str, path: Path, concurrency: int, batch: int, limit: int | None,
                      max_tokens: int, model: str) -> tuple[int, list[tuple[float, int]], str]:
    """The hand-written loop against an OpenAI-compatible ``/v1/completions`` (a real vLLM):
    B prompts per request as ``"prompt": [list]``, C requests in flight, greedy, each choice put
    back in its prompt's place by its ``index``. Also returns a digest of every output in input
    order, so two contenders can be seen to have answered alike."""
    import hashlib

    import aiohttp

    queue: asyncio.Queue[tuple[int, list[str]] | None] = asyncio.Queue(maxsize=concurrency)
    outputs: dict[int, str] = {}
    samples: list[tuple[float, int]] = []
    done = 0
    t0 = time.monotonic()
    url = f"{api_base.rstrip('/')}/completions"

    async def produce() -> None:
        pos = 0
        for _, prompts in read_rows(path, limit):
            for i in range(0, len(prompts), batch):
                await queue.put((pos + i, prompts[i : i + batch]))
            pos += len(prompts)
        for _ in range(concurrency):
            await queue.put(None)

    async def work(session: aiohttp.ClientSession) -> None:
        nonlocal done
        while (item := await queue.get()) is not None:
            first, prompts = item
            body = {"model": model, "prompt": prompts if batch > 1 else prompts[0], "max_tokens": max_tokens,
                    "temperature": 0}
            async with session.post(url, json=body) as resp:
                raw = await resp.read()
                if resp.status != 200:
                    raise RuntimeError(f"HTTP {resp.status}: {raw[:300]!r}")
            choices = json.loads(raw)["choices"]
            if sorted(c["index"] for c in choices) != list(range(len(prompts))):
                raise RuntimeError(f"choices do not match the {len(prompts)} prompts sent: {raw[:300]!r}")
            for c in choices:
                outputs[first + c["index"]] = c["text"]
            done += len(prompts)
            samples.append((time.monotonic() - t0, done))

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as session:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(produce())
            for _ in range(concurrency):
                tg.create_task(work(session))
    digest = hashlib.sha256(json.dumps([outputs[i] for i in range(len(outputs))]).encode()).hexdigest()[:16]
    return done, samples, digest


LITELLM_FAILED: list[int] = []


def litellm_loop(url: str, path: Path, concurrency: int, limit: int | None) -> tuple[int, list[tuple[float, int]]]:
    """LiteLLM's ``batch_completion`` (one prompt per call, ``concurrency`` threads).

    ``custom/`` calls all go through LiteLLM's one shared ``module_level_client``, whose timeout
    is 600 s and which ignores ``timeout=``. At 256 threads (litellm 1.110) one call in about a
    thousand was seen waiting for an answer the endpoint had already sent, holding the whole
    batch for ten minutes; so the shared client is replaced by one with a 30 s timeout, and
    calls that fail are counted and left out of the prompts done.
    """
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no fetch of the price list at import
    import litellm
    from litellm.llms.custom_httpx.http_handler import HTTPHandler

    litellm.module_level_client = HTTPHandler(timeout=30.0)

    prompts = [p for _, chunk in read_rows(path, limit) for p in chunk]
    messages = [[{"role": "user", "content": p}] for p in prompts]
    t0 = time.monotonic()
    answers = litellm.batch_completion(
        model=MODEL, api_base=url, messages=messages, max_workers=concurrency, timeout=30,
        max_tokens=PARAMS["max_tokens"], temperature=PARAMS["temperature"], top_p=PARAMS["top_p"],
    )
    failed = sum(isinstance(a, Exception) for a in answers)
    LITELLM_FAILED.append(failed)
    if failed == len(answers):
        raise RuntimeError(f"every litellm call failed, first: {answers[0]!r}")
    done = len(prompts) - failed
    return done, [(0.0, 0), (time.monotonic() - t0, done)]


# -- batchrun, in this process so its progress callback can be sampled -------------------------------
_SPLIT: dict[str, float] = {}


def _timed(label: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap ``fn`` so the CPU time of the thread calling it is added to ``_SPLIT[label]``."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t = time.thread_time()
        try:
            return fn(*args, **kwargs)
        finally:
            _SPLIT[label] = _SPLIT.get(label, 0.0) + time.thread_time() - t

    return wrapper


def install_split() -> None:
    """Attribute batchrun's CPU to reading, prompts, JSON, checkpointing and writing.

    Each wrapped function is timed with the CPU clock of the thread running it (several run in
    worker threads); whatever is left of the process's CPU is the event loop, aiohttp, the engine
    and Arrow's own thread pool.
    """
    from batchrun import engine, runner
    from batchrun.checkpoint import RunState, SegmentInfo
    from batchrun.protocol import CustomCodec

    engine._next_wanted = _timed("read input (segments)", engine._next_wanted)
    runner._plan = _timed("plan (count rows, ids, fingerprint)", runner._plan)
    engine.Engine._open_segment = _timed("prompts + hashes + ids", engine.Engine._open_segment)
    CustomCodec.build_request = _timed("json: build request", CustomCodec.build_request)
    CustomCodec.match = _timed("json: parse + match response", CustomCodec.match)
    engine.Segment.to_table = _timed("checkpoint: results to Arrow", engine.Segment.to_table)
    SegmentInfo.of = classmethod(_timed("checkpoint: results to Arrow", SegmentInfo.of.__func__))
    RunState.commit_segment = _timed("checkpoint: write segment", RunState.commit_segment)
    RunState.write_partial = _timed("checkpoint: write partial", RunState.write_partial)
    RunState.journal_sent = _timed("checkpoint: journal", RunState.journal_sent)
    RunState.scan_segments = _timed("checkpoint: scan segments", RunState.scan_segments)
    runner.write_output = _timed("write output (finish)", runner.write_output)


def batchrun_run(job: Path, split: bool, digest: bool = False) -> None:
    from batchrun.memory import use_lean_memory_pool

    use_lean_memory_pool()  # as the CLI does, before batchrun imports pyarrow
    from batchrun import run_job

    if split:
        install_split()
    from batchrun import runner

    finish: list[float] = []
    write_output = runner.write_output

    def timed_write_output(*args: Any, **kwargs: Any) -> Any:  # wall time of the finish
        t = time.monotonic()
        try:
            return write_output(*args, **kwargs)
        finally:
            finish.append(time.monotonic() - t)

    runner.write_output = timed_write_output
    samples: list[tuple[float, int]] = []
    t0 = time.monotonic()
    first_done: list[int] = []

    limits: list[tuple[float, int]] = []  # with concurrency = "auto": (seconds, limit) at each change

    def on_progress(p: Any) -> None:
        if not first_done:
            first_done.append(p.done)
        now = time.monotonic() - t0
        samples.append((now, p.sent))
        if p.limit is not None and (not limits or limits[-1][1] != p.limit):
            limits.append((round(now, 3), p.limit))

    cpu0 = cpu_now()
    summary = run_job(job, on_progress=on_progress, restart=True)
    work_s = time.monotonic() - t0
    cpu = cpu_now() - cpu0
    extra: dict[str, Any] = {}
    if digest:
        # The same digest as openai_loop's: every row's first output, in input order.
        import hashlib

        import pyarrow.parquet as pq

        outputs = pq.read_table(summary.output_path, columns=["output"]).column("output").to_pylist()
        extra["outputs_sha"] = hashlib.sha256(json.dumps([o[0] for o in outputs]).encode()).hexdigest()[:16]
    report(
        "batchrun", summary.rows_answered_this_run, work_s, cpu, samples,
        status=summary.status, requests=summary.requests, prompts_resent=summary.prompts_resent,
        finish_s=sum(finish), failed=summary.failed, retries_by_cause=summary.retries_by_cause,
        concurrency_limit=summary.concurrency_limit, concurrency_cuts=summary.concurrency_cuts,
        limits=limits or None,
        split=dict(sorted(_SPLIT.items(), key=lambda kv: -kv[1])) if split else None, **extra,
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="one benchmark contender")
    ap.add_argument("kind", choices=["blast", "grouped", "single", "litellm", "batchrun", "openai"])
    ap.add_argument("--url")
    ap.add_argument("--input", type=Path)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--job", type=Path)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompts", type=int, default=0)
    ap.add_argument("--limit", type=int)
    ap.add_argument("--split", action="store_true")
    ap.add_argument("--digest", action="store_true", help="batchrun: report a digest of the outputs (as openai)")
    ap.add_argument("--max-tokens", type=int, default=16, help="openai: max_tokens of each completion")
    ap.add_argument("--model", default="tiny", help="openai: the served model name")
    args = ap.parse_args(argv)
    if args.kind == "batchrun":
        batchrun_run(args.job, args.split, args.digest)
        return
    t0 = time.monotonic()
    cpu0 = cpu_now()
    extra: dict[str, Any] = {}
    if args.kind == "blast":
        n, samples = asyncio.run(blast(args.url, args.concurrency, args.batch, args.prompts))
    elif args.kind == "openai":
        n, samples, extra["outputs_sha"] = asyncio.run(openai_loop(
            args.url, args.input, args.concurrency, args.batch, args.limit, args.max_tokens, args.model))
    elif args.kind == "litellm":
        n, samples = litellm_loop(args.url, args.input, args.concurrency, args.limit)
    else:
        batch = 1 if args.kind == "single" else args.batch
        n, samples = asyncio.run(grouped_loop(args.url, args.input, args.out, args.concurrency, batch, args.limit))
    if LITELLM_FAILED:
        extra["failed_calls"] = LITELLM_FAILED[0]
    report(args.kind, n, time.monotonic() - t0, cpu_now() - cpu0, samples, **extra)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
