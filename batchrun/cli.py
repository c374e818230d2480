"""The command line: argument parsing, progress display, and the one place errors become messages."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TextIO, TypeVar

import click

if TYPE_CHECKING:
    from tqdm import tqdm

    from .engine import Progress
    from .report import RunSummary

from .errors import BatchrunError, JobError
from .memory import use_lean_memory_pool

# Before anything imports pyarrow (the package's own imports are lazy for this reason).
use_lean_memory_pool()

log = logging.getLogger("batchrun")
T = TypeVar("T")


_GROUP_OPTIONS = {"-h", "--help", "--version"}


class _DefaultToRun(click.Group):
    """``batchrun JOB.toml`` means ``batchrun run JOB.toml``."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in _GROUP_OPTIONS:
            args = ["run", *args]
        return super().parse_args(ctx, args)


@click.group(cls=_DefaultToRun, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="batchrun")
def main() -> None:
    """Run a prompt dataset through a custom LLM endpoint into Parquet, resumably.

    \b
      batchrun JOB.toml            run or resume a job (same as `batchrun run JOB.toml`)
      batchrun validate JOB.toml   check a job and print its plan; sends nothing
      batchrun status JOB.toml     show progress and the last run; sends nothing
      batchrun merge JOB.toml      write the output of a sharded job
      batchrun tune JOB.toml       find the fastest batch size and concurrency; writes nothing
      batchrun serve               run the reference endpoint
    """


class _Console:
    """The CLI's own last words: errors on stderr, the summary line on stdout; with
    ``--log-format json`` each is one JSON object like every log line."""

    def __init__(self, json_lines: bool = False) -> None:
        self.json_lines = json_lines

    def error(self, text: str) -> None:
        if self.json_lines:
            click.echo(_json_line("error", text), err=True)
        else:
            click.echo(f"batchrun: error: {text}", err=True)

    def summary(self, summary: RunSummary) -> None:
        if self.json_lines:
            click.echo(_json_line("info", summary.line(), summary=summary.to_dict()))
        else:
            click.echo(summary.line())


def _json_line(level: str, message: str, **fields: object) -> str:
    return json.dumps(
        {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "level": level, "message": message, **fields},
        sort_keys=True,
    )


def _boundary(
    debug: bool,
    fn: Callable[..., T],
    *args: Any,
    console: _Console | None = None,
    cleanup: Callable[[], None] | None = None,
    **kwargs: Any,
) -> T:
    """Run a command body; turn batchrun's errors into a message and an exit code.

    A run that stops early still ends with its summary line (the error carries the summary).
    ``cleanup`` (closing the progress bar) runs before anything is printed.
    """
    console = console or _Console()
    try:
        try:
            return fn(*args, **kwargs)
        finally:
            if cleanup is not None:
                cleanup()
    except JobError as exc:
        for problem in exc.problems:
            console.error(problem)
        code = exc.exit_code
    except BatchrunError as exc:
        if debug:
            traceback.print_exc()
        console.error(str(exc))
        if exc.summary is not None:
            console.summary(exc.summary)
        code = exc.exit_code
    except KeyboardInterrupt:
        console.error("interrupted; run the same command to resume")
        code = 130
    except Exception as exc:  # the one boundary: anything unplanned is still one clear line
        if debug:
            traceback.print_exc()
        console.error(f"unexpected {exc.__class__.__name__}: {exc} (use --debug for a traceback)")
        code = 1
    sys.exit(code)


@main.command()
@click.argument("job", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--restart", is_flag=True, help="Discard this job's saved progress and start over.")
@click.option("--quiet", "-q", is_flag=True, help="Print only errors and the summary line.")
@click.option(
    "--log-interval", type=click.FloatRange(min=0.1), default=30.0, show_default=True,
    help="Seconds between progress lines when not on a terminal.",
)
@click.option("--shard", metavar="I/N", help="Process only shard I of N (e.g. 2/8); the last shard to finish writes the output.")
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text", show_default=True,
              help="json: one JSON object per log line.")
