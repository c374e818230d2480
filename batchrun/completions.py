"""OpenAI's ``/v1/completions``: many prompts in one request, answers matched by choice index.

``{"model", "prompt": [...], **params}`` in; ``{"choices": [{"index", "text", "finish_reason"}],
"usage"}`` out, with ``index`` = prompt * n + sample (vLLM answers prompt-major, as OpenAI does).
Both sides live here: the client's ``CompletionsCodec`` and the reference server's
``parse_request``, so the format is written down once.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from . import openai_common as oc
from .protocol import Matched, prompt_list


@dataclass(frozen=True)
class CompletionsCodec:
    """Packed prompts for an OpenAI-compatible completions endpoint (vLLM, SGLang, TGI, ...).

    ``params`` are sent as given (``n`` included); ValueError at construction if they set a key
    the request carries itself (``model``, ``prompt``, ``messages``, ``stream``) or an ``n``
    that is not a positive integer.
    """

    model: str
    params: dict[str, Any]
    n: int = field(init=False)
    _head: bytes = field(init=False, repr=False)
    _tail: bytes = field(init=False, repr=False)
    _params_json: str = field(init=False, repr=False)

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: computed once here
        set_(self, "n", oc.samples_of(self.params))
        set_(self, "_head", b'{"model":' + json.dumps(self.model, ensure_ascii=False).encode("utf-8") + b',"prompt":')
        set_(self, "_tail", oc.encode_params(self.params) + b"}")
        set_(self, "_params_json", oc.params_json(self.params))

    def build_request(self, prompts: Sequence[str]) -> bytes:
        listed = json.dumps(list(prompts), ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        return self._head + listed + self._tail

    def match(self, body: bytes, sent: Sequence[str]) -> Matched:
        doc, choices = oc.choices_of(body)
        return oc.match_choices(doc, choices, len(sent), self.n, _read_text, self._params_json, oc.read_usage(doc))

    def error_reason(self, body: bytes) -> str | None:
        return oc.error_reason(body)


def _read_text(choice: dict[str, Any]) -> tuple[str | None, tuple[str, str | None] | None]:
    text = choice.get("text")
    if type(text) is not str:
        return None, ("text is not a string", f"got {type(text).__name__}")
    return text, None


def parse_request(body: bytes) -> tuple[str, list[str], dict[str, Any]]:
    """The server's side: model, prompts and the other params of a request, or ValueError why."""
    doc = oc.request_object(body)
    # Token-id prompts (lists of ints) are OpenAI too, but the toy model reads text only.
    prompts = prompt_list(doc.get("prompt"), "prompt", "a string or a non-empty list of strings")
    params = {k: v for k, v in doc.items() if k not in ("model", "prompt")}
    return doc["model"], prompts, params
