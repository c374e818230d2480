"""A segment being worked on: its prompts, each row's outcome so far, and what earlier runs left."""

from __future__ import annotations

import pyarrow as pa

from . import source
from .client import RowOutcome
from .config import JobSpec
from .prompts import render_prompts
from .protocol import Answer, Usage
from .segments import EMPTY_PROMPT, INVALID_INPUT, RESULT_SCHEMA


class Segment:
    """A segment being worked on: its prompts, the outcome of each row, and batches outstanding."""

    def __init__(self, k: int, start: int, table: pa.Table, spec: JobSpec):
        self.k = k
        self.start = start
        prompts = render_prompts(table, spec)
        self.texts = prompts.text
        self.hashes = prompts.hashes()
        self.ids = source.id_strings(table, spec.id_column) if spec.id_column else None
        n = table.num_rows
        self.outcomes: list[RowOutcome | None] = [None] * n
        self.skipped = 0
        for i, why in enumerate(prompts.reason):
            if why is None:
                continue
            if i in prompts.invalid:
                self.outcomes[i] = RowOutcome(None, f"{INVALID_INPUT}: {why}", 0, None, INVALID_INPUT)
            else:
                self.outcomes[i] = RowOutcome(None, f"{EMPTY_PROMPT}: {why}", 0, None, EMPTY_PROMPT)
                self.skipped += 1
        self.usage = [0, 0]  # tokens its requests were reported to spend (prompt, completion)
        self.outstanding = 0
        self.dirty = False  # results not yet in a partial file
        self.sent_before: set[int] = set()  # rows a crashed run had sent (from the journal)

    def carry_over(self, table: pa.Table) -> None:
        """Reuse earlier successful results whose prompt hash (and id) still match."""
        d = table.to_pydict()
        for row, h, rid, out, params, err, att, lat, fin, ptok, ctok in zip(
            d["row"], d["prompt_hash"], d["id"], d["output"], d["params"], d["error"], d["attempts"], d["latency_s"],
            d["finish_reason"], d["prompt_tokens"], d["completion_tokens"],
        ):
            i = row - self.start
            if err is not None or not 0 <= i < len(self.outcomes) or self.hashes[i] != h:
                continue
            if self.ids is not None and self.ids[i] != rid:
                continue
            if self.outcomes[i] is None:
                self.outcomes[i] = RowOutcome(Answer(out, params, fin, ptok, ctok), None, att, lat)

    def add_usage(self, usage: Usage) -> None:
        self.usage[0] += usage.prompt_tokens
        self.usage[1] += usage.completion_tokens

    def pending(self) -> list[int]:
        return [i for i, o in enumerate(self.outcomes) if o is None]

    def to_table(self) -> pa.Table:
        """The resolved rows' results (all of them once the segment is complete)."""
        idx = [i for i, o in enumerate(self.outcomes) if o is not None]
        outs = [o for o in self.outcomes if o is not None]
        return pa.table(
            {
                "row": [self.start + i for i in idx],
                "prompt_hash": self.hashes[idx] if idx else pa.array([], pa.int64()),
                "id": [self.ids[i] for i in idx] if self.ids is not None else [None] * len(idx),
                "output": [o.answer.output if o.answer else None for o in outs],
                "params": [o.answer.params_json if o.answer else None for o in outs],
                "error": [o.error for o in outs],
                "attempts": [o.attempts for o in outs],
                "latency_s": [o.latency_s for o in outs],
                "finish_reason": [o.answer.finish_reason if o.answer else None for o in outs],
                "prompt_tokens": [o.answer.prompt_tokens if o.answer else None for o in outs],
                "completion_tokens": [o.answer.completion_tokens if o.answer else None for o in outs],
            },
            schema=RESULT_SCHEMA,
        )