@click.option("--overwrite", is_flag=True,
              help="Replace a file at output.path that this job did not write (as output.overwrite = true).")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def run(
    job: Path, restart: bool, quiet: bool, log_interval: float, shard: str | None, log_format: str,
    overwrite: bool, debug: bool,
) -> None:
    """Run JOB, or resume it where it stopped."""
    handler = _setup_logging(quiet, debug, log_format)
    from .runner import run_job

    console = _Console(log_format == "json")
    progress = _ProgressDisplay(quiet=quiet, interval=log_interval)
    handler.display = progress
    summary = _boundary(
        debug, run_job, job, console=console, cleanup=progress.close, on_progress=progress.update,
        restart=restart, handle_signals=True, shard=shard, overwrite=overwrite,
    )
    console.summary(summary)
    sys.exit(summary.exit_code)


@main.command()
@click.argument("job", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--overwrite", is_flag=True,
              help="Replace a file at output.path that this job did not write (as output.overwrite = true).")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def merge(job: Path, overwrite: bool, debug: bool) -> None:
    """Write JOB's single output from its shards; refuses (exit 75) while a shard is unfinished."""
    _setup_logging(False, debug)
    from .runner import merge_job

    console = _Console()
    summary = _boundary(debug, merge_job, job, console=console, overwrite=overwrite)
    console.summary(summary)
    sys.exit(summary.exit_code)


