"""The custom-endpoint wire format as pure functions: build a request, validate and match a response."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple


class ResponseError(Exception):
    """The response as a whole is unusable (not JSON, wrong shape, ``message`` not "ok")."""


class Answer(NamedTuple):
    """One prompt's answer: the outputs as returned and the params the endpoint says it used.

    A named tuple, not a dataclass: one is made for every row, and this is the cheapest to build.
    """

    output: list[str]
    params_json: str | None


@dataclass
class Matched:
    """Answers keyed by the index of the prompt in the request; ``problem`` explains the rest."""

    answers: dict[int, Answer] = field(default_factory=dict)
    problem: str | None = None


def build_request(model: str, prompts: Sequence[str], params: dict[str, Any]) -> bytes:
    """The request body: ``{"model", "params": {"prompt": [...], **params}}``."""
    return json.dumps(
        {"model": model, "params": {"prompt": list(prompts), **params}},
        ensure_ascii=False,
        separators=(",", ":"),
    ).encode("utf-8")


def match_response(body: bytes, sent: Sequence[str]) -> Matched:
    """Check a response against the prompts sent and pair each valid item with its prompt.

    Items are matched by their echoed prompt, never by position alone, so a reordered answer
    lands right and a short, altered or padded one never puts an output on the wrong prompt.
    Where a prompt has more items than it was sent, none of them is trusted.
    """
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ResponseError(f"response is not JSON ({exc.__class__.__name__}: {_short(str(exc))})") from None
    if not isinstance(doc, dict):
        raise ResponseError(f"response is not a JSON object (got {type(doc).__name__})")
    if doc.get("message") != "ok":
        raise ResponseError(f'response message is not "ok" (got {_short(repr(doc.get("message")))})')
    data = doc.get("data")
    if not isinstance(data, list):
        raise ResponseError(f"response data is not a list (got {type(data).__name__})")

    memo: list[Any] = []
    if len(data) == len(sent):
        matched = _match_in_order(data, sent, memo)
        if matched is not None:
            return matched

    slots: dict[str, list[int]] = defaultdict(list)
    for i, prompt in enumerate(sent):
        slots[prompt].append(i)
    items_for: dict[str, list[Answer]] = defaultdict(list)
    problems: list[str] = []
    for n, item in enumerate(data):
        answer, prompt, why = _check_item(item, memo)
        if why:
            problems.append(f"item {n}: {why}")
        elif prompt not in slots:
            problems.append(f"item {n}: echoed prompt matches no prompt sent ({_short(repr(prompt))})")
        else:
            items_for[prompt].append(answer)

    result = Matched()
    for prompt, answers in items_for.items():
        indexes = slots[prompt]
        if len(answers) > len(indexes):
            problems.append(f"{len(answers)} items for a prompt sent {len(indexes)} time(s)")
            continue
        # Identical prompts are interchangeable: each answer belongs to that prompt's text.
        result.answers.update(zip(indexes, answers))
    missing = len(sent) - len(result.answers)
    if len(data) != len(sent):
        problems.insert(0, f"{len(data)} items for {len(sent)} prompts")
    if missing and not problems:
        problems.append(f"{missing} prompt(s) unanswered")
    if missing or problems:
        result.problem = "invalid response: " + "; ".join(problems[:3]) + (
            f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
        )
    return result


def _match_in_order(data: list[Any], sent: Sequence[str], memo: list[Any]) -> Matched | None:
    """The common case, checked in one pass: every item valid and echoing the prompt sent at its
    own position. Items paired with equal prompts are a matching by echo, as in the general path;
    anything else returns None and the general path sorts it out."""
    answers: dict[int, Answer] = {}
    for i, (item, prompt) in enumerate(zip(data, sent)):
        if type(item) is not dict or item.get("prompt") != prompt:
            return None
        output = item.get("output")
        if type(output) is not list or not all(type(o) is str for o in output):
            return None
        params = item.get("params")
        if params is not None and type(params) is not dict:
            return None
        answers[i] = Answer(output, _params_json(params, memo))
    return Matched(answers)


def _check_item(item: Any, memo: list[Any]) -> tuple[Answer | None, str | None, str | None]:
    if not isinstance(item, dict):
        return None, None, f"not an object (got {type(item).__name__})"
    prompt = item.get("prompt")
    if not isinstance(prompt, str):
        return None, None, "no echoed prompt"
    output = item.get("output")
    if not isinstance(output, list) or not all(isinstance(o, str) for o in output):
        return None, None, f"output is not a list of strings (got {type(output).__name__})"
    params = item.get("params")
    if params is not None and not isinstance(params, dict):
        return None, None, f"params is not an object (got {type(params).__name__})"
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
        return memo[2]
    text = json.dumps(params, sort_keys=True, separators=(",", ":"))
    if all(isinstance(v, _SCALARS) for v in params.values()):
        memo[:] = [params, shape, text]
    return text


def _short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
