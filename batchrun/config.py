"""The job file: a frozen, typed ``JobSpec`` and ``load_job(path)``, reporting every problem at once.

``load_job`` reads the job file and nothing else. What the input holds (its files, format and
columns) is found by a planning step, ``inputcheck.open_job`` (or ``inputcheck.with_input`` on a
spec already loaded), which this module does not import: it takes that step as ``scan_input`` so
that a job's problems, in the file and in its input, are still reported together.
"""

from __future__ import annotations

import difflib
import tomllib
from collections.abc import Callable
from pathlib import Path, PurePath
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from . import jobchecks
from .errors import JobError


class _Section(BaseModel):
    # strict: TOML is typed, so "16" for an integer is a mistake worth reporting, not coercing.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class InputSection(_Section):
    path: str
    prompt_column: str | None = None
    template: str | None = None
    messages_column: str | None = None  # openai-chat: each row's conversation
    system: str | None = None  # openai-chat: a system message before each row's prompt
    id_column: str | None = None
    format: Literal["csv", "parquet"] | None = None
    csv_max_row_mb: float = Field(16.0, gt=0, le=1024)


Protocol = Literal["custom", "openai-completions", "openai-chat"]
OPENAI = ("openai-completions", "openai-chat")


class EndpointSection(_Section):
    # One URL, or a list of replicas of one model (requests go to the one with most spare room).
    api_base: str | Annotated[list[str], Field(min_length=1, max_length=256)]
    protocol: Protocol = "custom"
    model: str = Field(min_length=1)
    api_key_env: str | None = None
    headers: dict[str, str] = Field(default_factory=dict)
    headers_env: dict[str, str] = Field(default_factory=dict)
    ca_bundle: str | None = None
    timeout_s: float = Field(300.0, gt=0, le=86400)
    max_response_mb: float = Field(256.0, gt=0, le=65536)
    allow_insecure_http: bool = False
    echo_match: Literal["exact", "trimmed", "position"] = "exact"


class ParamsSection(_Section):
    """Sampling params, sent as given. The four below are checked; any other key is passed
    through with its TOML value (stop, seed, n, presence_penalty, response_format, ...)."""

    model_config = ConfigDict(extra="allow", frozen=True, strict=True, allow_inf_nan=False)

    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)


class RunSection(_Section):
    batch_size: int = Field(16, ge=1, le=4096)
    concurrency: Annotated[int, Field(ge=1, le=1024)] | Literal["auto"] = 8
    max_concurrency: int = Field(256, ge=1, le=4096)  # with concurrency = "auto": the most in flight
    max_retries: int = Field(5, ge=0, le=100)
    retry_backoff_s: float = Field(1.0, ge=0, le=3600)
    retry_backoff_max_s: float = Field(60.0, ge=0, le=86400)
    retry_after_max_s: float = Field(120.0, ge=0, le=86400)
    outage_after_failures: int = Field(20, ge=1, le=1_000_000)
    requests_per_minute: float | None = Field(None, gt=0)
    prompts_per_minute: float | None = Field(None, gt=0)
    checkpoint_rows: int = Field(2048, ge=1, le=1_000_000)
    checkpoint_interval_s: float = Field(30.0, gt=0, le=86400)
    grace_s: float = Field(10.0, ge=0, le=3600)


class OutputSection(_Section):
    path: str
    state_dir: str | None = None
    overwrite: bool = False


class StorageSection(_Section):
    """Where ``s3://`` paths live: AWS S3 by default, or an S3-compatible store. Credentials are
    never here: they come from the AWS environment and credential chain."""

    endpoint_url: str | None = None  # http(s)://host[:port] of an S3-compatible store
    region: str | None = None
    allow_http: bool = False  # plain http to a host other than loopback


class JobFile(_Section):
    input: InputSection
    endpoint: EndpointSection
    params: ParamsSection = ParamsSection()
    run: RunSection = RunSection()
    output: OutputSection
    storage: StorageSection = StorageSection()


