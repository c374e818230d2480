"""Checks a run makes before its first request, shared with ``batchrun validate``: the output,
the key variable, and saved progress against the job.

Never destroy what batchrun did not write: the output path may not name an input file (directly,
through a glob that would match it, a symlink, ``..`` or a hard link), and a file already at the
output path is replaced only when this job's state records writing it, or when the user says so
(``output.overwrite = true`` or ``--overwrite``). The output folder must be writable before any
request is paid for.
"""

from __future__ import annotations

import errno
import fnmatch
import glob
import json
import os
import ssl
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import TYPE_CHECKING

from . import fingerprint as fingerprints
from . import source
from .errors import JobError, StateError
from .inputcheck import check_sample
from .plan import Plan
from .storage import ProgressStore, input_store, output_store, progress_store

if TYPE_CHECKING:
    from .config import JobSpec

OVERWRITE_HINT = "set output.overwrite = true in the job (or pass --overwrite) to replace it on purpose"


def with_overwrite(spec: JobSpec, overwrite: bool) -> JobSpec:
    """The job as ``--overwrite`` (or ``overwrite=True``) makes it: as ``output.overwrite = true``."""
    return spec.model_copy(update={"overwrite_output": True}) if overwrite else spec


@dataclass(frozen=True)
class Access:
    """What every request carries besides its body: the key, extra headers, the CA to trust.

    Never printed: ``repr`` names the headers, not their values.
    """

    api_key: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    secrets: tuple[str, ...] = ()  # header values read from the environment: never in a message
    ssl_context: ssl.SSLContext | None = None

    def __repr__(self) -> str:
        return f"Access(api_key={'set' if self.api_key else None}, headers={sorted(self.headers)})"


def read_access(spec: JobSpec) -> Access:
    """The key, the headers and the CA bundle the job names; ``JobError`` naming an unset
    variable or an unreadable bundle."""
    headers = dict(spec.headers)
    secrets = []
    for name, var in spec.headers_env.items():
        value = os.environ.get(var)
        if not value:
            raise JobError(
                f"{spec.job_path}: endpoint.headers_env.{name}: environment variable {var} is not set "
                "(it should hold that header's value)"
            )
        if "\n" in value or "\r" in value:
            raise JobError(f"{spec.job_path}: endpoint.headers_env.{name}: the value of {var} holds a line break")
        headers[name] = value
        secrets.append(value)
    context = None
    if spec.ca_bundle is not None:
        try:
            context = ssl.create_default_context(cafile=str(spec.ca_bundle))
        except (OSError, ssl.SSLError) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise JobError(f"{spec.job_path}: endpoint.ca_bundle: cannot load {spec.ca_bundle} ({why})") from None
    return Access(read_api_key(spec), headers, tuple(secrets), context)


def read_api_key(spec: JobSpec) -> str | None:
    """The key from the variable the job names; an unset or empty variable is an error naming it."""
    if spec.api_key_env is None:
        return None
    value = os.environ.get(spec.api_key_env)
    if not value:
        raise JobError(
            f"{spec.job_path}: endpoint.api_key_env: environment variable "
            f"{spec.api_key_env} is not set (it should hold the endpoint's API key)"
        )
    return value


