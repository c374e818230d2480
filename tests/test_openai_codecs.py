"""The OpenAI codecs as pure functions: requests built, answers checked and matched by index."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from batchrun.chat import ChatCodec, messages_of, read_messages
from batchrun.completions import CompletionsCodec
from batchrun.openai_common import error_reason
from batchrun.protocol import Answer, CustomCodec, ResponseError, Usage

MODEL = "meta-llama/Llama-3.1-8B-Instruct"


def text_of(prompt: str, sample: int = 0) -> str:
    """The text a well-behaved server gives ``prompt`` in these tests: it names its prompt."""
    return f"answer {sample} to {prompt}"


def completion(prompts: list[str], n: int = 1, usage: Any = None) -> dict[str, Any]:
    choices = [
        {"index": p * n + s, "text": text_of(prompt, s), "logprobs": None, "finish_reason": "stop"}
        for p, prompt in enumerate(prompts)
        for s in range(n)
    ]
    doc: dict[str, Any] = {"id": "cmpl-1", "object": "text_completion", "model": MODEL, "choices": choices}
    doc["usage"] = usage if usage is not None else {"prompt_tokens": 7, "completion_tokens": 11, "total_tokens": 18}
    return doc


def raw(doc: Any) -> bytes:
    return json.dumps(doc).encode()


def outputs(matched: Any) -> dict[int, list[str]]:
    return {i: a.output for i, a in matched.answers.items()}


# --- CompletionsCodec: the request -------------------------------------------------------------


def test_completions_request_is_model_prompt_list_and_every_param_as_given() -> None:
    params = {"max_tokens": 64, "temperature": 0, "stop": ["\n\n"], "seed": 7, "top_k": 5, "response_format": {"type": "json_object"}}
    codec = CompletionsCodec(MODEL, params)
    body = codec.build_request(["héllo 世界", 'say "hi"\n'])
    assert json.loads(body) == {"model": MODEL, "prompt": ["héllo 世界", 'say "hi"\n'], **params}
    assert "世界".encode() in body  # UTF-8, not \u escapes
    assert list(json.loads(body))[:2] == ["model", "prompt"]


def test_completions_request_with_no_params_and_one_prompt_is_still_a_list() -> None:
    assert json.loads(CompletionsCodec("m", {}).build_request(("only",))) == {"model": "m", "prompt": ["only"]}


@pytest.mark.parametrize(
    ("params", "reason"),
    [
        ({"prompt": "x"}, "params may not set prompt"),
        ({"model": "x", "stream": True}, "params may not set model, stream"),
        ({"messages": []}, "params may not set messages"),
        ({"n": 0}, "params.n must be a positive integer (got 0)"),
        ({"n": True}, "params.n must be a positive integer (got True)"),
        ({"n": 2.0}, "params.n must be a positive integer (got 2.0)"),
    ],
)
def test_codecs_refuse_params_that_would_replace_the_request_or_a_bad_n(params: dict[str, Any], reason: str) -> None:
    with pytest.raises(ValueError, match=reason.replace("(", r"\(").replace(")", r"\)")):
        CompletionsCodec("m", params)
    with pytest.raises(ValueError):
        ChatCodec("m", params)


def test_n_null_means_one_sample() -> None:
    assert CompletionsCodec("m", {"n": None}).n == 1 and ChatCodec("m", {"n": 3}).n == 3


# --- CompletionsCodec: matching ----------------------------------------------------------------


def test_a_correct_answer_gives_every_prompt_its_text_finish_reason_params_and_request_usage() -> None:
    sent = ["a", "b", "c"]
    codec = CompletionsCodec(MODEL, {"max_tokens": 8, "temperature": 0})
    m = codec.match(raw(completion(sent)), sent)
    assert m.problem is None
    params = '{"max_tokens":8,"temperature":0}'
    assert m.answers == {i: Answer([text_of(p)], params, ["stop"]) for i, p in enumerate(sent)}
    assert m.usage == Usage(7, 11)
    assert all(a.prompt_tokens is None for a in m.answers.values())  # usage is per request here


def test_reordered_choices_land_on_their_own_prompts_by_index() -> None:
    sent = ["a", "b", "c", "d"]
    doc = completion(sent)
    doc["choices"].reverse()
    m = CompletionsCodec("m", {}).match(raw(doc), sent)
    assert m.problem is None and outputs(m) == {i: [text_of(p)] for i, p in enumerate(sent)}


def test_n_samples_are_prompt_major_and_kept_in_sample_order() -> None:
    sent = ["a", "b"]
    doc = completion(sent, n=2)
    doc["choices"] = [doc["choices"][i] for i in (3, 0, 2, 1)]
    doc["choices"][0]["finish_reason"] = "length"  # index 3: prompt 1, sample 1
    m = CompletionsCodec("m", {"n": 2}).match(raw(doc), sent)
    assert m.problem is None
    assert outputs(m) == {0: [text_of("a", 0), text_of("a", 1)], 1: [text_of("b", 0), text_of("b", 1)]}
    assert m.answers[1].finish_reason == ["stop", "length"]


def test_a_prompt_with_one_bad_sample_gets_no_answer_and_its_neighbour_keeps_its_own() -> None:
    sent = ["a", "b"]
    doc = completion(sent, n=2)
    doc["choices"][1]["text"] = None  # prompt 0, sample 1
    m = CompletionsCodec("m", {"n": 2}).match(raw(doc), sent)
    assert outputs(m) == {1: [text_of("b", 0), text_of("b", 1)]}
    assert m.problem == "invalid response: choice 1: text is not a string (got NoneType)"


def bad_index(doc: dict[str, Any], value: Any) -> dict[str, Any]:
    doc["choices"][1]["index"] = value
    return doc


@pytest.mark.parametrize(
    ("spoil", "answered", "problem"),
    [
        # Index 0 claimed twice: neither choice can be trusted; prompt 1 has none.
        (lambda d: bad_index(d, 0), {2}, "index 0 claimed by more than one choice (none used); index 1 without a choice"),
        (lambda d: bad_index(d, 3), {0, 2}, "choice 1: index out of range 0..2 (got 3)"),
        (lambda d: bad_index(d, -1), {0, 2}, "choice 1: index out of range 0..2 (got -1)"),
        (lambda d: bad_index(d, True), {0, 2}, "choice 1: index is not an integer (got true)"),
        (lambda d: bad_index(d, 1.0), {0, 2}, "choice 1: index is not an integer (got 1.0)"),
        (lambda d: bad_index(d, "1"), {0, 2}, "choice 1: index is not an integer (got '1')"),
        (lambda d: bad_index(d, None), {0, 2}, "choice 1: index is not an integer (got null)"),
        (lambda d: d["choices"][1].pop("index") and d, {0, 2}, "index is not an integer"),
        (lambda d: d["choices"][1].update(text=["x"]) or d, {0, 2}, "choice 1: text is not a string (got list)"),
        (lambda d: d["choices"][1].update(text=5) or d, {0, 2}, "choice 1: text is not a string (got int)"),
        (lambda d: d["choices"].pop() and d, {0, 1}, "2 choices for 3 prompts"),
        (lambda d: d["choices"].append(dict(d["choices"][0])) or d, {1, 2}, "4 choices for 3 prompts"),
        (lambda d: d["choices"].__setitem__(1, "b") or d, {0, 2}, "choice 1: not an object (got str)"),
        (lambda d: d.update(choices=[]) or d, set(), "0 choices for 3 prompts"),
    ],
)
def test_bad_choices_are_problems_never_an_output_on_a_wrong_row(spoil: Any, answered: set[int], problem: str) -> None:
    sent = ["a", "b", "c"]
    m = CompletionsCodec("m", {}).match(raw(spoil(completion(sent))), sent)
    assert set(m.answers) == answered
    for i, a in m.answers.items():
        assert a.output == [text_of(sent[i])]
    assert m.problem is not None and problem in m.problem, m.problem


@given(order=st.permutations(range(6)), drop=st.sets(st.integers(0, 5)), dup=st.lists(st.integers(0, 5), max_size=3))
def test_whatever_the_order_losses_and_duplicates_no_text_lands_on_another_prompt(
    order: list[int], drop: set[int], dup: list[int]
) -> None:
    sent = ["p0", "p1", "p2"]
    base = completion(sent, n=2)["choices"]
    choices = [base[i] for i in order if i not in drop] + [base[i] for i in dup]
    m = CompletionsCodec("m", {"n": 2}).match(raw({"choices": choices}), sent)
    for p, a in m.answers.items():
        assert a.output == [text_of(sent[p], 0), text_of(sent[p], 1)]
    assert (m.problem is None) == (len(m.answers) == 3)


def test_odd_finish_reasons_and_usage_are_kept_as_unknown_not_refused() -> None:
    sent = ["a"]
    doc = completion(sent, usage={"prompt_tokens": "7"})
    doc["choices"][0]["finish_reason"] = None
    m = CompletionsCodec("m", {}).match(raw(doc), sent)
    assert m.problem is None and m.answers[0].finish_reason == [None] and m.usage is None
    del doc["usage"]
    assert CompletionsCodec("m", {}).match(raw(doc), sent).usage is None


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"", "response is not JSON"),
        (b"<html>Bad gateway</html>", "response is HTML, not JSON"),
        (b"[]", "response is not a JSON object (got list)"),
        (b'{"choices": {"0": {}}}', "response choices is not a list (got dict)"),
        (b'{"object": "text_completion"}', "response choices is not a list (got NoneType)"),
        (b'{"error": {"message": "overloaded", "type": "ServiceUnavailable", "code": 503}}',
         "response is an error, not choices: overloaded (ServiceUnavailable, 503)"),
    ],
)
def test_an_unusable_body_raises_response_error(body: bytes, reason: str) -> None:
    for codec in (CompletionsCodec("m", {}), ChatCodec("m", {})):
        with pytest.raises(ResponseError) as info:
            codec.match(body, ["a"])
        assert str(info.value).startswith(reason)


# --- error bodies ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b'{"error": {"message": "This model\'s maximum context length is 512 tokens.", "type": "BadRequestError", "code": 400}}',
         "This model's maximum context length is 512 tokens. (BadRequestError, 400)"),
        (b'{"error": {"message": "Incorrect API key provided", "type": "invalid_request_error", "param": null, "code": "invalid_api_key"}}',
         "Incorrect API key provided (invalid_request_error, invalid_api_key)"),
        (b'{"error": {"message": "no type"}}', "no type"),
        (b'{"object": "error", "message": "old vLLM", "type": "BadRequestError", "param": null, "code": 400}',
         "old vLLM (BadRequestError, 400)"),
        (b'{"error": "Input validation error: too long", "error_type": "validation"}', "Input validation error: too long"),
        (b'{"message": "custom", "data": []}', None),
        (b'{"error": {"code": 400}}', None),
        (b"Internal Server Error", None),
        (b"[1]", None),
    ],
)
def test_error_reason_reads_openai_style_bodies_and_nothing_else(body: bytes, reason: str | None) -> None:
    assert error_reason(body) == reason
    assert CompletionsCodec("m", {}).error_reason(body) == reason == ChatCodec("m", {}).error_reason(body)


def test_the_custom_codec_reads_no_error_body_so_its_messages_are_unchanged() -> None:
    assert CustomCodec("m", {}).error_reason(b'{"error": {"message": "x"}}') is None


# --- ChatCodec -------------------------------------------------------------------------------


def chat_answer(contents: list[str], usage: Any = None) -> dict[str, Any]:
    return {
        "object": "chat.completion",
        "choices": [
            {"index": i, "message": {"role": "assistant", "content": c}, "finish_reason": "stop"}
            for i, c in enumerate(contents)
        ],
        "usage": usage or {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17},
    }


def test_chat_request_is_the_system_then_the_user_message_and_params() -> None:
    codec = ChatCodec(MODEL, {"max_tokens": 16, "seed": 7}, system="You are terse.")
    assert json.loads(codec.build_request(["Capital of France?"])) == {
        "model": MODEL,
        "messages": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Capital of France?"}],
        "max_tokens": 16,
        "seed": 7,
    }
    assert json.loads(ChatCodec("m", {}).build_request(["hi"])) == {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def test_chat_request_from_a_messages_column_sends_them_as_given() -> None:
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
                {"role": "assistant", "content": "a"}, {"role": "user", "content": "q2 é"}]
    codec = ChatCodec("m", {"temperature": 0}, messages_column=True)
    body = codec.build_request([read_messages(messages)])
    assert json.loads(body) == {"model": "m", "messages": messages, "temperature": 0}


def test_chat_carries_one_conversation_and_refuses_a_system_beside_a_messages_column() -> None:
    with pytest.raises(ValueError, match="one conversation"):
        ChatCodec("m", {}).build_request(["a", "b"])
    with pytest.raises(ValueError, match="messages column"):
        ChatCodec("m", {}, system="s", messages_column=True)


def test_chat_answer_gives_contents_in_index_order_finish_reasons_and_the_rows_usage() -> None:
    doc = chat_answer(["one", "two"])
    doc["choices"].reverse()
    doc["choices"][0]["finish_reason"] = "length"
    m = ChatCodec("m", {"n": 2}).match(raw(doc), ["q"])
    assert m.problem is None
    assert m.answers == {0: Answer(["one", "two"], '{"n":2}', ["stop", "length"], 12, 5)}
    assert m.usage == Usage(12, 5)


@pytest.mark.parametrize(
    ("choice", "problem"),
    [
        ({"index": 0, "message": {"role": "assistant", "content": None, "tool_calls": []}},
         "choice 0: message.content is not a string (got null)"),
        ({"index": 0, "message": "hi"}, "choice 0: message is not an object (got str)"),
        ({"index": 0, "text": "hi"}, "choice 0: message is not an object (got null)"),
        ({"index": 1, "message": {"content": "hi"}}, "index 0 without a choice; choice 0: index out of range 0..0 (got 1)"),
    ],
)
def test_a_chat_choice_without_text_content_answers_nothing(choice: dict[str, Any], problem: str) -> None:
    m = ChatCodec("m", {}).match(raw({"choices": [choice]}), ["q"])
    assert m.answers == {} and m.problem == "invalid response: " + problem


# --- messages column values --------------------------------------------------------------------


def test_read_messages_makes_one_canonical_text_from_a_list_or_json_text() -> None:
    listed = [{"content": "hé", "role": "user", "name": None}]
    text = read_messages(listed)
    assert text == '[{"role":"user","content":"hé"}]'
    assert read_messages(' [ {"role": "user", "content": "hé"} ] ') == text
    assert messages_of(text) == [{"role": "user", "content": "hé"}]


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (None, "messages must be a list of {role, content} (got null)"),
        ("not json", "messages are not JSON"),
        ('{"role": "user"}', "messages must be a list of {role, content} (got dict)"),
        ([], "messages must not be empty"),
        (["hi"], "messages[0] must be an object with role and content (got str)"),
        ([{"role": "robot", "content": "x"}], "messages[0].role must be one of system, user, assistant, tool (got 'robot')"),
        ([{"content": "x"}], "messages[0].role must be one of"),
        ([{"role": "user", "content": None}], "messages[0].content must be a string (got null)"),
        ([{"role": "user", "content": [{"type": "text", "text": "x"}]}], "messages[0].content must be a string (got list)"),
        ([{"role": "user", "content": "x"}, {"role": "user", "content": 3}], "messages[1].content must be a string (got int)"),
        ([{"role": "user", "content": "x", "name": "bob"}], "messages[0] has keys other than role and content: name"),
    ],
)
def test_read_messages_refuses_what_a_chat_server_could_not_take_saying_why(value: Any, reason: str) -> None:
    with pytest.raises(ValueError) as info:
        read_messages(value)
    assert str(info.value).startswith(reason)
