"""The wire format as pure functions: the request body, and checking and matching a response."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batchrun.protocol import Answer, ResponseError, build_request, match_response

PARAMS = {"max_tokens": 32, "temperature": 0.7, "top_p": 1.0, "top_k": 40}
ECHO = {"temperature": 0.7, "top_k": 40, "top_p": 1}


def answer_of(prompt: str) -> list[str]:
    """The output a well-behaved endpoint gives ``prompt`` in these tests: it names its prompt."""
    return [f"answer to {prompt}"]


def item(prompt: str, output: Any = None, params: Any = ECHO) -> dict[str, Any]:
    return {"prompt": prompt, "output": answer_of(prompt) if output is None else output, "params": params}


def body(data: Any, message: Any = "ok") -> bytes:
    return json.dumps({"data": data, "message": message}).encode()


def good(prompts: list[str]) -> list[dict[str, Any]]:
    return [item(p) for p in prompts]


# --- build_request ---------------------------------------------------------------------------


def test_build_request_has_exactly_model_and_params_with_the_prompt_list() -> None:
    raw = build_request("meta-llama/Llama-2-13b-hf", ["The capital of France is P", "Italy: R"], PARAMS)
    assert json.loads(raw) == {
        "model": "meta-llama/Llama-2-13b-hf",
        "params": {
            "prompt": ["The capital of France is P", "Italy: R"],
            "max_tokens": 32,
            "temperature": 0.7,
            "top_p": 1.0,
            "top_k": 40,
        },
    }


def test_build_request_sends_a_list_even_for_one_prompt_or_a_tuple() -> None:
    assert json.loads(build_request("m", ("only",), {}))["params"] == {"prompt": ["only"]}


def test_build_request_is_utf8_json_keeping_unicode_newlines_and_quotes() -> None:
    prompts = ['say "hi"\nthen\tstop', "héllo 世界 🎉", "back\\slash"]
    raw = build_request("m", prompts, {})
    assert isinstance(raw, bytes)
    assert json.loads(raw.decode("utf-8"))["params"]["prompt"] == prompts
    assert "世界".encode() in raw  # sent as UTF-8, not \u escapes


def test_build_request_does_not_mutate_the_params_it_is_given() -> None:
    params = dict(PARAMS)
    build_request("m", ["a"], params)
    assert params == PARAMS


# --- match_response: what is matched -------------------------------------------------------------


def test_a_correct_response_in_order_answers_every_prompt_with_its_own_output() -> None:
    sent = ["a", "b", "c"]
    m = match_response(body(good(sent)), sent)
    assert m.problem is None
    assert m.answers == {
        i: Answer(answer_of(p), json.dumps(ECHO, sort_keys=True, separators=(",", ":")))
        for i, p in enumerate(sent)
    }


def test_a_reordered_response_is_matched_by_the_echoed_prompt_not_by_position() -> None:
    sent = ["a", "b", "c", "d"]
    m = match_response(body(good(list(reversed(sent)))), sent)
    assert m.problem is None
    assert {i: a.output for i, a in m.answers.items()} == {i: answer_of(p) for i, p in enumerate(sent)}


def test_duplicate_prompts_in_one_batch_each_get_an_answer_of_that_prompt() -> None:
    sent = ["x", "y", "x", "x"]
    data = [item("x", ["x one"]), item("y"), item("x", ["x two"]), item("x", ["x three"])]
    m = match_response(body(data), sent)
    assert m.problem is None
    assert sorted(m.answers) == [0, 1, 2, 3]
    assert m.answers[1].output == answer_of("y")
    assert sorted(m.answers[i].output[0] for i in (0, 2, 3)) == ["x one", "x three", "x two"]


def test_too_few_items_keep_the_matched_ones_and_report_the_rest() -> None:
    sent = ["a", "b", "c"]
    m = match_response(body(good(["c", "a"])), sent)
    assert {i: a.output for i, a in m.answers.items()} == {0: answer_of("a"), 2: answer_of("c")}
    assert m.problem is not None and "2 items for 3 prompts" in m.problem


def test_an_empty_data_list_answers_nothing_and_says_so() -> None:
    m = match_response(body([]), ["a", "b"])
    assert m.answers == {}
    assert m.problem is not None and "0 items for 2 prompts" in m.problem


def test_more_items_than_sends_of_a_prompt_means_none_of_them_is_trusted() -> None:
    sent = ["a", "b", "a"]
    data = [item("a", ["a1"]), item("b"), item("a", ["a2"]), item("a", ["a3"])]
    m = match_response(body(data), sent)
    assert {i: a.output for i, a in m.answers.items()} == {1: answer_of("b")}
    assert m.problem is not None and "3 items for a prompt sent 2 time(s)" in m.problem


def test_an_item_with_an_altered_echo_is_not_matched_to_any_prompt() -> None:
    sent = ["a", "b", "c"]
    data = good(sent)
    data[1] = item("b (altered)", answer_of("b"))
    m = match_response(body(data), sent)
    assert {i: a.output for i, a in m.answers.items()} == {0: answer_of("a"), 2: answer_of("c")}
    assert m.problem is not None and "matches no prompt sent" in m.problem


def test_a_second_item_echoing_an_answered_prompt_discards_both_of_its_items() -> None:
    # Two items claim "b" (one carrying another prompt's output under b's echo): neither can be
    # trusted, and "a" keeps its own.
    sent = ["a", "b"]
    data = [item("a"), item("b"), item("b", ["a stolen answer"])]
    m = match_response(body(data), sent)
    assert {i: a.output for i, a in m.answers.items()} == {0: answer_of("a")}
    assert m.problem is not None


@pytest.mark.parametrize(
    "bad_output",
    [pytest.param("a string", id="string"), pytest.param(["ok", 3], id="list-with-number"),
     pytest.param(None, id="null"), pytest.param({"text": "x"}, id="object")],
)
def test_an_item_whose_output_is_not_a_list_of_strings_is_not_matched(bad_output: Any) -> None:
    sent = ["a", "b"]
    data = good(sent)
    data[0] = {"prompt": "a", "output": bad_output, "params": ECHO}
    m = match_response(body(data), sent)
    assert {i: a.output for i, a in m.answers.items()} == {1: answer_of("b")}
    assert m.problem is not None and "output is not a list of strings" in m.problem


@pytest.mark.parametrize(
    "bad_item",
    [pytest.param("just text", id="not-an-object"), pytest.param({"output": ["x"]}, id="no-echo"),
     pytest.param({"prompt": 7, "output": ["x"]}, id="echo-not-a-string"),
     pytest.param({"prompt": "a", "output": ["x"], "params": [1]}, id="params-not-an-object")],
)
def test_a_malformed_item_is_not_matched_and_its_neighbours_are(bad_item: Any) -> None:
    sent = ["a", "b"]
    m = match_response(body([bad_item, item("b")]), sent)
    assert {i: a.output for i, a in m.answers.items()} == {1: answer_of("b")}
    assert m.problem is not None


def test_missing_params_are_kept_as_none() -> None:
    m = match_response(body([{"prompt": "a", "output": ["x"]}]), ["a"])
    assert m.problem is None
    assert m.answers == {0: Answer(["x"], None)}


def test_echoed_params_are_encoded_per_item_with_their_own_json_types() -> None:
    """Params that compare equal in Python (1, 1.0, true) but differ in JSON keep their own text."""
    sent = ["a", "b", "c", "d", "e"]
    echoed = [{"t": 1}, {"t": 1.0}, {"t": True}, {"t": 1.0}, {"t": [1]}]
    body = json.dumps(
        {"message": "ok", "data": [{"prompt": p, "output": [p], "params": e} for p, e in zip(sent, echoed)]}
    ).encode()
    got = match_response(body, sent)
    assert [got.answers[i].params_json for i in range(5)] == ['{"t":1}', '{"t":1.0}', '{"t":true}', '{"t":1.0}', '{"t":[1]}']


@pytest.mark.parametrize("in_order", [True, False], ids=["in-order-path", "matching-path"])
def test_an_empty_output_list_is_an_invalid_item_not_a_success(in_order: bool) -> None:
    """``output: []`` gives the row no text at all: the endpoint failed to answer that prompt. It
    is refused on the one-pass in-order path and on the general path (a reordered answer)."""
    sent = ["a", "b", "c"]
    data = good(sent)
    data[1] = item("b", [])
    if not in_order:
        data.reverse()
    m = match_response(body(data), sent)
    assert {i: a.output for i, a in m.answers.items()} == {0: answer_of("a"), 2: answer_of("c")}
    assert m.problem == "invalid response: item 1: output is an empty list"


def test_an_answer_whose_every_item_fails_the_same_way_says_it_once_with_the_count() -> None:
    sent = [f"p{i}" for i in range(16)]
    m = match_response(body([item(p + " (altered)") for p in sent]), sent)
    assert m.answers == {}
    assert m.problem == "invalid response: 16 items: echoed prompt matches no prompt sent (first: item 0, 'p0 (altered)')"


# --- match_response: what is refused as a whole ------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        pytest.param(b'{"data": [ this is not json', "not JSON", id="invalid-json"),
        pytest.param(b"\xff\xfe garbage", "not JSON", id="not-utf8"),
        pytest.param(b"", "not JSON", id="empty-body"),
        pytest.param(b"\n<!DOCTYPE html><html><body>502 Bad Gateway</body></html>", "response is HTML, not JSON",
                     id="html"),
        pytest.param(b'[{"prompt": "a", "output": ["x"]}]', "not a JSON object", id="top-level-list"),
        pytest.param(body(good(["a"]), message="error: model overloaded"), 'message is not "ok"', id="not-ok"),
        pytest.param(json.dumps({"data": good(["a"])}).encode(), 'message is not "ok"', id="no-message"),
        pytest.param(body({"prompt": "a", "output": ["x"]}), "data is not a list", id="data-object"),
        pytest.param(json.dumps({"message": "ok"}).encode(), "data is not a list", id="no-data"),
        pytest.param(body("a"), "data is not a list", id="data-string"),
    ],
)
def test_an_unusable_response_raises_response_error(raw: bytes, says: str) -> None:
    with pytest.raises(ResponseError, match=says):
        match_response(raw, ["a"])


# --- echo_match: what a mode accepts, and what it still checks -----------------------------------

SENT_WITH_WHITESPACE = ["  first prompt\r\nsecond line\r\n", "plain", "tab\t\n"]
ECHOED_TRIMMED = ["first prompt\nsecond line", "plain", "tab"]


def test_echoes_differing_only_in_whitespace_or_crlf_are_refused_by_exact_and_the_problem_says_why() -> None:
    m = match_response(body([item(e) for e in ECHOED_TRIMMED]), SENT_WITH_WHITESPACE)
    assert sorted(m.answers) == [1]  # "plain" echoes exactly
    assert m.problem is not None
    assert m.problem.startswith(
        "invalid response: echoed prompts differ from those sent only in surrounding whitespace or newlines; "
        'set endpoint.echo_match = "trimmed"; 2 items: echoed prompt matches no prompt sent'
    )


def test_the_whitespace_hint_counts_when_only_some_unmatched_echoes_are_near_misses() -> None:
    sent = ["a ", "b"]
    m = match_response(body([item("a"), item("b (altered)")]), sent)
    assert m.answers == {}
    assert m.problem is not None and m.problem.startswith(
        "invalid response: 1 of 2 unmatched echoed prompts differ from those sent only in surrounding whitespace"
    )


def test_an_altered_echo_gets_no_whitespace_hint() -> None:
    m = match_response(body([item("a!")]), ["a"])
    assert m.problem == "invalid response: item 0: echoed prompt matches no prompt sent ('a!')"


@pytest.mark.parametrize("reverse", [False, True], ids=["in-order", "reordered"])
def test_trimmed_matches_echoes_after_stripping_whitespace_and_normalising_newlines(reverse: bool) -> None:
    data = [item(e, answer_of(s)) for e, s in zip(ECHOED_TRIMMED, SENT_WITH_WHITESPACE)]
    if reverse:
        data.reverse()
    m = match_response(body(data), SENT_WITH_WHITESPACE, "trimmed")
    assert m.problem is None
    assert {i: a.output for i, a in m.answers.items()} == {i: answer_of(s) for i, s in enumerate(SENT_WITH_WHITESPACE)}


def test_trimmed_still_refuses_an_altered_echo_and_an_empty_output() -> None:
    sent = ["a", "b ", "c"]
    data = [item("a!"), item("b", []), item("c\r\n")]
    m = match_response(body(data), sent, "trimmed")
    assert {i: a.output for i, a in m.answers.items()} == {2: answer_of("c\r\n")}
    assert m.problem is not None
    assert "item 0: echoed prompt matches no prompt sent" in m.problem
    assert "item 1: output is an empty list" in m.problem


def test_trimmed_makes_prompts_differing_only_in_whitespace_interchangeable() -> None:
    """The documented cost: "x" and "x " are one prompt to it, so their answers may be swapped."""
    sent = ["x", "x "]
    m = match_response(body([item("x ", ["for x-space"]), item("x", ["for x"])]), sent, "trimmed")
    assert m.problem is None
    assert sorted(a.output[0] for a in m.answers.values()) == ["for x", "for x-space"]


def test_position_places_items_by_index_when_there_is_one_per_prompt_whatever_they_echo() -> None:
    sent = ["a", "b", "c"]
    data = [{"output": ["for a"]}, {"prompt": "garbled", "output": ["for b"]}, {"prompt": None, "output": ["for c"]}]
    m = match_response(body(data), sent, "position")
    assert m.problem is None
    assert {i: a.output for i, a in m.answers.items()} == {0: ["for a"], 1: ["for b"], 2: ["for c"]}


def test_position_places_nothing_when_the_item_count_is_wrong() -> None:
    m = match_response(body([item("a"), item("b")]), ["a", "b", "c"], "position")
    assert m.answers == {}
    assert m.problem == (
        'invalid response: 2 items for 3 prompts; echo_match = "position" places only an answer with one item per prompt sent'
    )


@pytest.mark.parametrize(
    ("bad_item", "says"),
    [
        pytest.param("text", "item 1: not an object (got str)", id="not-an-object"),
        pytest.param({"output": "one string"}, "item 1: output is not a list of strings (got str)", id="output-string"),
        pytest.param({"output": []}, "item 1: output is an empty list", id="output-empty"),
        pytest.param({"output": ["x"], "params": 3}, "item 1: params is not an object (got int)", id="params-not-object"),
    ],
)
def test_position_still_checks_every_item_and_keeps_its_valid_neighbours(bad_item: Any, says: str) -> None:
    m = match_response(body([item("a"), bad_item, item("c")]), ["a", "b", "c"], "position")
    assert {i: a.output for i, a in m.answers.items()} == {0: answer_of("a"), 2: answer_of("c")}
    assert m.problem == f"invalid response: {says}"


def test_position_puts_a_reordered_answer_on_the_wrong_prompts_undetectably() -> None:
    """The documented cost of "position": nothing can tell a reordered answer from a right one."""
    sent = ["a", "b"]
    m = match_response(body(list(reversed(good(sent)))), sent, "position")
    assert m.problem is None
    assert m.answers[0].output == answer_of("b")


def test_whole_response_checks_hold_in_every_mode() -> None:
    for mode in ("exact", "trimmed", "position"):
        with pytest.raises(ResponseError, match='message is not "ok"'):
            match_response(body(good(["a"]), message="busy"), ["a"], mode)  # type: ignore[arg-type]


# --- the property ------------------------------------------------------------------------------

prompt_lists = st.lists(st.sampled_from(["a", "b", "c", "", " a", "é", "a\n"]) | st.text(max_size=4),
                        min_size=1, max_size=12)


@settings(max_examples=300, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), sent=prompt_lists)
def test_every_answer_belongs_to_a_prompt_equal_to_the_one_at_its_index(data: st.DataObject, sent: list[str]) -> None:
    """Whatever subset, order or padding of a correct response comes back, no output lands on a
    prompt it was not given for; a complete permutation answers everything, anything less says so."""
    correct = good(sent)
    kept = data.draw(st.lists(st.sampled_from(range(len(sent))), unique=True, max_size=len(sent)), label="kept")
    chosen = [correct[i] for i in kept]
    # Hostile additions: an item for a prompt never sent, and a repeat of a sent prompt's item.
    extras = data.draw(st.lists(st.sampled_from(["never sent", "repeat"]), max_size=2), label="extras")
    for extra in extras:
        chosen.append(item("never sent \x00") if extra == "never sent" else dict(correct[0]))
    chosen = data.draw(st.permutations(chosen), label="order")

    m = match_response(body(chosen), sent)

    for i, answer in m.answers.items():
        assert 0 <= i < len(sent)
        assert answer.output == answer_of(sent[i])
    if Counter(it["prompt"] for it in chosen) == Counter(sent):
        assert m.problem is None and sorted(m.answers) == list(range(len(sent)))
    else:
        assert m.problem is not None
    # Each answer uses up an item of its own: a prompt never has more answers than items echoing it.
    for text in set(sent):
        answered = sum(1 for i in m.answers if sent[i] == text)
        assert answered <= sum(1 for it in chosen if it["prompt"] == text)


@settings(max_examples=200, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), sent=prompt_lists)
def test_trimmed_answers_belong_to_a_prompt_equal_to_its_own_after_normalising(
    data: st.DataObject, sent: list[str]
) -> None:
    """With echoes trimmed, altered in whitespace, dropped and shuffled, an answer may only land
    on a prompt that is the same text once surrounding whitespace and newline style are set aside."""
    from batchrun.protocol import normalise_echo

    correct = good(sent)
    kept = data.draw(st.lists(st.sampled_from(range(len(sent))), unique=True, max_size=len(sent)), label="kept")
    spaced = data.draw(st.lists(st.sampled_from(["", " ", "\r\n", "\n\t"]), min_size=len(kept), max_size=len(kept)))
    chosen = [{**correct[i], "prompt": pad + normalise_echo(sent[i]) + pad} for i, pad in zip(kept, spaced)]
    chosen = data.draw(st.permutations(chosen), label="order")

    m = match_response(body(chosen), sent, "trimmed")

    for i, answer in m.answers.items():
        assert normalise_echo(answer.output[0].removeprefix("answer to ")) == normalise_echo(sent[i])