@main.command()
@click.argument("job", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object for machines.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def status(job: Path, as_json: bool, debug: bool) -> None:
    """Show JOB's progress and its last run, from the files on disk; sends nothing."""
    _setup_logging(False, debug)
    from .report import job_status

    info = _boundary(debug, job_status, job)
    if as_json:
        click.echo(json.dumps(info, indent=2, sort_keys=True))
        return
    rows = info["rows"]
    lines = [f"job:       {info['job']}", f"state:     {info['state']}"]
    if rows is not None:
        by_class = ", ".join(f"{k} {v}" for k, v in info["failed_by_class"].items())
        lines += [
            f"rows:      {rows} total, {info['done']} done ({info['succeeded']} succeeded, "
            f"{info['failed']} failed{': ' + by_class if by_class else ''}"
            + (f", {info['skipped']} skipped" if info["skipped"] else "")
            + f"), {info['pending']} pending"
            + (f" ({info['saved_in_partials']} of them answered and saved)" if info["saved_in_partials"] else ""),
        ]
    for name, holder in info["running"].items():
        lines.append(f"running:   {holder} ({name})")
    last = info["last_run"]
    if last:
        lines.append(
            f"last run:  {last['status']} (exit {last['exit_code']}), {last['started_at']} to "
            f"{last['finished_at']}, {last['rows_answered_this_run']} rows answered at "
            f"{last['rows_per_s']:.1f} rows/s"
        )
    for shard, s in info["shards"].items():
        if s:
            lines.append(f"{shard}: {s['status']} (exit {s['exit_code']}), finished {s['finished_at']}")
    lines.append(f"output:    {info['output']}" + (" (complete)" if info["success_marker"] else ""))
    click.echo("\n".join(lines))


@main.command()
@click.argument("job", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--overwrite", is_flag=True,
              help="As for run: a file at output.path that this job did not write may be replaced.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def validate(job: Path, overwrite: bool, debug: bool) -> None:
    """Check JOB as run would before its first request, and print its plan; sends and writes nothing."""
    _setup_logging(False, debug)
    from .preflight import validate_job

    found = _boundary(debug, validate_job, job, overwrite=overwrite)
    spec, rows = found.spec, found.rows
    b, c = spec.run.batch_size, spec.run.concurrency
    prompt = f"column {spec.prompt_column!r}" if spec.prompt_column else f"template {spec.template!r}"
    lines = [
        f"job:          {spec.job_path}",
        f"input:        {len(spec.input_files)} {spec.input_format} file(s), {rows} rows, "
        f"{len(spec.columns)} columns",
        f"prompt:       {prompt}" + (f"; id column {spec.id_column!r}" if spec.id_column else ""),
        "endpoint:     " + (spec.api_base[0] if len(spec.api_base) == 1
                             else f"{len(spec.api_base)} replicas: {', '.join(spec.api_base)}")
        + (f" ({spec.protocol})" if spec.protocol != "custom" else "") + f" model {spec.model_name!r}",
        f"params:       {spec.params or '(endpoint defaults)'}",
        f"requests:     up to {math.ceil(rows / b)} of {b} prompts, "
        + (f"in flight: adaptive, 1 to {spec.run.max_concurrency}" if c == "auto" else f"at most {c} in flight")
        + (" per replica" if len(spec.api_base) > 1 else ""),
        f"output:       {spec.output_path}",
        f"state:        {spec.state_dir} ("
        + ("input changed: the run plans it again by id, reusing unchanged rows" if found.replan
           else "has saved progress" if found.saved_progress else "new run")
        + ")",
    ]
    click.echo("\n".join(lines))
    click.echo("batchrun: job is valid")


@main.command()
@click.argument("job", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--sample", type=click.IntRange(1, 100_000), default=256, show_default=True,
              help="Prompts read from the start of the input and sent, over and over (never written).")
@click.option("--max-batch", type=click.IntRange(1, 4096), default=64, show_default=True,
              help="The largest batch size tried.")
@click.option("--max-concurrency", type=click.IntRange(1, 1024), default=64, show_default=True,
              help="The most requests in flight tried.")
@click.option("--point-s", type=click.FloatRange(min=0.1), default=10.0, show_default=True,
              help="The longest one setting is measured, in seconds.")
@click.option("--budget-s", type=click.FloatRange(min=0.1), default=300.0, show_default=True,
              help="The longest the whole tune sends, in seconds.")
@click.option("--replica", type=click.IntRange(min=1), default=1, show_default=True,
              help="Which of the job's endpoint URLs to tune (1-based); concurrency is per replica.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object for machines.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def tune(
    job: Path, sample: int, max_batch: int, max_concurrency: int, point_s: float, budget_s: float, replica: int,
    as_json: bool, debug: bool,
) -> None:
    """Send a sample of JOB's prompts at climbing batch sizes and concurrencies; recommend the fastest
    setting that ran without errors. Writes nothing."""
    _setup_logging(False, debug)
    from .tune import TuneOptions, tune_job

    options = TuneOptions(sample, max_batch, max_concurrency, point_s, budget_s, replica)
    result = _boundary(debug, tune_job, job, options)
    click.echo(json.dumps(result.to_dict(), indent=2, sort_keys=True) if as_json else "\n".join(result.lines()))
    if result.recommended is None:
        _Console().error("no setting ran without errors, so none is recommended; is the endpoint overloaded?")
        sys.exit(4)


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--latency-ms", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Delay added to every request.")
@click.option("--per-prompt-ms", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Extra delay per prompt in a request.")
@click.option("--tally-prompts", is_flag=True,
              help="Count every distinct prompt seen (GET /stats); memory grows with them.")
@click.option("--capacity-prompts", type=click.IntRange(min=1), default=None,
              help="Serve this many prompts in parallel in --latency-ms; above it latency grows with the load.")
@click.option("--queue-prompts", type=click.IntRange(min=0), default=0, show_default=True,
              help="With --capacity-prompts: shed a request with 503 past capacity + this many prompts in flight.")
def serve(
    host: str, port: int, latency_ms: float, per_prompt_ms: float, tally_prompts: bool,
    capacity_prompts: int | None, queue_prompts: int,
) -> None:
    """Run the reference endpoint (a deterministic toy model in the custom-endpoint format)."""
    from .server import ServerOptions, serve_forever

    serve_forever(
        host, port,
        ServerOptions(
            latency_s=latency_ms / 1000, per_prompt_s=per_prompt_ms / 1000, tally_prompts=tally_prompts,
            capacity_prompts=capacity_prompts, queue_prompts=queue_prompts,
        ),
    )


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
            "level": record.levelname.lower(),
            "message": record.getMessage(),
        }
        doc.update(getattr(record, "fields", {}))
        return json.dumps(doc, sort_keys=True)


class _LogHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Log lines to stderr; while a progress bar is drawn, through tqdm, so a line never lands in
    the middle of the bar (tqdm clears it, writes the line, and draws the bar again below)."""

    display: _ProgressDisplay | None = None

    def emit(self, record: logging.LogRecord) -> None:
        bar = self.display.bar if self.display is not None else None
        if bar is None:
            super().emit(record)
            return
        try:
            bar.write(self.format(record), file=self.stream)
        except Exception:
            self.handleError(record)


def _setup_logging(quiet: bool, debug: bool, fmt: str = "text") -> _LogHandler:
    handler = _LogHandler(sys.stderr)
    handler.setFormatter(
        _JsonFormatter()
        if fmt == "json"
        else logging.Formatter("%(asctime)s batchrun %(levelname)s %(message)s", "%H:%M:%S")
    )
    log.handlers[:] = [handler]
    log.propagate = False
    log.setLevel(logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO)
    return handler


def _draws_a_bar(stream: TextIO) -> bool:
    """A terminal that can show a bar: a tty with a size. A pty of 0x0 (some CI runners, a
    container started before its terminal was sized) gets plain progress lines instead."""
    if not stream.isatty():
        return False
    try:
        return os.get_terminal_size(stream.fileno()).columns > 0
    except (OSError, ValueError):
        return False


class _ProgressDisplay:
    """A tqdm bar on a terminal; a plain line every ``interval`` seconds otherwise (cron mail)."""

    def __init__(self, quiet: bool, interval: float):
        self.quiet = quiet
        self.interval = interval
        self.tty = _draws_a_bar(sys.stderr)
        self.bar: tqdm[NoReturn] | None = None
        self.last_line = time.monotonic()
        self.first_done: int | None = None

    def update(self, p: Progress) -> None:
        if self.quiet:
            return
        if self.first_done is None:
            self.first_done = p.done
        if self.tty:
            if self.bar is None:
                from tqdm import tqdm

                self.bar = tqdm(total=p.total, initial=p.done, unit="row", dynamic_ncols=True, smoothing=0.1)
            self.bar.update(p.done - self.bar.n)
            if p.limit is not None:
                self.bar.set_postfix(failed=p.failed, limit=p.limit, refresh=False)
            else:
                self.bar.set_postfix(failed=p.failed, refresh=False)
            return
        now = time.monotonic()
        if now - self.last_line >= self.interval:
            self.last_line = now
            rate = (p.done - self.first_done) / p.elapsed_s if p.elapsed_s > 0 else 0.0
            left = (p.total - p.done) / rate if rate > 0 else float("inf")
            eta = f"{left:.0f}s" if math.isfinite(left) else "?"
            fields: dict[str, Any] = {"done": p.done, "total": p.total, "failed": p.failed, "rows_per_s": round(rate, 1)}
            limit = ""
            if p.limit is not None:
                fields["concurrency_limit"] = p.limit
                limit = f", {p.limit} in flight allowed"
                if p.limits:
                    fields["concurrency_limits"] = list(p.limits)
                    limit += f" ({'+'.join(map(str, p.limits))} by replica)"
            log.info(
                "progress: %d/%d rows done, %d failed, %.1f rows/s, eta %s%s",
                p.done, p.total, p.failed, rate, eta, limit, extra={"fields": fields},
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
