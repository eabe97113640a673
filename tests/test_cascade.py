"""The cascade in the serving path, through the openai SDK against a real gateway, with a fake actor
and a fake LLM critic on loopback: the judge is asked only on unsure turns (a margin tie, low
agreement, a write) and within the route's budget; its pick is returned when it disagrees with the
encoder; its reason reaches the actor in an intervention; a dead, slow or garbage judge never fails
a turn nor holds it past timeout_s; the record reaches the database and the inspector; the judge's
key never shows."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import httpx
import openai
import pytest
from prometheus_client import REGISTRY
from sqlalchemy import text

from service.app import create_app
from service.demo.fake_actor import Reply, assistant, free_port, serve_in_thread
from service.settings import CascadeSettings, GatePolicy, LLMCriticSettings, RouteSettings, Settings
from service.store.engine import make_sync_engine
from service.store.sink import StoreSink
from tests.conftest import TableCritic
from tests.inspector_support import ADMIN, ADMIN_HEADERS, wait_stored
from tests.judge_support import JUDGE_KEY, FakeJudge, FeatureCritic, answer, serve_judge
from tests.test_admin_routes import audit_rows
from tests.test_store_support import db_url, make_pg_db, shared_pg_db  # noqa: F401 - fixtures

USER = [{"role": "user", "content": "Please help with reservation ABC123."}]
TOOLS = [{"type": "function", "function": {"name": name, "parameters": {
    "type": "object", "properties": {"q": {"type": "string"}, "reservation_id": {"type": "string"}}}}}
    for name in ("search_flights", "cancel_reservation")]


def judge_cfg(url: str, **over: Any) -> LLMCriticSettings:
    return LLMCriticSettings(**{"base_url": url, "model": "judge-model", "api_key": JUDGE_KEY, "timeout_s": 2,
                                **over})


def replies(*messages: dict[str, Any]):
    """The actor answers each call (n=4) with these candidates, in order."""
    return lambda body, attempt: Reply(list(messages))


def ask(url: str, model: str = "gpt-test", tools: list | None = None):
    client = openai.OpenAI(base_url=url, api_key="k", max_retries=0)
    extra = {"tools": tools} if tools else {}
    return client.chat.completions.with_raw_response.create(model=model, messages=USER, **extra)  # type: ignore


def count(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def route(judge_url: str, alias: str = "gpt-test", cascade: CascadeSettings | None = None, **over: Any) -> dict:
    return {"alias": alias, "upstream_supports_n": True, "llm_critic": judge_cfg(judge_url, **over.pop("judge", {})),
            "cascade": cascade or CascadeSettings(max_share=1.0), **over}


TEXTS = {"alpha": 0.9, "beta": 0.2, "gamma": 0.1, "delta": 0.1}


def test_the_judge_is_asked_only_on_unsure_turns(gateway, scripted):
    judge = FakeJudge({"beta": 0.95, "alpha": 0.2, "ABC123": 0.8}, default=0.1)
    with serve_judge(judge) as judge_url, gateway(critic=TableCritic(
            {"alpha": 0.9, "beta": 0.85, "ABC123": 0.9, "sure": 0.9}, default=0.1), **route(judge_url)) as (url, sink):
        # sure: a wide margin, a text reply, no write
        scripted.fn = replies(assistant("sure thing"), assistant("gamma"), assistant("delta"), assistant("gamma 2"))
        sure_before = count("turngate_cascade_total", route="gpt-test", decision="encoder_sure")
        raw = ask(url)
        assert len(judge.requests) == 0
        assert raw.parse().choices[0].message.content == "sure thing"
        assert count("turngate_cascade_total", route="gpt-test", decision="encoder_sure") == sure_before + 1

        # a margin tie (0.9 against 0.85): the judge decides, and its pick (beta) is returned
        scripted.fn = replies(assistant("alpha"), assistant("beta"), assistant("gamma"), assistant("delta"))
        judged_before = count("turngate_cascade_total", route="gpt-test", decision="judged")
        raw = ask(url)
        assert len(judge.requests) == 1
        assert raw.parse().choices[0].message.content == "beta"
        assert count("turngate_cascade_total", route="gpt-test", decision="judged") == judged_before + 1

        # a write call the encoder is sure of: judged all the same (the judge agrees here)
        scripted.fn = replies(assistant(tool_calls=[("cancel_reservation", {"reservation_id": "ABC123"})]),
                              assistant("gamma"), assistant("delta"), assistant("gamma 2"))
        raw = ask(url, tools=TOOLS)
        assert len(judge.requests) == 2
        assert raw.parse().choices[0].message.tool_calls[0].function.name == "cancel_reservation"
    sure, tie, write = sink.records
    assert (sure.decided_by, sure.judge_reason, sure.critics_agreed) == ("encoder", None, None)
    assert all(c.judge_score is None for c in sure.candidates)
    assert (tie.decided_by, tie.judge_reason, tie.critics_agreed) == ("llm", "margin", False)
    assert [c.judge_score for c in tie.candidates] == [0.2, 0.95, 0.1, 0.1]
    assert tie.candidates[1].judge_reason == "judged beta." and tie.chosen_index == 1
    assert (tie.judge_prompt_tokens, tie.judge_completion_tokens) == (120, 30)
    assert (tie.prompt_tokens, tie.completion_tokens) == (10, 20)  # the client's usage: the actor's alone
    assert (write.decided_by, write.judge_reason, write.critics_agreed) == ("llm", "write", True)


def test_low_agreement_asks_the_judge(gateway, scripted):
    judge = FakeJudge({'"q": "a"': 0.9}, default=0.2)
    critic = FeatureCritic({'\\"q\\": \\"a\\"': 0.9}, default=0.1)  # a wide margin; four different calls
    with serve_judge(judge) as judge_url, gateway(critic=critic, **route(judge_url)) as (url, sink):
        scripted.fn = replies(*[assistant(tool_calls=[("search_flights", {"q": q})]) for q in "abcd"])
        ask(url, tools=TOOLS)
        assert len(judge.requests) == 1
        # the same four calls made alike: agreement 1, a wide margin, a read: no judge
        scripted.fn = replies(*[assistant(tool_calls=[("search_flights", {"q": "a"})])] * 3,
                              assistant("a text reply"))
        ask(url, tools=TOOLS)
        assert len(judge.requests) == 1
    low, agreed = sink.records
    assert (low.decided_by, low.judge_reason, low.critics_agreed) == ("llm", "agreement", True)
    assert low.candidates[0].features["call_support"] == 0.25
    assert (agreed.decided_by, agreed.judge_reason) == ("encoder", None)


def tie_replies(body, attempt) -> Reply:
    return Reply([assistant("alpha"), assistant("beta"), assistant("gamma"), assistant("delta")])


TIE_CRITIC = {"alpha": 0.9, "beta": 0.85}


def test_max_share_bounds_the_judged_turns(gateway, scripted):
    judge = FakeJudge({"beta": 0.9}, default=0.1)
    scripted.fn = tie_replies
    with serve_judge(judge) as judge_url, gateway(critic=TableCritic(TIE_CRITIC, 0.1), **route(
            judge_url, alias="gpt-share", cascade=CascadeSettings(max_share=0.5))) as (url, sink):
        over_before = count("turngate_cascade_total", route="gpt-share", decision="over_budget")
        for _ in range(10):
            ask(url, "gpt-share")
    assert len(judge.requests) == 5
    assert [r.decided_by for r in sink.records].count("llm") == 5
    assert count("turngate_cascade_total", route="gpt-share", decision="over_budget") == over_before + 5


def test_the_token_budget_per_hour(gateway, scripted):
    judge = FakeJudge({"beta": 0.9}, default=0.1)  # each answer bills 150 tokens
    scripted.fn = tie_replies
    with serve_judge(judge) as judge_url, gateway(critic=TableCritic(TIE_CRITIC, 0.1), **route(
            judge_url, alias="gpt-tokens", cascade=CascadeSettings(max_share=1.0, max_tokens_per_hour=100))) as (
            url, sink):
        for _ in range(3):
            ask(url, "gpt-tokens")
    assert len(judge.requests) == 1
    assert [r.decided_by for r in sink.records] == ["llm", "encoder", "encoder"]
    assert [r.chosen.message["content"] for r in sink.records] == ["beta", "alpha", "alpha"]
    assert count("turngate_llm_critic_tokens_total", route="gpt-tokens", kind="completion") >= 30


def test_the_judges_reason_reaches_the_actor_in_an_intervention(gateway, scripted, actor):
    reason = "Candidate cancels ABC123 though the user never said yes"
    judge = FakeJudge({"risky": 0.1}, default=0.1, reason_prefix=reason + " -")

    def respond(body, attempt) -> Reply:
        if len(body["messages"]) == 1:  # the first round: two close, risky candidates
            return Reply([assistant("risky one"), assistant("risky two"), assistant("gamma"), assistant("delta")])
        return Reply([assistant("safe: shall I cancel ABC123?"), assistant("gamma"), assistant("delta"),
                      assistant("gamma 2")])

    scripted.fn = respond
    critic = TableCritic({"risky one": 0.8, "risky two": 0.78, "safe": 0.9}, default=0.1)
    policy = GatePolicy(intervene_threshold=0.5, max_interventions=1)
    with serve_judge(judge) as judge_url, gateway(critic=critic, policy=policy, **route(judge_url)) as (url, sink):
        raw = ask(url)
    assert raw.headers["x-turngate-decision"] == "intervened"
    assert raw.parse().choices[0].message.content == "safe: shall I cancel ABC123?"
    regenerate = actor[0].requests[1]["messages"]
    feedback = regenerate[-1]["content"]
    assert reason in feedback and "scored 0.10" in feedback
    assert len(judge.requests) == 1  # round 2: the encoder was sure
    record = sink.records[0]
    assert record.feedback == [feedback]
    assert record.decided_by == "encoder" and record.candidates[0].judge_reason.startswith(reason)


def slow(body, attempt) -> Reply:
    return Reply([assistant("{}")], delay_s=10)


FAILURES = {
    "slow": (slow, "judge_timeout"),
    "garbage": (lambda body, attempt: Reply(raw="not json at all"), "judge_invalid"),
    "wrong count": (lambda body, attempt: answer([{"index": 0, "score": 1, "reason": "x"}]), "judge_invalid"),
    "http 500": (lambda body, attempt: Reply(status=500), "judge_error"),
}


@pytest.mark.parametrize("case", [*FAILURES, "dead"])
def test_a_failing_judge_never_fails_nor_holds_the_turn(gateway, scripted, case, caplog):
    caplog.set_level(logging.DEBUG)
    judge = FakeJudge({"beta": 0.9})
    scripted.fn = tie_replies
    timeout_s = 0.5
    with serve_judge(judge) as judge_url:
        if case == "dead":
            judge_url = f"http://127.0.0.1:{free_port()}/v1"
            kind = "judge_error"
        else:
            judge.reply, kind = FAILURES[case]
        alias = "gpt-fail-" + case.replace(" ", "-")
        outcome = kind.removeprefix("judge_")
        before = count("turngate_llm_critic_requests_total", route=alias, outcome=outcome)
        with gateway(critic=TableCritic(TIE_CRITIC, 0.1), **route(judge_url, alias=alias,
                                                                  judge={"timeout_s": timeout_s})) as (url, sink):
            started = time.monotonic()
            raw = ask(url, alias)
            took = time.monotonic() - started
    assert raw.parse().choices[0].message.content == "alpha"  # the encoder's pick
    assert raw.headers["x-turngate-decision"] == "ranked"
    assert took < timeout_s + 1.0
    record = sink.records[0]
    assert record.decided_by == "encoder" and record.error is None
    assert [e.kind for e in record.upstream_errors] == [kind]
    assert all(c.judge_score is None for c in record.candidates)
    assert count("turngate_llm_critic_requests_total", route=alias, outcome=outcome) == before + 1
    assert not leaks(caplog)


def test_the_record_reaches_the_database_and_the_inspector(db_url, tmp_path, actor, scripted, caplog):  # noqa: F811
    caplog.set_level(logging.DEBUG)
    scripted.fn = tie_replies
    judge = FakeJudge({"beta": 0.9, "alpha": 0.3}, default=0.1, reason_prefix="because")
    with serve_judge(judge) as judge_url:
        cfg = RouteSettings(upstream_base_url=actor[1], upstream_model="actor-model", candidates=4,
                            attempt_timeout_s=5, deadline_s=10, **route(judge_url, alias="gpt-test"))
        settings = Settings(routes=[cfg], admin_key=ADMIN, database_url=db_url, control_poll_s=0.2)
        sink = StoreSink(db_url, tmp_path / "spool", flush_interval_s=0.05)
        with serve_in_thread(create_app(settings, critic=TableCritic(TIE_CRITIC, 0.1), sink=sink)) as base:
            turn_id = ask(base + "/v1").headers["x-turngate-turn-id"]
            shown = wait_stored(base, turn_id)
            listed = httpx.get(base + "/v1/admin/routes", headers=ADMIN_HEADERS)
            # put back what GET shows: the masked key means "keep it", and the judge still gets the real one
            view = listed.json()["data"][0]
            body = {k: v for k, v in view.items() if k not in ("source", "upstream_api_key")}
            put = httpx.put(base + "/v1/admin/routes/gpt-test", headers=ADMIN_HEADERS, json=body)
            assert put.status_code == 200, put.text
            wrong = {**body, "llm_critic": {**body["llm_critic"], "api_key": "***zzzz"}}
            refused = httpx.put(base + "/v1/admin/routes/gpt-test", headers=ADMIN_HEADERS, json=wrong)
            assert refused.status_code == 400 and refused.json()["error"]["param"] == "llm_critic.api_key"
            time.sleep(0.5)  # the route reloads
            ask(base + "/v1")
    assert (shown["decided_by"], shown["judge_reason"], shown["critics_agreed"]) == ("llm", "margin", False)
    assert shown["chosen_index"] == 1
    assert [c["judge_score"] for c in shown["candidates"]] == [0.3, 0.9, 0.1, 0.1]
    assert shown["candidates"][1]["judge_reason"] == "because beta."
    engine = make_sync_engine(db_url)
    try:
        with engine.connect() as conn:
            spent = conn.execute(text("SELECT judge_prompt_tokens, judge_completion_tokens FROM turns WHERE id = :t"),
                                 {"t": turn_id}).one()
    finally:
        engine.dispose()
    assert tuple(spent) == (120, 30)  # the judge's own usage, turngate's cost
    assert listed.status_code == 200 and JUDGE_KEY not in listed.text
    assert view["llm_critic"]["api_key"] == "***" + JUDGE_KEY[-4:]
    assert JUDGE_KEY not in put.text
    assert judge.keys == [f"Bearer {JUDGE_KEY}"] * 2
    audited = [json.dumps([a.before, a.after]) for a in audit_rows(db_url)]
    assert audited and not any(JUDGE_KEY in a for a in audited)
    assert all(JUDGE_KEY[-4:] in a for a in audited)  # masked, not dropped
    assert not leaks(caplog)


def leaks(caplog) -> list[str]:
    """turngate's log lines (any level) and everyone's at INFO and above that hold the judge's key; a
    database driver's DEBUG lines echo the stored route (its keys are stored in clear, as in the YAML)."""
    return [r.getMessage() for r in caplog.records if JUDGE_KEY in r.getMessage()
            and (r.levelno >= logging.INFO or r.name.startswith(("service", "turngate")))]


