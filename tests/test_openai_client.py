"""The client with the OpenAI codecs against the reference endpoint's OpenAI routes and their faults."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest

from batchrun.chat import ChatCodec, read_messages
from batchrun.client import REJECTED, EndpointClient, RowOutcome
from batchrun.completions import CompletionsCodec
from batchrun.errors import AuthError
from batchrun.protocol import Codec
from batchrun.retry import RetryPolicy
from batchrun.server import ServerOptions, toy_words
from tests.endpoint import LiveEndpoint, Rule

MODEL = "tiny"
PARAMS = {"max_tokens": 8, "temperature": 0}
POLICY = RetryPolicy(max_retries=4, base_s=0.0, cap_s=0.0)


def send(url: str, codec: Codec, prompts: list[str], api_key: str | None = None) -> tuple[list[RowOutcome | None], Any]:
    async def main() -> tuple[list[RowOutcome | None], Any]:
        async with aiohttp.ClientSession() as session:
            client = EndpointClient(session, url, codec, POLICY, api_key=api_key)
            return await client.process(prompts), client.accounting

    return asyncio.run(main())


def first_request(kind: str) -> Rule:
    return lambda n, prompts: kind if n == 1 else None


PROMPTS = [f"row {i} text" for i in range(6)]


@pytest.mark.parametrize(
    "kind",
    ["reorder", "drop", "extra", "alter", "output_string", "output_numbers", "output_empty", "every_output_numbers",
     "echo_none", "index_bool", "index_dup", "not_ok", "wrong_shape", "top_list", "invalid_json", "empty_body",
     "html200", "500", "429ra", "503", "cut", "reset"],
)
def test_every_row_gets_its_own_completion_whatever_the_first_answer_did(kind: str) -> None:
    """Bad choices are resent, good ones kept, and no text ever lands on another row."""
    with LiveEndpoint(ServerOptions(), rule=first_request(kind), retry_after="0") as ep:
        outcomes, accounting = send(ep.openai_base + "/completions", CompletionsCodec(MODEL, {**PARAMS, "n": 2}), PROMPTS)
    for prompt, outcome in zip(PROMPTS, outcomes):
        assert outcome is not None and outcome.error is None, (kind, outcome)
        assert outcome.answer is not None
        assert outcome.answer.output == [toy_words(MODEL, prompt, PARAMS, s) for s in range(2)]
        assert len(outcome.answer.finish_reason or []) == 2
    assert ep.log.faults == {kind: 1}
    assert accounting.completion_tokens > 0 and accounting.prompt_tokens >= 3 * len(PROMPTS)


def test_a_400_for_one_prompt_is_bisected_to_it_and_its_reason_read_from_the_openai_body() -> None:
    long = "w " * 40
    prompts = PROMPTS[:3] + [long] + PROMPTS[3:]
    with LiveEndpoint(ServerOptions(max_prompt_tokens=32)) as ep:
        outcomes, _ = send(ep.openai_base + "/completions", CompletionsCodec(MODEL, PARAMS), prompts)
    poisoned = outcomes[3]
    assert poisoned is not None and poisoned.error_class == REJECTED and poisoned.answer is None
    assert poisoned.error == (
        "rejected: HTTP 400: This model's maximum context length is 32 tokens. However, you requested 40 tokens in "
        "the prompt. Please reduce the length of the prompt. (BadRequestError, 400)"
    )
    for prompt, outcome in zip(prompts, outcomes):
        if prompt != long:
            assert outcome is not None and outcome.answer is not None
            assert outcome.answer.output == [toy_words(MODEL, prompt, PARAMS)]


def test_a_401_stops_with_the_reason_from_the_openai_body_and_no_key_in_it() -> None:
    with LiveEndpoint(ServerOptions(), rule=first_request("401echo")) as ep:
        with pytest.raises(AuthError) as info:
            send(ep.openai_base + "/completions", CompletionsCodec(MODEL, PARAMS), ["a"], api_key="sk-secret-123")
    assert str(info.value) == (
        "the endpoint refused the credentials (HTTP 401): check the API key "
        "(invalid credentials: Bearer [redacted] (AuthenticationError, 401))"
    )


def test_chat_rows_get_their_own_answers_tokens_and_finish_reasons_through_faults() -> None:
    codec = ChatCodec(MODEL, PARAMS, system="Be brief.")
    rule: Rule = lambda n, prompts: {1: "500", 2: "output_empty", 3: "not_ok"}.get(n)  # noqa: E731
    with LiveEndpoint(ServerOptions(tally_prompts=True), rule=rule) as ep:
        outcomes = []
        for prompt in PROMPTS[:3]:
            (outcome,), _ = send(ep.openai_base + "/chat/completions", codec, [prompt])
            outcomes.append(outcome)
    for prompt, outcome in zip(PROMPTS, outcomes):
        conversation = read_messages([{"role": "system", "content": "Be brief."}, {"role": "user", "content": prompt}])
        text = toy_words(MODEL, conversation, PARAMS)
        assert outcome is not None and outcome.answer is not None and outcome.answer.output == [text]
        assert outcome.answer.prompt_tokens == 5 and outcome.answer.completion_tokens == len(text.split())
        assert outcome.answer.finish_reason in (["stop"], ["length"])
    assert ep.log.faults == {"500": 1, "output_empty": 1, "not_ok": 1}
    assert outcomes[0].attempts == 4 and outcomes[1].attempts == 1
