"""The gate policy: adaptive sampling, intervention, exhaustion, deadlines (with a test-set critic)."""

from __future__ import annotations

import time

import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam
from pydantic import ValidationError

from service.demo.fake_actor import Reply, assistant
from service.settings import GatePolicy, Settings
from tests.conftest import TableCritic

USER: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Cancel reservation ABC123 for me."}]
RISKY = "cancel_reservation now"
SAFE = "Please confirm: cancel ABC123?"


def ask(url: str):
    client = openai.OpenAI(base_url=url, api_key="k", max_retries=0)
    return client.chat.completions.with_raw_response.create(model="gpt-test", messages=USER)


def test_adaptive_accepts_at_once_when_the_first_candidate_passes(gateway, scripted, actor):
    scripted.fn = lambda body, i: Reply([assistant(SAFE)])
    policy = GatePolicy(sampling="adaptive", initial_candidates=1, accept_threshold=0.7)
    with gateway(critic=TableCritic({SAFE: 0.9}), policy=policy) as (url, sink):
        raw = ask(url)
    assert raw.headers["x-turngate-decision"] == "accepted"
    assert len(actor[0].requests) == 1  # one upstream call, not N
    assert sink.records[0].candidates_saved == 3


def test_adaptive_escalates_to_n_when_the_first_candidate_does_not_pass(gateway, scripted, actor):
    scripted.fn = lambda body, i: Reply([assistant(RISKY if i == 0 else f"{SAFE} v{i}")])
    policy = GatePolicy(sampling="adaptive", initial_candidates=1, accept_threshold=0.7)
    critic = TableCritic({RISKY: 0.2, "v2": 0.8, SAFE: 0.6})
    with gateway(critic=critic, policy=policy) as (url, sink):
        raw = ask(url)
    assert raw.parse().choices[0].message.content == f"{SAFE} v2"
    assert raw.headers["x-turngate-decision"] == "ranked"
    assert len(actor[0].requests) == 4
    assert critic.calls == [1, 4]  # scored the first, then all four together (agreement is a round feature)
    assert sink.records[0].candidates_saved == 0


def test_adaptive_escalation_checks_the_structure_of_the_later_candidates(gateway, scripted):
    """The candidates sampled after the first k are vetoed like the first: an empty reply the critic
    would score highest is never returned."""
    scripted.fn = lambda body, i: Reply([assistant(RISKY if i == 0 else ("" if i == 1 else f"{SAFE} v{i}"))])
    policy = GatePolicy(sampling="adaptive", initial_candidates=1, accept_threshold=0.7)
    critic = TableCritic({RISKY: 0.2, "v2": 0.6, SAFE: 0.5}, default=0.95)  # the empty reply: 0.95
    with gateway(critic=critic, policy=policy) as (url, sink):
        raw = ask(url)
    assert raw.parse().choices[0].message.content == f"{SAFE} v2"
    assert sorted(c.veto_reason or "-" for c in sink.records[0].candidates) == ["-", "-", "-", "empty"]


def test_intervention_feeds_back_to_the_actor_and_returns_the_second_round(gateway, scripted, actor):
    def respond(body, i):
        heeded = any("reviewer" in (m.get("content") or "") for m in body["messages"])
        return Reply([assistant(SAFE)] if heeded else [assistant(RISKY)])

    scripted.fn = respond
    policy = GatePolicy(intervene_threshold=0.5, max_interventions=2, guidance="Always confirm first.")
    with gateway(critic=TableCritic({RISKY: 0.12, SAFE: 0.8}), candidates=2, policy=policy) as (url, sink):
        raw = ask(url)
    assert raw.parse().choices[0].message.content == SAFE
    assert raw.headers["x-turngate-decision"] == "intervened"
    assert raw.headers["x-turngate-rounds"] == "2"
    second = actor[0].requests[2]  # round two's first request
    feedback = second["messages"][-1]
    assert feedback["role"] == "system"
    assert RISKY in feedback["content"] and "0.12" in feedback["content"]
    assert "Always confirm first." in feedback["content"]
    assert second["messages"][:-1] == USER  # the client's conversation, untouched, before it
    record = sink.records[0]
    assert [c.round for c in record.candidates] == [0, 0, 1, 1]
    assert record.feedback == [feedback["content"]]


