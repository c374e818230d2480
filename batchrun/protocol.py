"""Wire formats behind one seam, ``Codec``, and the first of them: LiteLLM's ``custom/`` format.

The client sends through a ``Codec`` and knows no format; a new wire format is a new class with
the same three methods (``completions.CompletionsCodec``, ``chat.ChatCodec``). Both sides of the custom format live here: the
client's (``CustomCodec``: build a request, check and match an answer) and the reference
server's (``parse_request``, ``response_body``), so the format is written down once.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple, Protocol

# How an item is paired with the prompt it answers (``endpoint.echo_match``):
# "exact": by its echoed prompt, equal to the one sent; "trimmed": by its echoed prompt after
# surrounding whitespace is stripped and newlines normalised; "position": by its place, only when
# the answer has exactly one item per prompt sent (echoes are not read).
EchoMatch = Literal["exact", "trimmed", "position"]


class ResponseError(Exception):
    """The response as a whole is unusable (not JSON, wrong shape, ``message`` not "ok")."""


class Answer(NamedTuple):
    """One prompt's answer: the outputs as returned and the params the endpoint says it used.

    A named tuple, not a dataclass: one is made for every row, and this is the cheapest to build.
    The fields after ``params_json`` are for formats that report them (OpenAI); ``custom`` leaves
    them at their defaults, so its rows are built exactly as before.
    """

    output: list[str]
    params_json: str | None
    finish_reason: list[str | None] | None = None  # one per output; None where the server gave none
    prompt_tokens: int | None = None  # this row's own usage, where the format reports it per row
    completion_tokens: int | None = None


class Usage(NamedTuple):
    """Tokens a server reports it spent on one request (all its prompts and samples)."""

    prompt_tokens: int
    completion_tokens: int


@dataclass
class Matched:
    """Answers keyed by the index of the prompt in the request; ``problem`` explains the rest.

    ``usage`` is the request's whole usage where the answer reports it (OpenAI formats): the
    tokens were spent whether or not every answer was usable.
    """

    answers: dict[int, Answer] = field(default_factory=dict)
    problem: str | None = None
    usage: Usage | None = None


class Codec(Protocol):
    """A wire format, as the client uses it.

    What an implementation must guarantee: ``build_request`` carries exactly the prompts given, in
    order; ``match`` returns an answer only for a prompt the response proves it answers (never by
    list position alone unless the user chose so), keyed by the prompt's index in ``sent``, and
    explains in ``Matched.problem`` why any other prompt has none; it raises ``ResponseError``
    when nothing in the body is usable. It never raises anything else for a bad body.
    ``error_reason`` reads the reason out of an error answer (a non-2xx body) in the format's own
    error shape, or returns None to have the client quote the body as it is.
    """

    def build_request(self, prompts: Sequence[str]) -> bytes: ...

    def match(self, body: bytes, sent: Sequence[str]) -> Matched: ...

    def error_reason(self, body: bytes) -> str | None: ...


@dataclass(frozen=True)
class CustomCodec:
    """LiteLLM's ``custom/`` format: ``{"model", "params": {"prompt": [...], **params}}`` in,
    ``{"message": "ok", "data": [{"prompt", "output": [...], "params"}]}`` out."""

    model: str
    params: dict[str, Any]
    echo_match: EchoMatch = "exact"

    def build_request(self, prompts: Sequence[str]) -> bytes:
        return build_request(self.model, prompts, self.params)

    def match(self, body: bytes, sent: Sequence[str]) -> Matched:
        return match_response(body, sent, self.echo_match)

    def error_reason(self, body: bytes) -> str | None:
        return None  # the body is quoted as it is, as it always was


def parse_request(body: bytes) -> tuple[str, list[str], dict[str, Any]]:
    """The server's side: model, prompts and params of a request body, or ValueError saying why."""
    doc = json_object(body)
    # Unknown top-level keys are ignored: LiteLLM >= 1.74 merges `extra_body` in beside these.
    model, params = doc.get("model"), doc.get("params")
    if not isinstance(model, str):
        raise ValueError(f"model must be a string (got {type(model).__name__})")
    if not isinstance(params, dict):
        raise ValueError(f"params must be an object (got {type(params).__name__})")
    # LiteLLM's `custom` provider always sends a one-item list (litellm/main.py, `_complete_custom`
    # in 1.106: "prompt": [" ".join(message contents)]); a bare string is accepted as one prompt.
    return model, prompt_list(params.get("prompt"), "params.prompt"), params


def json_object(body: bytes) -> dict[str, Any]:
    """The server's side: a request body as a JSON object, or ValueError saying why not."""
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise ValueError(f"body is not JSON ({exc.__class__.__name__})") from None
    if not isinstance(doc, dict):
        raise ValueError(f"body must be a JSON object (got {type(doc).__name__})")
    return doc


