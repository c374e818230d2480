"""OpenAI's ``/v1/chat/completions``: one conversation per request, its outputs by choice index.

``{"model", "messages": [{"role", "content"}], **params}`` in; ``{"choices": [{"index",
"message": {"role", "content"}, "finish_reason"}], "usage"}`` out. The engine hands a codec one
string per row: the user's text, or (for a messages column) the canonical JSON text of the row's
messages that ``read_messages`` makes. Both sides live here: ``ChatCodec`` for the client,
``parse_request`` for the reference server.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from . import openai_common as oc
from .protocol import Matched

ROLES = ("system", "user", "assistant", "tool")


def read_messages(value: Any) -> str:
    """A row's messages as canonical JSON text (``[{"role","content"},...]``, compact, UTF-8
    kept), or ValueError saying what is wrong with them.

    ``value`` is a list of mappings (a Parquet ``list<struct<role, content>>`` column) or the
    JSON text of one (a CSV column). Each message needs a ``role`` among ``ROLES`` and a string
    ``content``; other keys are refused unless null (a Parquet struct column carries every field
    of every row). The text is what the row's prompt hash covers and what the codec sends.
    """
    return json.dumps(_checked_messages(value), ensure_ascii=False, separators=(",", ":"))


def messages_of(text: str) -> list[dict[str, str]]:
    """The messages a ``read_messages`` text holds (checked again: it may come from a file)."""
    return _checked_messages(text)


def _checked_messages(value: Any) -> list[dict[str, str]]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except (ValueError, RecursionError) as exc:
            raise ValueError(f"messages are not JSON ({exc.__class__.__name__}: {oc.short(str(exc), 60)})") from None
    if not isinstance(value, list | tuple):
        raise ValueError(f"messages must be a list of {{role, content}} (got {_type(value)})")
    if not value:
        raise ValueError("messages must not be empty")
    out = []
    for i, msg in enumerate(value):
        if not isinstance(msg, dict):
            raise ValueError(f"messages[{i}] must be an object with role and content (got {_type(msg)})")
        role, content = msg.get("role"), msg.get("content")
        if role not in ROLES:
            raise ValueError(f"messages[{i}].role must be one of {', '.join(ROLES)} (got {oc.short(repr(role), 40)})")
        if not isinstance(content, str):
            raise ValueError(f"messages[{i}].content must be a string (got {_type(content)})")
        extra = sorted(k for k, v in msg.items() if k not in ("role", "content") and v is not None)
        if extra:
            raise ValueError(f"messages[{i}] has keys other than role and content: {', '.join(map(str, extra))}")
        out.append({"role": role, "content": content})
    return out


def _type(value: Any) -> str:
    return "null" if value is None else type(value).__name__


@dataclass(frozen=True)
class ChatCodec:
    """One conversation per request for an OpenAI-compatible chat endpoint.

    With ``messages_column`` false, each prompt is the user's text, after ``system`` (if any) as
    a system message; with it true, each prompt is a ``read_messages`` text, sent as it says
    (``system`` must then be None: the column's messages are the whole conversation). ``params``
    are sent as given; ValueError at construction as for ``CompletionsCodec``.
    """

    model: str
    params: dict[str, Any]
    system: str | None = None
    messages_column: bool = False
    n: int = field(init=False)
    _head: bytes = field(init=False, repr=False)
    _tail: bytes = field(init=False, repr=False)
    _params_json: str = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.messages_column and self.system is not None:
            raise ValueError("a system message goes in the messages column, not in input.system, when one is used")
        set_ = object.__setattr__  # frozen: computed once here
        set_(self, "n", oc.samples_of(self.params))
        head = b'{"model":' + json.dumps(self.model, ensure_ascii=False).encode("utf-8") + b',"messages":['
        if self.system is not None:
            head += _dump({"role": "system", "content": self.system}) + b","
        set_(self, "_head", head)
        set_(self, "_tail", b"]" + oc.encode_params(self.params) + b"}")
        set_(self, "_params_json", oc.params_json(self.params))

    def build_request(self, prompts: Sequence[str]) -> bytes:
        if len(prompts) != 1:
            raise ValueError(f"a chat request carries one conversation (got {len(prompts)} prompts)")
        if self.messages_column:
            return self._head + _dump(messages_of(prompts[0]))[1:-1] + self._tail
        return self._head + _dump({"role": "user", "content": prompts[0]}) + self._tail

    def match(self, body: bytes, sent: Sequence[str]) -> Matched:
        doc, choices = oc.choices_of(body)
        usage = oc.read_usage(doc)
        return oc.match_choices(doc, choices, len(sent), self.n, _read_content, self._params_json, usage,
                                per_row_usage=True)

    def error_reason(self, body: bytes) -> str | None:
        return oc.error_reason(body)


def _dump(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _read_content(choice: dict[str, Any]) -> tuple[str | None, tuple[str, str | None] | None]:
    message = choice.get("message")
    if type(message) is not dict:
        return None, ("message is not an object", f"got {_type(message)}")
    content = message.get("content")
    if type(content) is not str:
        # null content is a tool call or a refusal: no text to store for the row.
        return None, ("message.content is not a string", f"got {_type(content)}")
    return content, None


def parse_request(body: bytes) -> tuple[str, list[dict[str, str]], dict[str, Any]]:
    """The server's side: model, messages and the other params of a request, or ValueError why."""
    doc = oc.request_object(body)
    if "messages" not in doc:
        raise ValueError("messages is required")
    if isinstance(doc["messages"], str):  # JSON text is how a CSV column holds them, not the wire
        raise ValueError("messages must be a list of {role, content} (got str)")
    messages = _checked_messages(doc["messages"])
    params = {k: v for k, v in doc.items() if k not in ("model", "messages")}
    return doc["model"], messages, params
