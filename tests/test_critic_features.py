"""Turn features and their explanations: what the gate knows about each candidate beyond the encoder."""

from __future__ import annotations

import json
import time

import pytest

from service.critic import features, reasons
from service.critic.head import Head, HeadError, Linear, parse, sigmoid

TOOLS = [{"type": "function", "function": {
    "name": "cancel_reservation", "parameters": {
        "type": "object", "properties": {"reservation_id": {"type": "string"}}, "required": ["reservation_id"],
        "additionalProperties": False}}},
    {"type": "function", "function": {"name": "get_reservation", "parameters": {
        "type": "object", "properties": {"reservation_id": {"type": "string"}}, "required": ["reservation_id"]}}}]


def call(name: str, **args) -> dict:
    return {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}]}


def ask(text: str) -> list[dict]:
    return [{"role": "system", "content": "You are an airline agent."}, {"role": "user", "content": text}]


def named(turn: features.TurnFeatures) -> list[dict[str, float]]:
    return [dict(zip(turn.names, row)) for row in turn.rows]


def test_agreement_counts_the_same_call_across_candidates():
    cands = [call("cancel_reservation", reservation_id="XK42LP")] * 3 + [call("cancel_reservation",
                                                                           reservation_id="ZZ9999")]
    rows = named(features.compute(ask("Cancel reservation XK42LP please."), cands, TOOLS))
    assert [r["call_support"] for r in rows] == [0.75, 0.75, 0.75, 0.25]
    assert all(r["name_support"] == 1.0 for r in rows)  # same function, other arguments
    assert rows[0]["soft_support"] > rows[3]["soft_support"]
    assert rows[3]["consensus_missing"] == 1.0 and rows[0]["consensus_missing"] == 0.0


def test_argument_values_found_nowhere_in_the_conversation_are_counted():
    msgs = ask("Cancel reservation XK42LP please.")
    good, made_up = call("cancel_reservation", reservation_id="XK42LP"), call("cancel_reservation",
                                                                                reservation_id="ZZ9999")
    rows = named(features.compute(msgs, [good, made_up], TOOLS))
    assert rows[0]["grounded"] == 1.0 and rows[0]["ungrounded"] == 0.0
    assert rows[1]["grounded"] == 0.0 and rows[1]["ungrounded"] > 0


def test_a_tool_result_grounds_a_value_too():
    msgs = ask("Cancel my last booking.") + [
        call("get_reservation", reservation_id="latest"),
        {"role": "tool", "tool_call_id": "c", "content": '{"reservation_id": "QW12ER", "status": "active"}'}]
    rows = named(features.compute(msgs, [call("cancel_reservation", reservation_id="QW12ER")], TOOLS))
    assert rows[0]["grounded"] == 1.0


def test_a_second_write_without_the_users_word_is_unconfirmed():
    first = ask("Cancel XK42LP and QW12ER.") + [call("cancel_reservation", reservation_id="XK42LP"),
                                                 {"role": "tool", "tool_call_id": "c", "content": "ok"}]
    second = call("cancel_reservation", reservation_id="QW12ER")
    assert named(features.compute(first, [second], TOOLS))[0]["unconfirmed_write"] == 1.0
    confirmed = first + [{"role": "assistant", "content": "Cancel QW12ER too?"}, {"role": "user", "content": "yes"}]
    assert named(features.compute(confirmed, [second], TOOLS))[0]["unconfirmed_write"] == 0.0
    read = call("get_reservation", reservation_id="QW12ER")  # reads need no confirmation
    assert named(features.compute(first, [read], TOOLS))[0]["unconfirmed_write"] == 0.0


def test_repeating_the_call_that_just_failed_is_flagged():
    failed = call("get_reservation", reservation_id="XK42LP")
    msgs = ask("Look up XK42LP.") + [failed, {"role": "tool", "tool_call_id": "c",
                                              "content": "Error: reservation not found"}]
    rows = named(features.compute(msgs, [failed, call("get_reservation", reservation_id="XK42LQ")], TOOLS))
    assert rows[0]["retry_after_error"] == 1.0 and rows[0]["repeat_call"] == 1.0
    assert rows[1]["retry_after_error"] == 0.0 and rows[1]["repeat_call"] == 0.0


def test_schema_verdicts_are_computed_unless_the_gate_gives_them():
    bad = call("cancel_reservation", reservation_id="XK42LP", force=True)  # additionalProperties: false
    msgs = ask("Cancel XK42LP.")
    assert named(features.compute(msgs, [bad], TOOLS))[0]["schema_ok"] == 0.0
    assert named(features.compute(msgs, [bad], TOOLS, verdicts=[True]))[0]["schema_ok"] == 1.0


def test_text_turns_measure_length_and_consensus():
    cands = [{"role": "assistant", "content": "Paris is the capital of France."},
             {"role": "assistant", "content": "The capital of France is Paris, on the Seine."},
             {"role": "assistant", "content": "Bananas."}]
    turn = features.compute([{"role": "user", "content": "Capital of France?"}], cands, None)
    rows = named(turn)
    assert turn.kind == "text"
    assert rows[1]["rel_length"] > rows[0]["rel_length"] > rows[2]["rel_length"]
    assert rows[2]["consensus"] < min(rows[0]["consensus"], rows[1]["consensus"])