class InputFiles(BaseModel):
    """What the planning step found the input to be: its files in order, their format and columns."""

    model_config = ConfigDict(frozen=True)

    files: tuple[PurePath, ...]  # local Paths, or s3store.S3Paths
    format: Literal["csv", "parquet"]
    columns: tuple[str, ...]


# The planning step's input check: (input section, job folder, template fields) -> what it
# found (None if nothing usable) and the problems, each worded as "input.<key>: ...".
# The last argument: the columns the output adds, which no input column may be named.
InputScanner = Callable[
    [InputSection, Path, tuple[str, ...], tuple[str, ...], StorageSection],
    tuple[InputFiles | None, list[str]],
]


class JobSpec(BaseModel):
    """A validated job with every path resolved against the job file's directory.

    ``input`` is None until the planning step has looked at the input (``inputcheck.with_input``);
    ``input_files``, ``input_format`` and ``columns`` read it and refuse before then.
    """

    model_config = ConfigDict(frozen=True)

    job_path: Path
    input_pattern: str
    input_format_option: Literal["csv", "parquet"] | None = None  # input.format as given
    input: InputFiles | None = None
    csv_block_bytes: int  # pyarrow's CSV block: the longest row it can parse
    prompt_column: str | None
    template: str | None
    template_fields: tuple[str, ...]
    id_column: str | None
    api_base: tuple[str, ...]  # the replicas, in the job file's order (one for a single URL)
    protocol: Protocol = "custom"
    model: str
    api_key_env: str | None
    headers: dict[str, str] = Field(default_factory=dict)
    headers_env: dict[str, str] = Field(default_factory=dict)  # header name -> environment variable
    ca_bundle: Path | None = None
    messages_column: str | None = None
    system: str | None = None
    timeout_s: float
    max_response_bytes: int
    # Not among settings(): it changes which answers are accepted, not what an answer holds.
    echo_match: Literal["exact", "trimmed", "position"] = "exact"
    params: dict[str, Any]
    run: RunSection
    output_path: PurePath  # a local Path, or an s3store.S3Path
    state_dir: PurePath  # a local Path, or an s3store.S3Path
    overwrite_output: bool = False  # replace a file at output_path that this job did not write
    storage: StorageSection = StorageSection()

    @property
    def input_files(self) -> tuple[PurePath, ...]:
        return self._scanned().files

    @property
    def input_format(self) -> Literal["csv", "parquet"]:
        return self._scanned().format

    @property
    def columns(self) -> tuple[str, ...]:
        return self._scanned().columns

    def _scanned(self) -> InputFiles:
        if self.input is None:
            raise RuntimeError("the input has not been looked at yet: use inputcheck.with_input(spec)")
        return self.input

    @property
    def model_name(self) -> str:
        """The model as sent on the wire: LiteLLM's ``custom/`` provider prefix is not sent by
        the custom protocol; OpenAI protocols send it as given."""
        return self.model if self.protocol in OPENAI else self.model.removeprefix("custom/")

    @property
    def prompt_columns(self) -> tuple[str, ...]:
        """The input columns a prompt is made from."""
        if self.messages_column:
            return (self.messages_column,)
        return (self.prompt_column,) if self.prompt_column else self.template_fields

    def settings(self) -> dict[str, Any]:
        """What shapes the outputs; a resumed run must match the one it continues. Keys keep
        today's set for ``custom`` so that progress saved before these keys existed resumes."""
        out: dict[str, Any] = {
            "model": self.model_name,
            "params": self.params,
            "prompt_column": self.prompt_column,
            "template": self.template,
            "id_column": self.id_column,
        }
        if self.protocol != "custom":
            out.update(protocol=self.protocol, messages_column=self.messages_column, system=self.system)
        return out


