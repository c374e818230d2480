"""Each row's prompt, as it is sent and hashed: from its column, its template or (for chat) its
messages; null and empty prompts are not sent, malformed messages fail their row."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

if TYPE_CHECKING:
    from .config import JobSpec


@dataclass(frozen=True)
class Prompts:
    """The prompts of a run of rows: ``text[i]`` is None where ``reason[i]`` says why it is not
    sent: an empty prompt (skipped), or, for rows in ``invalid``, a value that cannot be sent."""

    text: list[str | None]
    reason: list[str | None]
    invalid: frozenset[int] = frozenset()

    def hashes(self) -> np.ndarray:
        return prompt_hashes(self.text)


def render_prompts(table: pa.Table, spec: JobSpec) -> Prompts:
    """Build each row's prompt from its column or template; null and empty prompts are not sent."""
    if spec.messages_column is not None:
        return _render_messages(table.column(spec.messages_column).to_pylist(), spec.messages_column)
    if spec.prompt_column is not None:
        values = table.column(spec.prompt_column).to_pylist()
        texts: list[str | None] = []
        reasons: list[str | None] = []
        for v in values:
            if v is None:
                texts.append(None)
                reasons.append(f"{spec.prompt_column} is null; not sent")
            elif not isinstance(v, str):
                texts.append(str(v))
                reasons.append(None)
            elif v.strip() == "":
                texts.append(None)
                reasons.append(f"{spec.prompt_column} is empty; not sent")
            else:
                texts.append(v)
                reasons.append(None)
        return Prompts(texts, reasons)

    assert spec.template is not None
    cols = {f: table.column(f).to_pylist() for f in spec.template_fields}
    texts, reasons = [], []
    for i in range(table.num_rows):
        row = {f: cols[f][i] for f in spec.template_fields}
        nulls = [f for f, v in row.items() if v is None]
        if nulls:
            texts.append(None)
            reasons.append(f"template column {nulls[0]!r} is null; not sent")
            continue
        text = spec.template.format_map(row)
        if text.strip() == "":
            texts.append(None)
            reasons.append("the template rendered to nothing; not sent")
        else:
            texts.append(text)
            reasons.append(None)
    return Prompts(texts, reasons)


def _render_messages(values: list[object], column: str) -> Prompts:
    """Each row's conversation as the canonical JSON text the chat codec sends (and the prompt
    hash covers); a null or empty one is not sent, a malformed one fails its row."""
    from .chat import read_messages

    texts: list[str | None] = []
    reasons: list[str | None] = []
    invalid = set()
    for i, v in enumerate(values):
        if v is None or v == [] or (isinstance(v, str) and not v.strip()):
            texts.append(None)
            reasons.append(f"{column} is {'null' if v is None else 'empty'}; not sent")
            continue
        try:
            texts.append(read_messages(v))
            reasons.append(None)
        except ValueError as exc:
            texts.append(None)
            reasons.append(f"{column}: {exc}; not sent")
            invalid.add(i)
    return Prompts(texts, reasons, frozenset(invalid))


def prompt_hash(text: str | None) -> int:
    """A stable 63-bit digest of a prompt, stored beside each result to prove which row it is for."""
    if text is None:
        return 0
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def prompt_hashes(texts: Sequence[str | None]) -> np.ndarray:
    return np.fromiter((prompt_hash(t) for t in texts), dtype=np.int64, count=len(texts))