def check_output_path(spec: JobSpec) -> None:
    """Refuse an output path that is a folder, cannot be made, or is (or would be) one of the
    job's input files."""
    out = spec.output_path
    if not isinstance(out, Path):  # an object store: no folders to be in the way
        _check_object_output(spec, out)
        return
    if out.is_dir():
        raise JobError(f"{spec.job_path}: output.path: is a directory, not a file ({out})")
    blocker = next((p for p in out.parents if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise JobError(f"{spec.job_path}: output.path: {blocker} is a file, so the output folder cannot be made")
    clash = next((f for f in spec.input_files if isinstance(f, Path) and _same_file(f, out)), None)
    if clash is not None:
        raise JobError(
            f"{spec.job_path}: output.path: {out} is an input file (input.path "
            f"{spec.input_pattern!r} reads {clash}); the output would replace its own input: "
            "choose another output path"
        )
    if _pattern_matches(spec.input_pattern, spec.job_path.parent, out):
        raise JobError(
            f"{spec.job_path}: output.path: {out} matches the input pattern {spec.input_pattern!r}; "
            "the next run would read its own output as input: choose another output path or pattern"
        )


def _check_object_output(spec: JobSpec, out: PurePath) -> None:
    """``check_output_path`` for an output on an object store: not one of the input objects, and
    not a key the input pattern would list."""
    if out in spec.input_files or (
        str(spec.input_pattern).startswith("s3://") and _match_parts(PurePath(spec.input_pattern[5:]).parts, out.parts)
    ):
        raise JobError(
            f"{spec.job_path}: output.path: {out} is read by the input pattern {spec.input_pattern!r}; "
            "the output would replace its own input, or the next run would read it as input: "
            "choose another output path or pattern"
        )


def check_output_owned(spec: JobSpec, state: ProgressStore) -> None:
    """Refuse a file at the output path that this job did not write, unless told to replace it."""
    found = output_store(spec).identity(spec.output_path)
    if found is None or spec.overwrite_output or state.wrote_output(found):
        return
    raise JobError(
        f"{spec.job_path}: output.path: {spec.output_path} already exists and this job did not "
        f"write it (its run state in {state.root} has no record of it); move it away, or "
        + OVERWRITE_HINT
    )


def check_output_writable(spec: JobSpec, *, create: bool) -> None:
    """The output's place takes files (``create``: its folder is made and a probe written;
    without, nothing is written); ``StorageError`` (74) if not."""
    output_store(spec).ready(spec.output_path, create=create)


def _same_file(a: Path, b: Path) -> bool:
    if a == b:
        return True
    try:
        return os.path.samefile(a, b)  # a hard link, or the same file reached another way
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            return False
        raise


def _pattern_matches(pattern: str, base: Path, path: Path) -> bool:
    """Whether ``glob.glob(pattern, recursive=True)`` (relative to ``base``) would list ``path``
    if it existed. Components are matched one by one, so ``*`` never crosses a ``/``; the folder
    before the first wildcard is resolved as the input's files are (symlinks, ``..``)."""
    full = pattern if os.path.isabs(pattern) else os.path.join(base, pattern)
    parts = Path(full).parts
    first = next((i for i, p in enumerate(parts) if glob.has_magic(p)), len(parts))
    prefix = Path(*parts[:first]).resolve()
    try:
        rest = path.relative_to(prefix).parts
    except ValueError:
        return False
    return _match_parts(parts[first:], rest)


def _match_parts(pattern: tuple[str, ...], name: tuple[str, ...]) -> bool:
    if not pattern:
        return not name
    if pattern[0] == "**":
        return any(_match_parts(pattern[1:], name[j:]) for j in range(len(name) + 1))
    if pattern[0] == "..":
        return False  # a wildcard folder followed by "..": too clever to follow; glob resolves it
    return bool(name) and fnmatch.fnmatchcase(name[0], pattern[0]) and _match_parts(pattern[1:], name[1:])


def check_saved_progress(
    spec: JobSpec, state: ProgressStore, plan: Plan, *, allow_incremental: bool = True
) -> fingerprints.InputCheck:
    """Compare saved progress with the job: ``StateError`` naming what changed when it cannot be
    resumed; otherwise the input check (``same``: resume as is; not ``same``: with an id column,
    the input is planned again incrementally)."""
    settings = json.loads(json.dumps(spec.settings()))
    saved = plan.settings
    # Keys only some protocols record (a custom job records none of the OpenAI ones, as before
    # they existed) read as their default where absent, so a switch of protocol is a change.
    keys = list(settings) + [k for k in saved if k not in settings]
    defaults = {"protocol": "custom"}
    changed = [
        f"{k}: {saved.get(k, defaults.get(k))!r} -> {settings.get(k, defaults.get(k))!r}"
        for k in keys
        if saved.get(k, defaults.get(k)) != settings.get(k, defaults.get(k))
    ]
    seen = fingerprints.check(input_store(spec.input_pattern, spec.storage), plan, spec.input_files)
    if not changed and (seen.same or (spec.id_column and allow_incremental)):
        return seen
    if not allow_incremental and not changed:
        changed.append("(an incremental plan is made by a run without --shard)")
    if not seen.same:
        changed.append("the input files (names, sizes or contents) differ")
    raise StateError(
        "this job has saved progress from a different input or settings: "
        + "; ".join(changed)
        + f". Restore them, or run with --restart to discard the progress in {state.root}"
    )


@dataclass(frozen=True)
class Validation:
    """What ``batchrun validate`` found: the job, its rows, and whether it has saved progress."""

    spec: JobSpec
    rows: int
    saved_progress: bool
    replan: bool = False  # the input changed and, having an id column, will be planned again by id


def validate_job(job: JobSpec | str | Path, *, overwrite: bool = False) -> Validation:
    """Every check ``run_job`` makes before its first request, without sending or writing anything.

    Raises the error the run would raise (``JobError``/``StateError`` exit 2, ``StorageError`` 74).
    """
    from .config import JobSpec
    from .inputcheck import open_job, with_input

    spec = with_overwrite(with_input(job) if isinstance(job, JobSpec) else open_job(job), overwrite)
    read_access(spec)
    check_output_path(spec)
    check_output_writable(spec, create=False)
    state = progress_store(spec)
    check_output_owned(spec, state)
    plan = state.read_plan()
    replan = plan is not None and not check_saved_progress(spec, state, plan).same
    check_sample(spec)
    rows = source.count_rows_and_check_ids(spec)
    if rows == 0:
        raise JobError(f"{spec.job_path}: input.path: the input has no rows")
    return Validation(spec, rows, plan is not None, replan)