# -- the budget and the rule's inputs, on their own ---------------------------------------------------

def test_budget_share_window_and_tokens_per_hour():
    from service.gate.judging import CascadeBudget

    now = [1000.0]
    budget = CascadeBudget(window=4, clock=lambda: now[0])
    cfg = CascadeSettings(max_share=0.5, max_tokens_per_hour=300)
    assert [budget.admit(cfg) for _ in range(4)] == [False, True, False, True]
    budget.sure()  # a sure ranking widens the share's denominator; the window keeps the last 4
    assert budget.share == 0.5  # [judged, no, judged, no]
    budget.sure()
    budget.spend(300)
    assert budget.tokens_last_hour() == 300
    assert budget.admit(cfg) is False  # the share allows it (2 of 5), the tokens do not
    now[0] += 3601
    assert budget.tokens_last_hour() == 0 and budget.admit(cfg) is True
    never = CascadeSettings(max_share=0.0)
    assert not any(CascadeBudget().admit(never) for _ in range(5))


def test_round_doubt_counts_identical_samples_once():
    from service.gate.judging import round_doubt

    cfg = CascadeSettings()
    call = assistant(tool_calls=[("search_flights", {"q": "a"})])
    same = {**call, "tool_calls": [{**call["tool_calls"][0], "id": "call_other"}]}  # another sample's call id
    assert round_doubt([call, same, assistant("x")], [0.9, 0.9, 0.2], [None] * 3, cfg) == (None, 0)
    assert round_doubt([assistant("x"), assistant("y")], [0.5, 0.55], [None] * 2, cfg) == ("margin", 1)
    assert round_doubt([assistant("x"), assistant("y")], [None, None], [None] * 2, cfg) == ("margin", 0)
    low = {"call_support": 0.25, "alone": 0.0}
    assert round_doubt([call, assistant("y")], [0.9, 0.1], [low, None], cfg) == ("agreement", 0)
    assert round_doubt([call], [0.9], [{"call_support": 1.0, "alone": 1.0}], cfg) == (None, 0)


