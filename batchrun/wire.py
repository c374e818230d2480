"""Which wire format a job speaks (``endpoint.protocol``), chosen here and nowhere else.

Each format is a module behind the ``protocol.Codec`` seam: ``protocol`` (LiteLLM's ``custom/``,
the default), ``completions`` (OpenAI ``/v1/completions``, prompts packed in one request) and
``chat`` (OpenAI ``/v1/chat/completions``, one conversation a request). This module maps a job to
its codec, the URL its requests go to, and the columns its output adds.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .protocol import Codec, CustomCodec

if TYPE_CHECKING:
    from .config import JobSpec

# The columns every output row gets, by protocol (the custom output is unchanged).
_CUSTOM_COLUMNS = ("output", "params", "error", "attempts", "latency_s")
_COMPLETIONS_COLUMNS = ("output", "params", "finish_reason", "error", "attempts", "latency_s")
_CHAT_COLUMNS = (*_COMPLETIONS_COLUMNS, "prompt_tokens", "completion_tokens")
COLUMNS = {"custom": _CUSTOM_COLUMNS, "openai-completions": _COMPLETIONS_COLUMNS, "openai-chat": _CHAT_COLUMNS}


def codec_for(spec: JobSpec) -> Codec:
    """The codec that builds this job's requests and matches their answers."""
    if spec.protocol == "openai-completions":
        from .completions import CompletionsCodec

        return CompletionsCodec(spec.model_name, spec.params)
    if spec.protocol == "openai-chat":
        from .chat import ChatCodec

        return ChatCodec(spec.model_name, spec.params, spec.system, spec.messages_column is not None)
    return CustomCodec(spec.model_name, spec.params, spec.echo_match)


def builtin_path(spec: JobSpec) -> str:
    """The path the reference endpoint serves this protocol's base URL at."""
    return "/inference" if spec.protocol == "custom" else "/v1"


def request_url(spec: JobSpec, base: str) -> str:
    """Where requests are POSTed: the custom URL as given; ``{api_base}/completions`` or
    ``{api_base}/chat/completions`` for OpenAI protocols."""
    if spec.protocol == "openai-completions":
        return base.rstrip("/") + "/completions"
    if spec.protocol == "openai-chat":
        return base.rstrip("/") + "/chat/completions"
    return base


def result_columns(spec: JobSpec) -> tuple[str, ...]:
    """The columns this job's output adds to every input row, in order."""
    return COLUMNS[spec.protocol]
