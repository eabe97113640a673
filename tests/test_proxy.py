"""The proxy end to end: the real openai client -> turngate (uvicorn) -> a fake actor on loopback."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest

from service.demo.fake_actor import Reply, assistant
from tests.conftest import TableCritic

USER = [{"role": "user", "content": "Cancel my reservation ABC123."}]
CANCEL_TOOL = {"type": "function", "function": {
    "name": "cancel_reservation", "description": "Cancel a reservation",
    "parameters": {"type": "object", "properties": {"reservation_id": {"type": "string", "pattern": "^[A-Z0-9]{6}$"}},
                   "required": ["reservation_id"], "additionalProperties": False}}}


def client(url: str, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key="sk-test", max_retries=0, **kw)


def numbered(body, i):
    return Reply([assistant(f"candidate {i}")])


def test_returns_the_candidate_the_critic_prefers(gateway, scripted, actor):
    scripted.fn = numbered
    critic = TableCritic({"candidate 2": 0.9, "candidate 1": 0.7})
    with gateway(critic=critic) as (url, sink):
        raw = client(url).chat.completions.with_raw_response.create(model="gpt-test", messages=USER)
    reply = raw.parse()
    assert reply.choices[0].message.content == "candidate 2"
    assert raw.headers["x-turngate-decision"] == "ranked"
    assert raw.headers["x-turngate-candidates"] == "4"
    assert float(raw.headers["x-turngate-score"]) == pytest.approx(0.9)
    assert len(actor[0].requests) == 4  # N concurrent single-candidate calls
    record = sink.records[0]
    assert record.turn_id == raw.headers["x-turngate-turn-id"]
    assert sorted(c.score for c in record.candidates) == [0.5, 0.5, 0.7, 0.9]
    assert record.chosen.message["content"] == "candidate 2"


async def test_async_client_and_concurrent_turns(gateway, scripted):
    scripted.fn = numbered
    with gateway(critic=TableCritic({"candidate": 0.6})) as (url, sink):
        async with openai.AsyncOpenAI(base_url=url, api_key="k", max_retries=0) as aclient:
            replies = await asyncio.gather(*[
                aclient.chat.completions.create(model="gpt-test", messages=USER) for _ in range(8)])
    assert all(r.choices[0].message.content.startswith("candidate") for r in replies)
    assert len({r.id for r in replies}) == 8
    assert len(sink.records) == 8


def test_schema_invalid_tool_call_is_never_returned_while_a_valid_one_exists(gateway, scripted):
    replies = [
        assistant(tool_calls=[("cancel_reservation", {"reservation_id": "abc"})]),  # breaks the pattern
        assistant(tool_calls=[("delete_everything", {})]),  # not a declared tool
        assistant(tool_calls=[("cancel_reservation", '{"reservation_id": ')]),  # not JSON
        assistant(tool_calls=[("cancel_reservation", {"reservation_id": "ABC123"})]),
    ]
    scripted.fn = lambda body, i: Reply([replies[i % 4]])
    # The critic loves the invalid ones; the structural veto must win anyway.
    critic = TableCritic({"abc": 0.99, "delete_everything": 0.98, '{\\"reservation_id\\": "': 0.97, "ABC123": 0.1})
    with gateway(critic=critic) as (url, sink):
        for _ in range(3):
            reply = client(url).chat.completions.create(model="gpt-test", messages=USER, tools=[CANCEL_TOOL])
            call = reply.choices[0].message.tool_calls[0]
            assert call.function.name == "cancel_reservation"
            assert json.loads(call.function.arguments) == {"reservation_id": "ABC123"}
    reasons = {c.veto_reason for c in sink.records[0].candidates if c.verdict == "veto"}
    assert reasons == {"schema", "unknown_tool", "bad_json"}
    detail = next(c.veto_detail for c in sink.records[0].candidates if c.veto_reason == "schema")
    assert "reservation_id" in detail and "does not match" in detail


def test_empty_and_truncated_candidates_are_vetoed(gateway, scripted):
    replies = [{"message": assistant("cut off mid-sen"), "finish_reason": "length"},
               assistant(""), assistant("a complete answer")]
    scripted.fn = lambda body, i: Reply([replies[i % 3]])
    with gateway(critic=TableCritic({"cut off": 0.9, '""': 0.9}), candidates=3) as (url, sink):
        reply = client(url).chat.completions.create(model="gpt-test", messages=USER)
    assert reply.choices[0].message.content == "a complete answer"
    assert {c.veto_reason for c in sink.records[0].candidates} == {"truncated", "empty", None}


def test_streaming_replays_the_chosen_text(gateway, scripted):
    long_text = "word " * 60
    scripted.fn = lambda body, i: Reply([assistant(long_text if i == 1 else "short")])
    with gateway(critic=TableCritic({"word": 0.8})) as (url, _sink):
        stream = client(url).chat.completions.create(model="gpt-test", messages=USER, stream=True,
                                                     stream_options={"include_usage": True})
        chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == long_text
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 1  # really streamed in pieces
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].usage.completion_tokens == 4 * 5  # every candidate's call billed
    assert chunks[-1].usage.chosen["completion_tokens"] == 5  # the chosen one's own


def test_streaming_replays_tool_calls(gateway, scripted):
    args = {"reservation_id": "ABC123"}
    scripted.fn = lambda body, i: Reply([assistant(tool_calls=[("cancel_reservation", args)])])
    with gateway() as (url, _):
        stream = client(url).chat.completions.create(model="gpt-test", messages=USER, tools=[CANCEL_TOOL],
                                                     stream=True)
        name, arguments, finish = None, "", None
        for chunk in stream:
            delta = chunk.choices[0].delta
            for tc in delta.tool_calls or []:
                name = tc.function.name or name
                arguments += tc.function.arguments or ""
            finish = chunk.choices[0].finish_reason or finish
    assert name == "cancel_reservation"
    assert json.loads(arguments) == args
    assert finish == "tool_calls"


def test_streaming_keeps_the_connection_alive_while_sampling(gateway, scripted):
    scripted.fn = lambda body, i: Reply([assistant("slow but fine")], delay_s=0.7)
    with gateway(settings={"keepalive_interval_s": 0.2}) as (url, _):
        body = {"model": "gpt-test", "messages": USER, "stream": True}
        with httpx.stream("POST", url + "/chat/completions", json=body, timeout=10) as resp:
            lines = [line for line in resp.iter_lines() if line]
    assert resp.status_code == 200
    assert resp.headers["x-turngate-turn-id"].startswith("turn-")
    assert sum(1 for line in lines if line == ": keepalive") >= 2
    assert lines[-1] == "data: [DONE]"
    text = "".join(json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
                   for line in lines if line.startswith("data: {") and '"choices":[{' in line)
    assert text == "slow but fine"


def test_streaming_error_after_keepalive_arrives_as_an_error_event(gateway, scripted):
    scripted.fn = lambda body, i: Reply(status=500, delay_s=0.5)
    with gateway(settings={"keepalive_interval_s": 0.1}) as (url, _):
        stream = client(url).chat.completions.create(model="gpt-test", messages=USER, stream=True)
        with pytest.raises(openai.APIError, match="upstream error 500"):
            list(stream)


def test_unknown_fields_and_options_reach_the_upstream(gateway, scripted, actor):
    with gateway(candidates=2) as (url, _):
        client(url).chat.completions.create(
            model="gpt-test", messages=USER, temperature=0.3, response_format={"type": "json_object"},
            extra_body={"vendor_knob": {"x": 1}})
    sent = actor[0].requests[0]
    assert sent["model"] == "actor-model"  # the route's upstream model, not the alias
    assert sent["temperature"] == 0.3
    assert sent["response_format"] == {"type": "json_object"}
    assert sent["vendor_knob"] == {"x": 1}


def test_upstream_that_supports_n_gets_one_request(gateway, scripted, actor):
    scripted.fn = lambda body, i: Reply([assistant(f"choice {k}") for k in range(body.get("n", 1))])
    with gateway(critic=TableCritic({"choice 3": 0.9}), upstream_supports_n=True) as (url, sink):
        reply = client(url).chat.completions.create(model="gpt-test", messages=USER)
    assert reply.choices[0].message.content == "choice 3"
    assert [r.get("n") for r in actor[0].requests] == [4]
    assert len(sink.records[0].candidates) == 4


def test_partial_upstream_failure_ranks_what_came_back(gateway, scripted):
    scripted.fn = lambda body, i: Reply(status=500) if i % 2 else Reply([assistant(f"ok {i}")])
    with gateway() as (url, _sink):
        raw = client(url).chat.completions.with_raw_response.create(model="gpt-test", messages=USER)
    assert raw.parse().choices[0].message.content.startswith("ok")
    assert raw.headers["x-turngate-candidates"] == "2"


@pytest.mark.parametrize("reply, status, error_cls, code", [
    (Reply(status=500), 502, openai.InternalServerError, "upstream_server_error"),
    (Reply(raw="<html>not json</html>"), 502, openai.InternalServerError, "upstream_garbage"),
    (Reply(raw='{"choices": []}'), 502, openai.InternalServerError, "upstream_garbage"),
    (Reply(status=429, headers={"retry-after": "7"}), 429, openai.RateLimitError, "rate_limit_exceeded"),
    (Reply(status=400), 400, openai.BadRequestError, None),
])
def test_upstream_failures_map_to_openai_errors(gateway, scripted, reply, status, error_cls, code):
    scripted.fn = lambda body, i: reply
    with gateway() as (url, sink), pytest.raises(error_cls) as info:
        client(url).chat.completions.create(model="gpt-test", messages=USER)
    err = info.value
    assert err.status_code == status
    assert err.body["message"]  # the envelope: {"error": {"message", "type", "param", "code"}}
    assert err.code == code
    if status == 429:
        assert err.response.headers["retry-after"] == "7"
    assert sink.records[0].decision == "error"


def test_upstream_timeout_is_504(gateway, scripted):
    scripted.fn = lambda body, i: Reply([assistant("too late")], delay_s=3)
    with gateway(attempt_timeout_s=0.3, deadline_s=0.5) as (url, _):
        started = time.monotonic()
        with pytest.raises(openai.APIStatusError) as info:
            client(url).chat.completions.create(model="gpt-test", messages=USER)
    assert info.value.status_code == 504
    assert time.monotonic() - started < 2


def test_client_disconnect_cancels_upstream_calls(gateway, scripted, actor):
    scripted.fn = lambda body, i: Reply([assistant("never seen")], delay_s=5)
    fake = actor[0]
    with gateway() as (url, sink):
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + "/chat/completions", json={"model": "gpt-test", "messages": USER}, timeout=0.5)
        deadline = time.monotonic() + 3
        while fake.disconnected < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert fake.disconnected == 4  # all four upstream calls were hung up on, long before 5 s
        assert fake.in_flight == 0
        while not sink.records and time.monotonic() < deadline:
            time.sleep(0.05)
    assert sink.records[0].decision == "cancelled"


def test_passthrough_makes_one_call_and_does_not_score(gateway, scripted, actor):
    critic = TableCritic({})
    with gateway(critic=critic, mode="passthrough") as (url, _sink):
        raw = client(url).chat.completions.with_raw_response.create(model="gpt-test", messages=USER)
    assert raw.headers["x-turngate-decision"] == "passthrough"
    assert "x-turngate-score" not in raw.headers
    assert len(actor[0].requests) == 1
    assert critic.calls == []


def test_shadow_returns_candidate_zero_and_scores_all(gateway, scripted):
    scripted.fn = numbered
    with gateway(critic=TableCritic({"candidate 3": 0.9}), mode="shadow") as (url, sink):
        raw = client(url).chat.completions.with_raw_response.create(model="gpt-test", messages=USER)
        assert raw.parse().choices[0].message.content == "candidate 0"
        assert raw.headers["x-turngate-decision"] == "shadow"
        deadline = time.monotonic() + 3
        while not sink.records and time.monotonic() < deadline:
            time.sleep(0.02)
    record = sink.records[0]
    assert len(record.candidates) == 4
    assert max(record.candidates, key=lambda c: c.score).message["content"] == "candidate 3"
    assert record.chosen.message["content"] == "candidate 0"


@pytest.mark.parametrize("body, param", [
    ({"model": "gpt-test"}, "messages"),
    ({"model": "gpt-test", "messages": []}, "messages"),
    ({"model": "gpt-test", "messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ({"model": "gpt-test", "messages": USER, "n": 5}, "n"),  # more than the route's 4 candidates
    ({"model": "gpt-test", "messages": USER, "tools": [{"type": "function", "function": {}}]},
     "tools[0].function.name"),
])
def test_bad_requests_get_400_in_openai_format(gateway, body, param):
    with gateway() as (url, _):
        resp = httpx.post(url + "/chat/completions", json=body)
    assert resp.status_code == 400
    err = resp.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param and err["message"]


def test_malformed_json_unknown_model_and_oversized_body(gateway):
    with gateway(settings={"max_request_bytes": 10_000}) as (url, _):
        bad = httpx.post(url + "/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
        assert bad.status_code == 400 and "JSON" in bad.json()["error"]["message"]
        with pytest.raises(openai.NotFoundError) as info:
            client(url).chat.completions.create(model="no-such-model", messages=USER)
        assert info.value.code == "model_not_found"
        big = [{"role": "user", "content": "x" * 20_000}]
        with pytest.raises(openai.APIStatusError) as info:
            client(url).chat.completions.create(model="gpt-test", messages=big)
        assert info.value.status_code == 413
        chunked = httpx.post(url + "/chat/completions", content=iter([b"{" + b" " * 6000, b" " * 6000 + b"}"]))
        assert chunked.status_code == 413


def test_api_keys_are_enforced_when_configured(gateway):
    with gateway(settings={"api_keys": "sk-good,sk-other"}) as (url, _):
        with pytest.raises(openai.AuthenticationError):
            client(url).chat.completions.create(model="gpt-test", messages=USER)
        ok = openai.OpenAI(base_url=url, api_key="sk-other", max_retries=0)
        assert ok.chat.completions.create(model="gpt-test", messages=USER).choices[0].message.content == "hi"


def test_models_and_health(gateway):
    with gateway() as (url, _):
        assert [m.id for m in client(url).models.list()] == ["gpt-test"]
        root = url.removesuffix("/v1")
        assert httpx.get(root + "/healthz").json() == {"status": "ok"}
        ready = httpx.get(root + "/readyz").json()
        assert ready["status"] == "ready" and ready["critic"]["name"] == "table"
        assert ready["routes"] == [{"alias": "gpt-test", "mode": "rank", "candidates": 4}]


def test_unreachable_upstream_is_502(gateway):
    with gateway(upstream_base_url="http://127.0.0.1:1/v1") as (url, _sink), \
            pytest.raises(openai.InternalServerError) as info:
        client(url).chat.completions.create(model="gpt-test", messages=USER)
    assert info.value.status_code == 502 and info.value.code == "upstream_connect"