def load_job(path: str | Path, *, scan_input: InputScanner | None = None) -> JobSpec:
    """Read, validate and resolve a job file; raise ``JobError`` listing every problem found.

    Reads the job file only. With ``scan_input`` (the planning step's input check) the input is
    looked at too and its problems join the job file's.
    """
    job_path = Path(path)
    where = str(path)
    try:
        raw = tomllib.loads(job_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise JobError(f"{where}: job file not found") from None
    except UnicodeDecodeError as exc:
        raise JobError(f"{where}: not UTF-8 text ({exc.reason})") from None
    except tomllib.TOMLDecodeError as exc:
        raise JobError(f"{where}: malformed TOML: {exc}") from None
    except OSError as exc:
        raise JobError(f"{where}: cannot read the job file ({exc.strerror})") from None

    problems = _literal_key_problems(where, raw)
    # Each section is validated on its own, so that one bad section does not hide the problems
    # of the others, nor the checks on the input that need only [input].
    sections: dict[str, Any] = {}
    for key in raw:
        if key not in JobFile.model_fields:
            near = difflib.get_close_matches(key, list(JobFile.model_fields), n=1)
            hint = f" (did you mean [{near[0]}]?)" if near else ""
            problems.append(f"{where}: unknown section [{key}]{hint}")
    for name, fld in JobFile.model_fields.items():
        model = fld.annotation
        assert isinstance(model, type) and issubclass(model, BaseModel)
        if name not in raw:
            if fld.is_required():
                problems.append(f"{where}: missing section [{name}]")
            else:
                sections[name] = model()
            continue
        try:
            sections[name] = model.model_validate(raw[name])
        except ValidationError as exc:
            for err in _one_per_union(exc.errors()):
                problems.append(_describe(where, {**err, "loc": (name, *err["loc"])}))
    spec = _resolve(where, job_path.resolve(), sections, problems, scan_input)
    if problems:
        raise JobError(problems)
    assert spec is not None
    return spec


def _literal_key_problems(where: str, raw: dict[str, Any]) -> list[str]:
    endpoint = raw.get("endpoint")
    if isinstance(endpoint, dict):
        for key in ("api_key", "key", "token", "authorization"):
            if key in endpoint:
                # The value is never echoed: it may be a real key.
                endpoint.pop(key)
                return [
                    f"{where}: endpoint.{key}: a key never sits in a job file; put it in an "
                    "environment variable and name that variable with endpoint.api_key_env"
                ]
    return []


_RULES = {
    "greater_than_equal": "must be >= {ge}",
    "greater_than": "must be > {gt}",
    "less_than_equal": "must be <= {le}",
    "less_than": "must be < {lt}",
    "int_type": "must be an integer",
    "float_type": "must be a number",
    "string_type": "must be a string",
    "bool_type": "must be true or false",
    "missing": "is required",
    "string_too_short": "must not be empty",
    "literal_error": "must be one of {expected}",
    "model_type": "must be a table",
    "dict_type": "must be a table",
}


def _describe(where: str, err: dict[str, Any]) -> str:
    loc = [str(part) for part in err["loc"]]
    kind = err["type"]
    if kind == "extra_forbidden":
        *section, key = loc
        near = difflib.get_close_matches(key, _known_keys(section), n=1)
        hint = f" (did you mean '{near[0]}'?)" if near else ""
        return f"{where}: unknown key '{key}' in [{'.'.join(section)}]{hint}"
    if kind in ("model_type", "dict_type") and len(loc) == 1:
        return f"{where}: [{loc[0]}] must be a table (got {err['input']!r})"
    rule = _RULES.get(kind)
    rule = rule.format(**err.get("ctx", {})) if rule else err["msg"][0].lower() + err["msg"][1:]
    name = ".".join(loc)
    if kind == "missing":
        return f"{where}: {name}: {rule}"
    return f"{where}: {name}: {rule} (got {err['input']!r})"


def _one_per_union(errors: list[Any]) -> list[Any]:
    """A value refused by every member of a union (``concurrency``: an integer or "auto") is one
    problem, not one per member: the integer's rule for a number, the words for anything else."""
    out: list[Any] = []
    seen: set[tuple[Any, ...]] = set()
    for err in errors:
        loc = tuple(err["loc"])
        if len(loc) >= 2 and loc[-2] == "api_base" or len(loc) >= 3 and loc[-3] == "api_base":
            # api_base: a string or a list of strings; one problem, the list's if it is one.
            key = loc[: loc.index("api_base") + 1]
            if key not in seen:
                seen.add(key)
                value = err["input"] if loc[-1] in ("str", "list[str]") else None
                if isinstance(value, list) and not value:
                    out.append({**err, "loc": key, "type": "api_base", "msg": "Must name at least one replica"})
                elif loc[-1] == "str" and not isinstance(value, list):
                    out.append({**err, "loc": key, "type": "api_base", "msg": "Must be a URL or a list of URLs"})
                else:
                    item = next((e for e in errors if len(e["loc"]) > len(key) + 1 and e["loc"][len(key)] == "list[str]"), err)
                    where = (*key[:-1], f"api_base[{item['loc'][len(key) + 1]}]") if len(item["loc"]) > len(key) + 1 else key
                    out.append({**item, "loc": where, "type": "api_base", "msg": "Must be a URL (a string)"})
            continue
        if len(loc) < 2 or not isinstance(loc[-1], str) or not (loc[-1].startswith("literal[") or loc[-1] == "constrained-int"):
            out.append(err)
            continue
        key = loc[:-1]
        if key in seen:
            continue
        seen.add(key)
        value = err["input"]
        if isinstance(value, int | float) and not isinstance(value, bool):
            number = next(e for e in errors if tuple(e["loc"]) == (*key, "constrained-int"))
            out.append({**number, "loc": key})
        else:
            out.append({**err, "loc": key, "type": "int_or_auto", "msg": 'Must be an integer or "auto"'})
    return out


def _known_keys(section: list[str]) -> list[str]:
    model: type[BaseModel] = JobFile
    for part in section:
        annotation = model.model_fields[part].annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def _resolve(
    where: str, job_path: Path, sections: dict[str, Any], problems: list[str], scan_input: InputScanner | None
) -> JobSpec | None:
    """Check what needs several keys (and, given ``scan_input``, the input); add to ``problems``;
    build the spec."""
    base = job_path.parent
    inp: InputSection | None = sections.get("input")
    ep: EndpointSection | None = sections.get("endpoint")
    out: OutputSection | None = sections.get("output")
    run: RunSection | None = sections.get("run")
    if ep is not None:
        problems += jobchecks.endpoint_problems(where, ep)
    storage: StorageSection = sections.get("storage") or StorageSection()
    output_path: PurePath | None = None
    state_dir: PurePath | None = None
    if out is not None:
        output_path = _location(where, "output.path", out.path, base, problems)
        if output_path is not None and output_path.suffix != ".parquet":
            problems.append(f"{where}: output.path: must end in .parquet (got {out.path!r})")
        if out.state_dir:
            state_dir = _location(where, "output.state_dir", out.state_dir, base, problems)
        elif output_path is not None:
            # Beside the output, on its store: pods that share only a bucket resume each other's work.
            state_dir = output_path.with_name(output_path.name + ".batchrun")
    if storage.endpoint_url is not None:
        from .s3store import check_endpoint_url

        try:
            check_endpoint_url(storage.endpoint_url, allow_http=storage.allow_http)
        except JobError as exc:
            problems += [f"{where}: {p}" for p in exc.problems]
    if run is not None and run.retry_backoff_max_s < run.retry_backoff_s:
        problems.append(
            f"{where}: run.retry_backoff_max_s: must be >= run.retry_backoff_s "
            f"(got {run.retry_backoff_max_s!r})"
        )
    protocol = ep.protocol if ep is not None else "custom"
    params: ParamsSection | None = sections.get("params")
    if params is not None:
        problems += jobchecks.params_problems(where, protocol, params)
    if run is not None and protocol == "openai-chat":
        if "batch_size" not in run.model_fields_set:
            run = run.model_copy(update={"batch_size": 1})
        elif run.batch_size != 1:
            problems.append(
                f"{where}: run.batch_size: must be 1 with protocol \"openai-chat\" (got {run.batch_size}): "
                "a chat request carries one conversation; use \"openai-completions\" to pack prompts"
            )
    if inp is None:
        return None

    given = [k for k in ("prompt_column", "template", "messages_column") if getattr(inp, k) is not None]
    if inp.messages_column is not None and protocol != "openai-chat":
        problems.append(f"{where}: input.messages_column: only for protocol \"openai-chat\" (got {protocol!r})")
    elif inp.system is not None and protocol != "openai-chat":
        problems.append(f"{where}: input.system: only for protocol \"openai-chat\" (got {protocol!r})")
    elif inp.system is not None and inp.messages_column is not None:
        problems.append(f"{where}: input.system: a messages column carries its own system message; drop input.system")
    if len(given) != 1:
        keys = "prompt_column, template and messages_column" if protocol == "openai-chat" else "prompt_column and template"
        problems.append(
            f"{where}: input: set exactly one of {keys} "
            f"(got {'neither' if not given else 'both' if len(given) == 2 and protocol != 'openai-chat' else ' and '.join(given)})"
        )
    template_fields: tuple[str, ...] = ()
    if inp.template is not None:
        try:
            template_fields = jobchecks.template_fields(inp.template)
        except ValueError as exc:
            problems.append(f"{where}: input.template: {exc} (got {inp.template!r})")

    found: InputFiles | None = None
    if scan_input is not None:
        found, input_problems = scan_input(inp, base, template_fields, _added_columns(protocol), storage)
        problems += [f"{where}: {p}" for p in input_problems]
    if problems or ep is None or run is None or output_path is None or state_dir is None:
        return None
    return JobSpec(
        job_path=job_path,
        input_pattern=inp.path,
        input_format_option=inp.format,
        input=found,
        csv_block_bytes=int(inp.csv_max_row_mb * (1 << 20)),
        prompt_column=inp.prompt_column,
        template=inp.template,
        template_fields=template_fields,
        id_column=inp.id_column,
        api_base=(ep.api_base,) if isinstance(ep.api_base, str) else tuple(ep.api_base),
        protocol=ep.protocol,
        model=ep.model,
        api_key_env=ep.api_key_env,
        headers=ep.headers,
        headers_env=ep.headers_env,
        ca_bundle=(base / ep.ca_bundle).resolve() if ep.ca_bundle else None,
        messages_column=inp.messages_column,
        system=inp.system,
        timeout_s=ep.timeout_s,
        max_response_bytes=int(ep.max_response_mb * (1 << 20)),
        echo_match=ep.echo_match,
        params=jobchecks.sent_params(sections["params"]),
        run=run,
        output_path=output_path,
        state_dir=state_dir,
        overwrite_output=out.overwrite if out is not None else False,
        storage=storage,
    )


def _location(where: str, key: str, value: str, base: Path, problems: list[str]) -> PurePath | None:
    """A job file's path: ``s3://bucket/key`` as an ``S3Path``, anything else a local path
    resolved against the job file's folder."""
    if "://" not in value:
        return (base / value).resolve()
    from .s3store import S3Path

    try:
        loc = S3Path.parse(value)
    except JobError:
        problems.append(f"{where}: {key}: only s3:// locations and local paths are supported (got {value!r})")
        return None
    if not loc.key:
        problems.append(f"{where}: {key}: name a key inside the bucket, not the bucket alone (got {value!r})")
        return None
    return loc


def _added_columns(protocol: str) -> tuple[str, ...]:
    from .wire import COLUMNS

    return COLUMNS[protocol]
