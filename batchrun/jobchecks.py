"""The checks on a job file that need several keys or more than a type: endpoint URL and
headers, params a protocol reserves, template placeholders. ``config`` calls them while it
loads a job; each returns problems worded "<file>: <section>.<key>: ...", never raises."""

from __future__ import annotations

import datetime
import ipaddress
import re
import string
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from .config import EndpointSection, ParamsSection

BUILTIN = "builtin"
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def sent_params(params: ParamsSection) -> dict[str, Any]:
    """The params as sent: the checked ones unless unset, every other key with its TOML value."""
    out = params.model_dump(exclude_none=True)
    out.update(params.model_extra or {})
    return out


# Keys a protocol's request is made of: a param of that name would replace or break them.
_RESERVED = {
    "custom": ("prompt",),
    "openai-completions": ("model", "prompt", "stream", "messages"),
    "openai-chat": ("model", "messages", "stream", "prompt"),
}


def params_problems(where: str, protocol: str, params: ParamsSection) -> list[str]:
    problems = []
    extra = params.model_extra or {}
    for key in _RESERVED[protocol]:
        if key in extra:
            problems.append(f"{where}: params.{key}: batchrun sets {key!r} itself in a {protocol} request; remove it")
    for key, value in extra.items():
        if isinstance(value, dict | list) and _has_datetime(value) or _is_datetime(value):
            problems.append(f"{where}: params.{key}: a TOML date or time cannot be sent as JSON; quote it")
    n = extra.get("n")
    if "n" in extra and (type(n) is not int or n < 1):
        problems.append(f"{where}: params.n: must be an integer >= 1 (got {n!r})")
    elif n is not None and protocol == "custom" and n != 1:
        problems.append(f"{where}: params.n: the custom protocol answers one output list per prompt; n is for OpenAI protocols")
    return problems


def _is_datetime(value: Any) -> bool:
    return isinstance(value, datetime.date | datetime.time)


def _has_datetime(value: Any) -> bool:
    if isinstance(value, dict):
        return any(_has_datetime(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_datetime(v) for v in value)
    return _is_datetime(value)


# Header names that carry credentials: their values come from the environment (headers_env).
_SECRET_HEADER = re.compile(r"auth|token|secret|key|cookie|password|session|signature", re.IGNORECASE)


def _header_problems(where: str, ep: EndpointSection) -> list[str]:
    problems = []
    for name, value in ep.headers.items():
        if not _HEADER_NAME.match(name):
            problems.append(f"{where}: endpoint.headers: {name!r} is not a valid header name")
        elif _SECRET_HEADER.search(name) or value.lower().startswith(("bearer ", "basic ")):
            # The value is never echoed: it may be a real key.
            problems.append(
                f"{where}: endpoint.headers.{name}: a credential never sits in a job file; put it in an "
                f"environment variable and name it in endpoint.headers_env (\"{name}\" = \"VARIABLE\")"
            )
        elif "\n" in value or "\r" in value:
            problems.append(f"{where}: endpoint.headers.{name}: a header value cannot hold a line break")
    for name, var in ep.headers_env.items():
        if not _HEADER_NAME.match(name):
            problems.append(f"{where}: endpoint.headers_env: {name!r} is not a valid header name")
        if not ENV_NAME.match(var):
            problems.append(
                f"{where}: endpoint.headers_env.{name}: must name an environment variable "
                "(letters, digits, underscores), not hold a value"
            )
    both = {n.lower() for n in ep.headers} & {n.lower() for n in ep.headers_env}
    for name in sorted(both):
        problems.append(f"{where}: endpoint.headers: {name!r} is set in both headers and headers_env")
    reserved = {"content-type", "content-length", "host"} | ({"authorization"} if ep.api_key_env else set())
    for name in [*ep.headers, *ep.headers_env]:
        if name.lower() in reserved:
            problems.append(f"{where}: endpoint.headers: {name!r} is set by batchrun itself")
    return problems


_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


def endpoint_problems(where: str, ep: EndpointSection) -> list[str]:
    problems = _api_base_problems(where, ep)
    problems += _header_problems(where, ep)
    if ep.echo_match != "exact" and ep.protocol != "custom":
        problems.append(
            f"{where}: endpoint.echo_match: only for the custom protocol (OpenAI answers are matched by index)"
        )
    if ep.api_key_env is not None and not ENV_NAME.match(ep.api_key_env):
        # Not echoed: someone may have pasted the key itself here.
        problems.append(
            f"{where}: endpoint.api_key_env: must name an environment variable "
            "(letters, digits, underscores), not hold a key"
        )
    return problems


def template_fields(template: str) -> tuple[str, ...]:
    fields: list[str] = []
    for _, name, spec, conv in string.Formatter().parse(template):
        if name is None:
            continue
        if name == "" or name.isdigit() or not name.isidentifier() and not _plain_name(name):
            raise ValueError(
                "placeholders must name a column, like {question}; "
                "positional {} and attribute or index access are not supported"
            )
        if spec or conv:
            raise ValueError(f"placeholder {{{name}}} must not carry a format spec or conversion")
        if name not in fields:
            fields.append(name)
    if not fields:
        raise ValueError("must name at least one column, like {question}")
    return tuple(fields)


def _plain_name(name: str) -> bool:
    # Column names may hold spaces or dashes; only "." and "[" change str.format's meaning.
    return not any(ch in name for ch in ".[]")


def _api_base_problems(where: str, ep: EndpointSection) -> list[str]:
    if isinstance(ep.api_base, str):
        return [] if ep.api_base == BUILTIN else _check_api_base(f"{where}: endpoint.api_base", ep.api_base, ep)
    problems: list[str] = []
    seen: set[str] = set()
    for i, url in enumerate(ep.api_base):
        key = f"{where}: endpoint.api_base[{i}]"
        if url == BUILTIN:
            problems.append(f'{key}: "{BUILTIN}" is a single endpoint, not a replica: give it as api_base alone')
            continue
        problems += _check_api_base(key, url, ep)
        if url.rstrip("/") in seen:
            problems.append(f"{key}: {url!r} is listed twice; each replica once")
        seen.add(url.rstrip("/"))
    return problems


def _check_api_base(key: str, url: str, ep: EndpointSection) -> list[str]:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return [f"{key}: must be an http(s) URL or \"{BUILTIN}\" (got {url!r})"]
    if parts.username or parts.password:
        return [f"{key}: must not carry credentials; use api_key_env"]
    if parts.scheme == "http" and not ep.allow_insecure_http and not _is_loopback(parts.hostname):
        return [
            f"{key}: plain http is only for loopback addresses; use https, "
            f"or set endpoint.allow_insecure_http = true (got {url!r})"
        ]
    return []


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