def prompt_list(prompts: Any, name: str, shape: str = "a non-empty list of strings") -> list[str]:
    """The server's side: a request's prompts, a non-empty list of strings (a bare string is one
    prompt), or ValueError naming ``name`` and the ``shape`` it must have."""
    if isinstance(prompts, str):
        return [prompts]
    if not isinstance(prompts, list) or not prompts:
        shown = "empty list" if prompts == [] else "null" if prompts is None else type(prompts).__name__
        raise ValueError(f"{name} must be {shape} (got {shown})")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise ValueError(f"{name}[{i}] must be a string (got {type(prompt).__name__})")
    return prompts


def response_body(items: list[dict[str, Any]], message: str = "ok") -> dict[str, Any]:
    """The server's side: an answer (``items`` of ``prompt``, ``output``, ``params``) or, with no
    items and another message, an error."""
    return {"message": message, "data": items}


def build_request(model: str, prompts: Sequence[str], params: dict[str, Any]) -> bytes:
    """The request body: ``{"model", "params": {"prompt": [...], **params}}``."""
    return json.dumps(
        {"model": model, "params": {"prompt": list(prompts), **params}},
        ensure_ascii=False,
        separators=(",", ":"),
    ).encode("utf-8")


def normalise_echo(text: str) -> str:
    """What ``echo_match = "trimmed"`` compares: CRLF and CR read as LF, surrounding whitespace
    stripped."""
    return text.replace("\r\n", "\n").replace("\r", "\n").strip()


def match_response(body: bytes, sent: Sequence[str], echo_match: EchoMatch = "exact") -> Matched:
    """Check a response against the prompts sent and pair each valid item with its prompt.

    Items are matched by their echoed prompt, never by position alone, so a reordered answer
    lands right and a short, altered or padded one never puts an output on the wrong prompt.
    Where a prompt has more items than it was sent, none of them is trusted. ``echo_match``
    loosens the echo check (see ``EchoMatch``); every other check holds in every mode.
    """
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        if body.lstrip()[:1] == b"<":
            # A proxy's or framework's error page served with status 200.
            raise ResponseError(f"response is HTML, not JSON ({_short(repr(body.lstrip()[:60]))})") from None
        raise ResponseError(f"response is not JSON ({exc.__class__.__name__}: {_short(str(exc))})") from None
    if not isinstance(doc, dict):
        raise ResponseError(f"response is not a JSON object (got {type(doc).__name__})")
    if doc.get("message") != "ok":
        raise ResponseError(f'response message is not "ok" (got {_short(repr(doc.get("message")))})')
    data = doc.get("data")
    if not isinstance(data, list):
        raise ResponseError(f"response data is not a list (got {type(data).__name__})")

    memo: list[Any] = []
    if echo_match == "position":
        return _match_by_position(data, sent, memo)
    trimmed = echo_match == "trimmed"
    if len(data) == len(sent):
        matched = _match_in_order(data, sent, memo, trimmed)
        if matched is not None:
            return matched

    key = normalise_echo if trimmed else _same
    slots: dict[str, list[int]] = defaultdict(list)
    for i, prompt in enumerate(sent):
        slots[key(prompt)].append(i)
    items_for: dict[str, list[Answer]] = defaultdict(list)
    problems = _Problems()
    unmatched: list[str] = []
    for n, item in enumerate(data):
        answer, echoed, why = _check_item(item, memo)
        if why:
            problems.add(n, *why)
            continue
        assert answer is not None and echoed is not None  # an item without a problem has both
        prompt = echoed
        if key(prompt) not in slots:
            problems.add(n, "echoed prompt matches no prompt sent", _short(repr(prompt)))
            unmatched.append(prompt)
        else:
            items_for[key(prompt)].append(answer)

    result = Matched()
    for prompt, answers in items_for.items():
        indexes = slots[prompt]
        if len(answers) > len(indexes):
            problems.add(None, f"{len(answers)} items for a prompt sent {len(indexes)} time(s)")
            continue
        # Identical prompts are interchangeable: each answer belongs to that prompt's text.
        result.answers.update(zip(indexes, answers))
    missing = len(sent) - len(result.answers)
    head: list[str] = []
    if unmatched and not trimmed:
        head += _whitespace_hint(unmatched, sent)
    if len(data) != len(sent):
        head.append(f"{len(data)} items for {len(sent)} prompts")
    result.problem = problem_text(head + problems.lines(), missing)
    return result


def problem_text(lines: list[str], missing: int) -> str | None:
    """``Matched.problem`` from what was found wrong (the first three said) and how many prompts
    have no answer; None when there is nothing to say."""
    if missing and not lines:
        lines = [f"{missing} prompt(s) unanswered"]
    if not missing and not lines:
        return None
    return "invalid response: " + "; ".join(lines[:3]) + (f" (+{len(lines) - 3} more)" if len(lines) > 3 else "")


def _same(text: str) -> str:
    return text