def test_shadow_mode_judges_in_the_background(gateway, scripted):
    judge = FakeJudge({"beta": 0.9}, default=0.1)
    scripted.fn = tie_replies
    with serve_judge(judge) as judge_url, gateway(critic=TableCritic(TIE_CRITIC, 0.1), mode="shadow", **route(
            judge_url, alias="gpt-shadow")) as (url, sink):
        raw = ask(url, "gpt-shadow")
        assert raw.parse().choices[0].message.content == "alpha"  # candidate 0, unchanged
    assert len(judge.requests) == 1
    record = sink.records[0]
    assert record.decision == "shadow" and record.chosen_index == 0
    assert (record.decided_by, record.judge_reason, record.critics_agreed) == ("llm", "margin", False)
    assert [c.judge_score for c in record.candidates] == [0.1, 0.9, 0.1, 0.1]


def test_without_an_llm_critic_the_encoder_decides(gateway, scripted):
    scripted.fn = tie_replies
    with gateway(critic=TableCritic(TIE_CRITIC, 0.1), alias="gpt-plain", upstream_supports_n=True) as (url, sink):
        before = count("turngate_cascade_total", route="gpt-plain", decision="encoder_sure")
        assert ask(url, "gpt-plain").parse().choices[0].message.content == "alpha"
    record = sink.records[0]
    assert (record.decided_by, record.judge_reason, record.critics_agreed) == ("encoder", None, None)
    assert count("turngate_cascade_total", route="gpt-plain", decision="encoder_sure") == before  # no cascade
