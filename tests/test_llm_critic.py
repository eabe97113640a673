"""The LLM critic against fake judges on loopback: one request holding the context, the tools and
every candidate numbered, with a strict JSON schema; the scores and reasons it returns; every way a
judge can fail (late, garbage, wrong counts, refusal, HTTP errors, unreachable) is a JudgeError of
the right kind, counted in the metrics."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from prometheus_client import REGISTRY

from service.critic.llm_critic import CONTEXT_CHARS, JudgeError, LLMCritic
from service.demo.fake_actor import Reply, assistant, free_port
from service.settings import LLMCriticSettings
from tests.judge_support import JUDGE_KEY, USAGE, FakeJudge, answer, judged_candidates, serve_judge

TOOLS = [{"type": "function", "function": {
    "name": "cancel_reservation", "description": "Cancel a reservation",
    "parameters": {"type": "object", "properties": {"reservation_id": {"type": "string"}},
                   "required": ["reservation_id"]}}}]
MESSAGES = [{"role": "system", "content": "You are an airline agent. Never cancel without a yes."},
            {"role": "user", "content": "Cancel reservation ABC123."}]
CANDIDATES = [assistant(tool_calls=[("cancel_reservation", {"reservation_id": "ABC123"})]),
              assistant("Do you confirm that I cancel ABC123?"),
              assistant(tool_calls=[("cancel_reservation", {"reservation_id": "XYZ999"})])]


def critic(url: str, http: httpx.AsyncClient, route: str | None = "judge-test", **over) -> LLMCritic:
    cfg = LLMCriticSettings(**{"base_url": url, "model": "judge-model", "api_key": JUDGE_KEY,
                               "rubric": "Confirmation first.", "rubric_version": "r7", "timeout_s": 2, **over})
    return LLMCritic(cfg, http, route)


def count(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_one_request_with_everything_and_scores_back():
    judge = FakeJudge({"Do you confirm": 0.9, "ABC123": 0.3, "XYZ999": 0.05}, reason_prefix="because")
    with serve_judge(judge) as url:
        async with httpx.AsyncClient() as http:
            before = count("turngate_llm_critic_requests_total", route="judge-test", outcome="ok")
            got = await critic(url, http).judge(MESSAGES, CANDIDATES, TOOLS)
    assert got.scores == [0.3, 0.9, 0.05]
    assert [c.reason for c in got.candidates] == ["because ABC123.", "because Do you confirm.", "because XYZ999."]
    assert (got.prompt_tokens, got.completion_tokens) == (USAGE["prompt_tokens"], USAGE["completion_tokens"])
    assert got.latency_s > 0 and got.labeler == "judge:judge-model@r7"
    assert len(judge.requests) == 1  # all candidates in one request
    body = judge.requests[0]
    assert body["model"] == "judge-model"
    fmt = body["response_format"]
    assert fmt["type"] == "json_schema" and fmt["json_schema"]["strict"] is True
    assert fmt["json_schema"]["schema"]["properties"]["candidates"]["items"]["required"] == ["index", "score", "reason"]
    system, user = body["messages"][0]["content"], body["messages"][1]["content"]
    assert "not explicitly confirmed" in system and "Confirmation first." in system  # built-in + rubric
    assert "cancel_reservation" in user and "Cancel a reservation" in user  # the declared tools
    assert "Never cancel without a yes." in user and "Cancel reservation ABC123." in user  # the context
    assert [t.strip() for t in judged_candidates(body)] == [
        'CALL cancel_reservation({"reservation_id": "ABC123"})', "Do you confirm that I cancel ABC123?",
        'CALL cancel_reservation({"reservation_id": "XYZ999"})']
    assert judge.keys == [f"Bearer {JUDGE_KEY}"]
    assert count("turngate_llm_critic_requests_total", route="judge-test", outcome="ok") == before + 1


async def test_the_context_is_cut_to_the_newest_messages():
    judge = FakeJudge()
    long = [{"role": "system", "content": "POLICY-HEAD " + "p" * 100}]
    long += [{"role": "user" if i % 2 else "assistant", "content": f"message-{i} " + "x" * 3000} for i in range(200)]
    long.append({"role": "user", "content": "NEWEST please " + "y" * 50_000})  # one huge message, cut too
    with serve_judge(judge) as url:
        async with httpx.AsyncClient() as http:
            await critic(url, http).judge(long, CANDIDATES[:2], TOOLS)
    user = judge.requests[0]["messages"][1]["content"]
    assert "POLICY-HEAD" in user and "NEWEST please" in user and "message-199" in user
    assert "message-0 " not in user and "earlier messages left out" in user
    assert len(user) < CONTEXT_CHARS + 30_000  # bounded whatever the client sent


def garbage_replies() -> dict[str, Reply]:
    ok = {"index": 0, "score": 0.5, "reason": "fine."}
    return {
        "wrong count": answer([ok]),
        "missing index": answer([ok, {**ok, "index": 0}, {**ok, "index": 2}]),
        "index out of range": answer([ok, {**ok, "index": 1}, {**ok, "index": 3}]),
        "not a number": answer([ok, {**ok, "index": 1, "score": "high"}, {**ok, "index": 2}]),
        "a boolean": answer([ok, {**ok, "index": 1, "score": True}, {**ok, "index": 2}]),
        "out of range": answer([ok, {**ok, "index": 1, "score": 1.5}, {**ok, "index": 2}]),
        "content not JSON": Reply([assistant("I think candidate 1 is best.")]),
        "body not JSON": Reply(raw="<html>oops</html>"),
        "no choices": Reply(raw=json.dumps({"choices": []})),
        "refusal": Reply([{"role": "assistant", "content": None, "refusal": "I can't help with that."}]),
        "no candidates key": Reply([assistant(json.dumps({"scores": [1, 0, 0]}))]),
    }


@pytest.mark.parametrize("case", sorted(garbage_replies()))
async def test_garbage_is_invalid(case):
    judge = FakeJudge()
    judge.reply = lambda body, attempt: garbage_replies()[case]
    with serve_judge(judge) as url:
        async with httpx.AsyncClient() as http:
            before = count("turngate_llm_critic_requests_total", route="judge-test", outcome="invalid")
            with pytest.raises(JudgeError) as e:
                await critic(url, http).judge(MESSAGES, CANDIDATES, TOOLS)
    assert e.value.kind == "invalid", e.value.message
    assert count("turngate_llm_critic_requests_total", route="judge-test", outcome="invalid") == before + 1


async def test_tokens_of_an_invalid_answer_still_count():
    judge = FakeJudge()
    judge.reply = lambda body, attempt: answer([{"index": 0, "score": 0.5, "reason": "x"}])
    with serve_judge(judge) as url:
        async with httpx.AsyncClient() as http:
            before = count("turngate_llm_critic_tokens_total", route="judge-test", kind="prompt")
            with pytest.raises(JudgeError) as e:
                await critic(url, http).judge(MESSAGES, CANDIDATES, TOOLS)
    assert (e.value.prompt_tokens, e.value.completion_tokens) == (120, 30)
    assert count("turngate_llm_critic_tokens_total", route="judge-test", kind="prompt") == before + 120


@pytest.mark.parametrize("status", [500, 429, 401])
async def test_http_errors(status):
    judge = FakeJudge()
    judge.reply = lambda body, attempt: Reply(status=status)
    with serve_judge(judge) as url:
        async with httpx.AsyncClient() as http:
            with pytest.raises(JudgeError) as e:
                await critic(url, http).judge(MESSAGES, CANDIDATES, TOOLS)
    assert e.value.kind == "error" and str(status) in e.value.message
    assert JUDGE_KEY not in e.value.message


async def test_a_slow_judge_times_out_on_time():
    judge = FakeJudge()
    judge.reply = lambda body, attempt: Reply([assistant("{}")], delay_s=5)
    with serve_judge(judge) as url:
        async with httpx.AsyncClient() as http:
            before = count("turngate_llm_critic_requests_total", route="judge-test", outcome="timeout")
            started = time.monotonic()
            with pytest.raises(JudgeError) as e:
                await critic(url, http, timeout_s=0.4).judge(MESSAGES, CANDIDATES, TOOLS)
            took = time.monotonic() - started
    assert e.value.kind == "timeout"
    assert took < 0.4 + 0.3
    assert count("turngate_llm_critic_requests_total", route="judge-test", outcome="timeout") == before + 1


async def test_an_unreachable_judge_is_an_error():
    async with httpx.AsyncClient() as http:
        with pytest.raises(JudgeError) as e:
            await critic(f"http://127.0.0.1:{free_port()}/v1", http).judge(MESSAGES, CANDIDATES, TOOLS)
    assert e.value.kind == "error"


async def test_without_a_route_no_metrics_are_counted():
    judge = FakeJudge()
    with serve_judge(judge) as url:
        async with httpx.AsyncClient() as http:
            before = count("turngate_llm_critic_requests_total", route="judge-test", outcome="ok")
            got = await critic(url, http, route=None).judge(MESSAGES, CANDIDATES, TOOLS)
    assert len(got.candidates) == 3
    assert count("turngate_llm_critic_requests_total", route="judge-test", outcome="ok") == before


async def test_hostile_text_is_sent_escaped():
    judge = FakeJudge()
    hostile = [{"role": "user", "content": "lone \ud800 surrogate and NUL \x00 and nan"}]
    with serve_judge(judge) as url:
        async with httpx.AsyncClient() as http:
            got = await critic(url, http).judge(hostile, [assistant("ok \udfff")], None)
    assert len(got.candidates) == 1 and "surrogate" in judge.requests[0]["messages"][1]["content"]


async def test_a_token_count_no_counter_takes_is_not_counted():
    """A judge's usage past a float's range made the token counter raise inside the critic."""
    judge = FakeJudge()
    entries = [{"index": i, "score": 0.5, "reason": "x"} for i in range(len(CANDIDATES))]
    judge.reply = lambda body, attempt: answer(entries, usage={"prompt_tokens": 10**400, "completion_tokens": 7})
    with serve_judge(judge) as url:
        async with httpx.AsyncClient() as http:
            before = count("turngate_llm_critic_tokens_total", route="judge-test", kind="completion")
            got = await critic(url, http).judge(MESSAGES, CANDIDATES, TOOLS)
    assert got.scores == [0.5] * len(CANDIDATES)
    assert (got.prompt_tokens, got.completion_tokens) == (0, 7)
    assert count("turngate_llm_critic_tokens_total", route="judge-test", kind="completion") == before + 7
