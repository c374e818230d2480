"""What the OpenAI wire formats share: choices matched by index, usage, error bodies, params.

``completions`` and ``chat`` differ only in how a request carries its prompts and where a choice
holds its text; the checks on an answer (indexes, counts, usage) and the error shape are the same,
so they are written once, here, for both the client's codecs and the reference server.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from .protocol import Answer, Matched, ResponseError, Usage, json_object, problem_text

# Keys a codec writes itself: a param of the same name would replace the prompts sent, or ask for
# an answer in pieces (``stream``) that no codec reads.
RESERVED_PARAMS = frozenset({"model", "prompt", "messages", "stream"})


def samples_of(params: dict[str, Any]) -> int:
    """How many outputs each prompt gets (``n``, 1 when absent or null); ValueError if ``params``
    hold a key the codec writes itself or an ``n`` that is not a positive integer."""
    taken = sorted(RESERVED_PARAMS.intersection(params))
    if taken:
        raise ValueError(f"params may not set {', '.join(taken)}: the request carries them itself")
    n = params.get("n")
    if n is None:
        return 1
    if type(n) is not int or n < 1:  # bool is an int subclass; `true` samples is a mistake
        raise ValueError(f"params.n must be a positive integer (got {n!r})")
    return n


def params_json(params: dict[str, Any]) -> str:
    """The params as the ``params`` column records them: canonical JSON of what was sent (these
    servers echo none back)."""
    return json.dumps(params, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def encode_params(params: dict[str, Any]) -> bytes:
    """The params as the tail of a request object: ``,"k":v,...`` (empty for none), encoded once
    per codec so that each request costs one dump of its prompts only."""
    if not params:
        return b""
    return b"," + json.dumps(params, ensure_ascii=False, separators=(",", ":")).encode("utf-8")[1:-1]


def read_json(body: bytes) -> Any:
    """The body as JSON, or ResponseError saying what it is instead."""
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        if body.lstrip()[:1] == b"<":
            # A proxy's or framework's error page served with status 200.
            raise ResponseError(f"response is HTML, not JSON ({short(repr(body.lstrip()[:60]))})") from None
        raise ResponseError(f"response is not JSON ({exc.__class__.__name__}: {short(str(exc))})") from None


def error_reason(body: bytes) -> str | None:
    """The reason an OpenAI-style error body gives, or None when the body is not one.

    Reads ``{"error": {"message", "type", "code"}}`` (OpenAI, vLLM, LiteLLM's proxy), the flat
    ``{"object": "error", "message", "type", "code"}`` of older vLLM, and ``{"error": "text"}``
    (TGI, llama.cpp's older server).
    """
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        return None
    if not isinstance(doc, dict):
        return None
    return _reason_of(doc)


def _reason_of(doc: dict[str, Any]) -> str | None:
    err = doc.get("error")
    if isinstance(err, str) and err:
        return err
    if not isinstance(err, dict):
        if doc.get("object") != "error":
            return None
        err = doc
    message = err.get("message")
    if not isinstance(message, str):
        return None
    tags = [str(err[key]) for key in ("type", "code") if isinstance(err.get(key), str | int) and err[key] != ""]
    return f"{message} ({', '.join(tags)})" if tags else message


def read_usage(doc: dict[str, Any]) -> Usage | None:
    """``usage`` when it holds both token counts as integers; servers that report none, or report
    it oddly, leave it None (it is accounting, never a reason to refuse an answer)."""
    usage = doc.get("usage")
    if not isinstance(usage, dict):
        return None
    p, c = usage.get("prompt_tokens"), usage.get("completion_tokens")
    if type(p) is not int or type(c) is not int or p < 0 or c < 0:
        return None
    return Usage(p, c)


def choices_of(body: bytes) -> tuple[dict[str, Any], list[Any]]:
    """The answer object and its ``choices`` list, or ResponseError (quoting an error body's
    reason when a server answers an error with status 200)."""
    doc = read_json(body)
    if not isinstance(doc, dict):
        raise ResponseError(f"response is not a JSON object (got {type(doc).__name__})")
    choices = doc.get("choices")
    if not isinstance(choices, list):
        reason = _reason_of(doc)
        if reason is not None:
            raise ResponseError(f"response is an error, not choices: {short(reason, 200)}")
        raise ResponseError(f"response choices is not a list (got {type(choices).__name__})")
    return doc, choices


# Reads a choice's text: (text, None) or (None, (kind of problem, detail)).
OutputReader = Callable[[dict[str, Any]], tuple[str | None, tuple[str, str | None] | None]]


def match_choices(
    doc: dict[str, Any],
    choices: list[Any],
    prompts: int,
    n: int,
    read_output: OutputReader,
    params_json: str | None,
    usage: Usage | None,
    *,
    per_row_usage: bool = False,
) -> Matched:
    """Pair choices with prompts by ``index`` (prompt * n + sample), never by position.

    A choice counts only with an integer index in range that no other choice claims, and a text
    ``read_output`` accepts; a prompt is answered only when all its ``n`` samples count. With
    ``per_row_usage`` (one prompt per request) the request's usage is also the row's.
    """
    expected = prompts * n
    slots: list[Any] = [None] * expected
    claimed = [0] * expected
    problems = _Problems()
    for pos, choice in enumerate(choices):
        if type(choice) is not dict:
            problems.add(pos, "not an object", f"got {type(choice).__name__}")
            continue
        index = choice.get("index")
        if type(index) is not int:  # bool is an int subclass, and True is not an index
            problems.add(pos, "index is not an integer", f"got {_shown(index)}")
            continue
        if not 0 <= index < expected:
            problems.add(pos, f"index out of range 0..{expected - 1}", f"got {index}")
            continue
        claimed[index] += 1
        text, why = read_output(choice)
        if why is not None:
            problems.add(pos, *why)
            continue
        reason = choice.get("finish_reason")
        slots[index] = (text, reason if type(reason) is str else None)

    result = Matched(usage=usage)
    for p in range(prompts):
        base = p * n
        if any(claimed[base + s] != 1 for s in range(n)):
            continue
        samples = slots[base : base + n]
        if None in samples:
            continue
        output = [s[0] for s in samples]
        reasons = [s[1] for s in samples]
        if per_row_usage and usage is not None:
            result.answers[p] = Answer(output, params_json, reasons, usage.prompt_tokens, usage.completion_tokens)
        else:
            result.answers[p] = Answer(output, params_json, reasons)

    head = []
    if len(choices) != expected:
        per = f" x n={n}" if n > 1 else ""
        head.append(f"{len(choices)} choices for {prompts} prompts{per}")
    twice = [i for i, c in enumerate(claimed) if c > 1]
    if twice:
        # Which of them is right cannot be known, so none is used.
        head.append(_indexes(twice, "claimed by more than one choice (none used)"))
    unclaimed = [i for i, c in enumerate(claimed) if c == 0]
    if unclaimed:
        head.append(_indexes(unclaimed, "without a choice"))
    result.problem = problem_text(head + problems.lines(), prompts - len(result.answers))
    return result


def _indexes(which: list[int], what: str) -> str:
    if len(which) == 1:
        return f"index {which[0]} {what}"
    return f"{len(which)} indexes {what} (first: {which[0]})"


class _Problems:
    """Choice problems, each kind said once ("16 choices: ..." rather than sixteen lines)."""

    def __init__(self) -> None:
        self._kinds: dict[str, list[tuple[int, str | None]]] = {}

    def add(self, pos: int, kind: str, detail: str | None = None) -> None:
        self._kinds.setdefault(kind, []).append((pos, detail))

    def lines(self) -> list[str]:
        out = []
        for kind, where in self._kinds.items():
            pos, detail = where[0]
            if len(where) == 1:
                out.append(f"choice {pos}: {kind}" + (f" ({detail})" if detail else ""))
            else:
                out.append(f"{len(where)} choices: {kind} (first: choice {pos}" + (f", {detail})" if detail else ")"))
        return out


def _shown(value: Any) -> str:
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    return short(repr(value), 40) if isinstance(value, int | float | str) else type(value).__name__


def request_object(body: bytes) -> dict[str, Any]:
    """The server's side: a request body as a JSON object with a string ``model``, or ValueError."""
    doc = json_object(body)
    if not isinstance(doc.get("model"), str):
        raise ValueError(f"model must be a string (got {type(doc.get('model')).__name__})")
    if doc.get("stream"):
        raise ValueError("stream is not supported by the reference endpoint")
    return doc


def error_body(message: str, type_: str = "BadRequestError", code: int = 400) -> dict[str, Any]:
    """The server's side: an OpenAI-style error, as vLLM answers it."""
    return {"error": {"message": message, "type": type_, "param": None, "code": code}}


def short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