def test_the_kind_of_turn_picks_the_head():
    history = ask("hi") + [call("get_reservation", reservation_id="A"), {"role": "tool", "content": "x"}]
    text = [{"role": "assistant", "content": "Done."}]
    # inside an agent's loop, declared tools or not (a client may drop the declarations)
    assert features.compute(history, text, None).kind == "agent"
    assert features.compute(ask("hi"), text, TOOLS).kind == "tool"
    assert features.compute(ask("hi"), [call("get_reservation", reservation_id="A")], None).kind == "tool"
    assert features.compute(ask("hi"), text, None).kind == "text"


def test_malformed_candidates_do_not_break_the_features():
    weird = [{"role": "assistant", "tool_calls": [{"function": "not an object"}, "x", {"function": {
        "name": "get_reservation", "arguments": "{not json"}}]},
             {"role": "assistant", "content": [{"type": "text", "text": 5}, "part"]},
             {"role": "assistant"}]
    turn = features.compute(ask("hello"), weird, TOOLS)
    assert len(turn.rows) == 3 and all(len(r) == len(features.TOOL_FEATURES) for r in turn.rows)
    assert len(reasons.explain(ask("hello"), weird, TOOLS)) == 3


def test_arguments_nested_past_any_stack_stay_a_string():
    """A candidate is client data on the score API: arguments nested 100,000 deep must not raise a
    recursion error in the features, the reasons or the encoder's rendering."""
    from service.critic import render

    deep = call("cancel_reservation")
    deep["tool_calls"][0]["function"]["arguments"] = "[" * 100_000 + "]" * 100_000
    msgs = ask("Cancel XK42LP.")
    rows = named(features.compute(msgs, [deep, deep], TOOLS))
    assert rows[0]["call_support"] == 1.0 and rows[0]["schema_ok"] == 0.0
    assert "not valid JSON" in reasons.explain(msgs, [deep], TOOLS)[0]
    assert render.render_candidate(deep).startswith("[assistant] cancel_reservation([[[[")


def test_a_huge_candidate_costs_bounded_work():
    """100,000 argument values against a 4 MB conversation: the grounding looks up the first few
    values in the conversation's newest part, so the work stays bounded (it took 3.6 s of CPU)."""
    huge = call("cancel_reservation", ids=[f"v{i}" for i in range(100_000)])
    msgs = [{"role": "user", "content": "x" * 19_000}] * 200
    started = time.process_time()
    features.compute(msgs, [huge] * 8, TOOLS)
    reasons.explain(msgs, [huge] * 8, TOOLS)
    assert time.process_time() - started < 1.5


def test_the_reason_names_the_disagreement_and_the_invented_value():
    cands = [call("cancel_reservation", reservation_id="XK42LP")] * 3 + [call("cancel_reservation",
                                                                           reservation_id="ZZ9999")]
    why = reasons.explain(ask("Cancel reservation XK42LP please."), cands, TOOLS)
    assert why[0] is None
    assert "3 of 4 candidates call cancel_reservation with reservation_id 'XK42LP'" in why[3]
    assert "'ZZ9999'" in why[3] and "appears nowhere in the conversation" in why[3]


def test_features_of_an_eight_candidate_turn_stay_cheap():
    """The budget is 1 ms per 8-candidate turn on a quiet CPU (bench/critic_features.py measures
    it); a loaded CI machine gets a generous margin, a quadratic blow-up would still fail."""
    msgs = ask("Cancel reservation XK42LP please.") * 10
    cands = [call("cancel_reservation", reservation_id=f"XK42L{i % 3}") for i in range(8)]
    features.compute(msgs, cands, TOOLS, verdicts=[True] * 8)
    started = time.process_time()
    for _ in range(50):
        features.compute(msgs, cands, TOOLS, verdicts=[True] * 8)
    assert (time.process_time() - started) / 50 < 0.01


def _head(weights: dict[str, float], bias: float = 0.0) -> Head:
    def linear(names):
        return Linear(names, (0.0,) * len(names), (1.0,) * len(names),
                      tuple(weights.get(n, 0.0) for n in names), bias)
    return Head({"tool": linear(features.TOOL_FEATURES), "text": linear(features.TEXT_FEATURES)},
                features.FEATURES_VERSION, {})


def test_a_head_scores_and_explains_with_contributions_that_add_up():
    head = _head({"call_support": 2.0, "ungrounded": -1.0}, bias=-0.5)
    cands = [call("cancel_reservation", reservation_id="XK42LP")] * 3 + [call("cancel_reservation",
                                                                           reservation_id="ZZ9999")]
    turn = features.compute(ask("Cancel reservation XK42LP please."), cands, TOOLS)
    scores, contribs = head.apply(turn)
    assert scores[0] > scores[3]
    for s, c in zip(scores, contribs):
        assert s == pytest.approx(sigmoid(-0.5 + sum(c)))
    assert parse(json.loads(json.dumps(head.to_dict()))).heads == head.heads  # the file round-trips


@pytest.mark.parametrize("breakage, message", [
    (lambda d: d.update(format=9), "head format"),
    (lambda d: d.update(features_version=0), "refit the head"),
    (lambda d: d["heads"].pop("text"), "must hold 'tool' and 'text'"),
    (lambda d: d["heads"].update(other=d["heads"]["text"]), "may hold 'agent'"),
    (lambda d: d["heads"]["tool"]["weights"].pop(), "one per feature"),
    (lambda d: d["heads"]["tool"]["scale"].__setitem__(0, 0), "positive"),
    (lambda d: d["heads"]["text"].update(features=["x"]), "expected"),
])
def test_a_broken_head_is_refused_with_what_is_wrong(breakage, message):
    d = json.loads(json.dumps(_head({}).to_dict()))
    breakage(d)
    with pytest.raises(HeadError, match=message):
        parse(d)