def _whitespace_hint(unmatched: list[str], sent: Sequence[str]) -> list[str]:
    """Say so when echoes differ from the prompts sent only in whitespace or newline style: the
    endpoint trims or rewrites what it echoes, and ``echo_match = "trimmed"`` is the remedy."""
    normal = {normalise_echo(p) for p in sent}
    near = sum(normalise_echo(e) in normal for e in unmatched)
    if not near:
        return []
    if near == len(unmatched):
        return ['echoed prompts differ from those sent only in surrounding whitespace or newlines; '
                'set endpoint.echo_match = "trimmed"']
    return [f"{near} of {len(unmatched)} unmatched echoed prompts differ from those sent only in surrounding "
            'whitespace or newlines (endpoint.echo_match = "trimmed" would accept them)']


class _Problems:
    """Item problems, each kind said once: an answer whose every item fails the same way reads
    "16 items: ..." rather than sixteen lines of which three are shown."""

    def __init__(self) -> None:
        self._kinds: dict[str, list[tuple[int | None, str | None]]] = {}

    def add(self, item: int | None, kind: str, detail: str | None = None) -> None:
        self._kinds.setdefault(kind, []).append((item, detail))

    def lines(self) -> list[str]:
        out = []
        for kind, where in self._kinds.items():
            n, detail = where[0]
            if n is None:
                out.append(kind)
            elif len(where) == 1:
                out.append(f"item {n}: {kind}" + (f" ({detail})" if detail else ""))
            else:
                out.append(f"{len(where)} items: {kind} (first: item {n}" + (f", {detail})" if detail else ")"))
        return out


def _match_by_position(data: list[Any], sent: Sequence[str], memo: list[Any]) -> Matched:
    """``echo_match = "position"``: item i answers prompt i when there is one item per prompt;
    otherwise nothing can be placed. Each item is still checked, its echo excepted."""
    if len(data) != len(sent):
        return Matched(problem=(
            f"invalid response: {len(data)} items for {len(sent)} prompts; "
            'echo_match = "position" places only an answer with one item per prompt sent'
        ))
    result = Matched()
    problems = _Problems()
    for n, item in enumerate(data):
        answer, _, why = _check_item(item, memo, need_echo=False)
        if why:
            problems.add(n, *why)
        elif answer is not None:
            result.answers[n] = answer
    result.problem = problem_text(problems.lines(), 0)
    return result


def _match_in_order(data: list[Any], sent: Sequence[str], memo: list[Any], trimmed: bool) -> Matched | None:
    """The common case, checked in one pass: every item valid and echoing the prompt sent at its
    own position. Items paired with equal prompts are a matching by echo, as in the general path;
    anything else returns None and the general path sorts it out."""
    answers: dict[int, Answer] = {}
    for i, (item, prompt) in enumerate(zip(data, sent)):
        if type(item) is not dict:
            return None
        echo = item.get("prompt")
        if echo != prompt and not (trimmed and type(echo) is str and normalise_echo(echo) == normalise_echo(prompt)):
            return None
        output = item.get("output")
        if type(output) is not list or not output or not all(type(o) is str for o in output):
            return None
        params = item.get("params")
        if params is not None and type(params) is not dict:
            return None
        answers[i] = Answer(output, _params_json(params, memo))
    return Matched(answers)


def _check_item(
    item: Any, memo: list[Any], need_echo: bool = True
) -> tuple[Answer | None, str | None, tuple[str, str | None] | None]:
    """An item's answer and echo, or why it is unusable: (kind of problem, detail)."""
    if not isinstance(item, dict):
        return None, None, ("not an object", f"got {type(item).__name__}")
    prompt = item.get("prompt")
    if need_echo and not isinstance(prompt, str):
        return None, None, ("no echoed prompt", None)
    output = item.get("output")
    if not isinstance(output, list) or not all(isinstance(o, str) for o in output):
        return None, None, ("output is not a list of strings", f"got {type(output).__name__}")
    if not output:
        # No text at all for a prompt is the endpoint failing to answer it, not an answer.
        return None, None, ("output is an empty list", None)
    params = item.get("params")
    if params is not None and not isinstance(params, dict):
        return None, None, ("params is not an object", f"got {type(params).__name__}")
    return Answer(output, _params_json(params, memo)), prompt, None


_SCALARS = (str, int, float, bool, type(None))


def _params_json(params: dict[str, Any] | None, memo: list[Any]) -> str | None:
    """The echoed params as canonical JSON. Items of one answer nearly always echo the same
    params, so the last encoding is reused when the dict holds the same scalars of the same
    types (``1 == 1.0 == True`` in Python, but they are different JSON)."""
    if params is None:
        return None
    shape = (tuple(params), tuple(map(type, params.values())))
    if memo and memo[0] == params and memo[1] == shape:
        cached: str = memo[2]
        return cached
    text = json.dumps(params, sort_keys=True, separators=(",", ":"))
    if all(isinstance(v, _SCALARS) for v in params.values()):
        memo[:] = [params, shape, text]
    return text


def _short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
