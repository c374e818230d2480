"""The reference endpoint's deterministic toy model: words drawn from a hash of model, prompt and params."""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

DEFAULT_PARAMS: dict[str, Any] = {"max_tokens": 16, "temperature": 1.0, "top_p": 1.0, "top_k": 40}
# A toy answer is a few bytes a token; the cap keeps one request from asking for gigabytes.
MAX_TOKENS_LIMIT = 4096

_WORDS = tuple(
    "amber anchor apple arrow autumn basil beacon birch bramble bridge canyon cedar cinder clover "
    "comet copper coral crystal dawn delta dune ember falcon fern fjord flint forest garnet glacier "
    "harbor hazel heron island ivory jasper juniper kestrel lagoon lantern lilac maple meadow mesa "
    "nectar nimbus oak onyx orchid pebble pine prism quartz raven reef river saffron sage summit "
    "thistle tundra willow".split()
)


def effective_params(params: dict[str, Any]) -> dict[str, Any]:
    """The sampling params the toy model uses: JSON ``null`` or absent means the default.

    LiteLLM sends every parameter the caller did not set as ``null``, so null is not an error.
    Keys other than the four sampling ones (``prompt`` included) are ignored.
    """
    out = dict(DEFAULT_PARAMS)
    for key in DEFAULT_PARAMS:
        if params.get(key) is not None:
            out[key] = params[key]
    for key in ("max_tokens", "top_k"):
        # bool is an int subclass; `true` tokens is a client bug, not a 1.
        if isinstance(out[key], bool) or not isinstance(out[key], int):
            raise ValueError(f"params.{key} must be an integer (got {out[key]!r})")
    for key in ("temperature", "top_p"):
        value = out[key]
        # Python's json accepts NaN and Infinity, so finiteness is checked too.
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ValueError(f"params.{key} must be a finite number (got {value!r})")
        out[key] = float(value)  # 1 and 1.0 must seed the toy model alike
    if not 1 <= out["max_tokens"] <= MAX_TOKENS_LIMIT:
        raise ValueError(f"params.max_tokens must be between 1 and {MAX_TOKENS_LIMIT} (got {out['max_tokens']})")
    if out["temperature"] < 0:
        raise ValueError(f"params.temperature must be >= 0 (got {out['temperature']})")
    if not 0 < out["top_p"] <= 1:
        raise ValueError(f"params.top_p must be in (0, 1] (got {out['top_p']})")
    if out["top_k"] < 0:
        raise ValueError(f"params.top_k must be >= 0 (got {out['top_k']})")
    return out


def toy_output(model: str, prompt: str, params: dict[str, Any]) -> list[str]:
    """The toy model's answer on the custom route: the prompt, then ``toy_words``.

    A pure function of (model, prompt, effective params), so a test can recompute any row's
    output and prove it belongs to that row.
    """
    return [f"{prompt} {toy_words(model, prompt, params)}"]


def toy_words(model: str, prompt: str, params: dict[str, Any], sample: int = 0) -> str:
    """1..max_tokens words drawn from a hash of everything: the completion alone, as the OpenAI
    routes answer it (real servers do not echo the prompt).

    ``sample`` > 0 is another draw for the same prompt (``n`` > 1); sample 0 is the one answer a
    prompt gets with n = 1.
    """
    eff = effective_params(params)
    # JSON of a list keeps the parts apart ("ab"+"c" vs "a"+"bc"); ASCII escapes make lone
    # surrogates (valid in JSON strings) hashable.
    parts: list[Any] = [model, prompt, eff] if sample == 0 else [model, prompt, eff, sample]
    seed = json.dumps(parts, sort_keys=True, separators=(",", ":")).encode("ascii")
    head = hashlib.blake2b(seed, digest_size=8, person=b"count").digest()
    count = 1 + int.from_bytes(head, "big") % eff["max_tokens"]
    stream = b""
    block = 0
    while len(stream) < count:
        stream += hashlib.blake2b(seed, digest_size=64, salt=block.to_bytes(8, "big")).digest()
        block += 1
    return " ".join(_WORDS[b % len(_WORDS)] for b in stream[:count])


def toy_tokens(text: str) -> int:
    """The toy tokenizer: a token per whitespace-separated word (what ``usage`` counts)."""
    return len(text.split())