def test_intervention_explains_structural_vetoes(gateway, scripted, actor):
    tool = {"type": "function", "function": {"name": "cancel", "parameters": {
        "type": "object", "properties": {"id": {"type": "string"}}, "required": ["id"]}}}

    def respond(body, i):
        heeded = len(body["messages"]) > 1
        return Reply([assistant(tool_calls=[("cancel", {"id": "ABC123"} if heeded else {"ident": 1})])])

    scripted.fn = respond
    with gateway(candidates=1, policy=GatePolicy(max_interventions=1)) as (url, _sink):
        client = openai.OpenAI(base_url=url, api_key="k", max_retries=0)
        raw = client.chat.completions.with_raw_response.create(model="gpt-test", messages=USER, tools=[tool])
    assert raw.headers["x-turngate-decision"] == "intervened"
    assert raw.parse().choices[0].message.tool_calls[0].function.arguments == '{"id": "ABC123"}'
    feedback = actor[0].requests[1]["messages"][-1]["content"]
    assert "'id' is a required property" in feedback


@pytest.mark.parametrize("on_exhausted", ["best", "block", "error"])
def test_exhaustion_policies(gateway, scripted, actor, on_exhausted):
    scripted.fn = lambda body, i: Reply([assistant(f"{RISKY} {i}")])
    policy = GatePolicy(intervene_threshold=0.5, max_interventions=1, on_exhausted=on_exhausted,
                        block_message="A human will take it from here.")
    critic = TableCritic({f"{RISKY} 1": 0.3, RISKY: 0.1})
    with gateway(critic=critic, candidates=2, policy=policy) as (url, sink):
        if on_exhausted == "error":
            with pytest.raises(openai.UnprocessableEntityError) as info:
                ask(url)
            assert info.value.code == "turn_rejected"
            assert info.value.response.headers["x-turngate-decision"] == "rejected"
        else:
            raw = ask(url)
            content = raw.parse().choices[0].message.content
            if on_exhausted == "best":
                assert raw.headers["x-turngate-decision"] == "below_threshold"
                assert content == f"{RISKY} 1"  # the best of both rounds
            else:
                assert raw.headers["x-turngate-decision"] == "blocked"
                assert content == "A human will take it from here."
                assert raw.parse().choices[0].message.tool_calls is None
    assert len(actor[0].requests) == 4  # two rounds of two
    assert sink.records[0].decision == {"best": "below_threshold", "block": "blocked", "error": "rejected"}[
        on_exhausted]


def test_a_slow_round_never_pushes_the_turn_past_its_deadline(gateway, scripted, actor):
    def respond(body, i):
        second_round = len(body["messages"]) > 1
        return Reply([assistant(SAFE if second_round else RISKY)], delay_s=5 if second_round else 0)

    scripted.fn = respond
    policy = GatePolicy(intervene_threshold=0.5, max_interventions=2)
    with gateway(critic=TableCritic({RISKY: 0.2, SAFE: 0.9}), candidates=2, deadline_s=1.0,
                 policy=policy) as (url, _sink):
        started = time.monotonic()
        raw = ask(url)
        elapsed = time.monotonic() - started
    assert elapsed < 1.8
    assert raw.headers["x-turngate-decision"] == "below_threshold"
    assert raw.parse().choices[0].message.content == RISKY  # the best so far, by policy


def test_config_with_intervene_above_accept_is_refused(tmp_path, monkeypatch):
    """Adaptive sampling would stop at a candidate scoring 0.45, which intervene then rejects."""
    config = tmp_path / "turngate.yaml"
    config.write_text("routes:\n  - alias: agent\n    policy:\n      sampling: adaptive\n"
                      "      accept_threshold: 0.45\n      intervene_threshold: 0.5\n")
    monkeypatch.setenv("TURNGATE_CONFIG", str(config))
    with pytest.raises(ValidationError,
                       match=r"accept_threshold \(0.45\) must not be below intervene_threshold \(0.5\)"):
        Settings()
    config.write_text(config.read_text().replace("0.45", "0.5"))  # equal is fine
    assert Settings().routes[0].policy.accept_threshold == 0.5
