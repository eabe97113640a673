"""Wire fidelity, through the real openai client: what the upstream says reaches the client (usage
with its details, summed over every call a rank turn billed; logprobs, service_tier,
system_fingerprint, request id and rate-limit headers) in
JSON and streamed replies, on passthrough and rank routes; passthrough streams are relayed as they
arrive; what agents send reaches the upstream; a failure after a stream began ends in an error event.
"""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

from service.demo.fake_actor import Reply, assistant, token_logprob, tokens
from tests.conftest import TableCritic

USER = [{"role": "user", "content": "What is the capital of France?"}]
CHOSEN = 2  # the rank route's critic prefers the third candidate


def usage(i: int) -> dict:
    return {"prompt_tokens": 1200, "completion_tokens": 40 + i, "total_tokens": 1240 + i,
            "prompt_tokens_details": {"cached_tokens": 128, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 16 + i, "audio_tokens": 0,
                                          "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}}


def billed(mode: str, i: int) -> dict:
    """The usage a reply reports: a passthrough call's as sent; a rank turn's four calls summed, the
    chosen call's own under `chosen`."""
    if mode == "passthrough":
        return usage(i)
    return {"prompt_tokens": 4 * 1200, "completion_tokens": sum(40 + k for k in range(4)),
            "total_tokens": sum(1240 + k for k in range(4)),
            "prompt_tokens_details": {"cached_tokens": 4 * 128, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": sum(16 + k for k in range(4)), "audio_tokens": 0,
                                          "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0},
            "chosen": usage(i), "candidates": 4}


def rich(body, i) -> Reply:
    """Each call answers differently, and says so in its usage, request id and rate-limit headers."""
    return Reply([assistant(f"Paris, said candidate {i}, is the capital.")], usage=usage(i),
                 service_tier="default", system_fingerprint=f"fp_{i}",
                 headers={"x-request-id": f"req_up{i}", "x-ratelimit-limit-requests": "500",
                          "x-ratelimit-remaining-requests": str(499 - i), "x-ratelimit-reset-requests": "120ms",
                          "x-ratelimit-remaining-tokens": str(90_000 - i), "openai-processing-ms": str(300 + i),
                          "openai-organization": "org-operator-secret"})


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key="sk-test", max_retries=0)


def start(gateway, mode: str, **route):
    if mode == "rank":
        return gateway(critic=TableCritic({f"candidate {CHOSEN}": 0.9}), **route)
    return gateway(mode="passthrough", **route)


def ask(url: str, stream: bool, **kw):
    # stream is a bool here, not a literal: no overload of the SDK's create() matches that statically
    return client(url).chat.completions.with_raw_response.create(  # type: ignore[call-overload]
        model="gpt-test", messages=USER, logprobs=True, top_logprobs=2, stream=stream,
        **({"stream_options": {"include_usage": True}} if stream else {}), **kw)


@pytest.mark.parametrize("mode", ["passthrough", "rank"])
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_what_the_upstream_says_reaches_the_client(gateway, scripted, mode, stream):
    scripted.fn = rich
    with start(gateway, mode) as (url, sink):
        raw = ask(url, stream)
        reply = raw.parse()
        if stream:
            chunks = [c.to_dict() for c in reply]
    i = 0 if mode == "passthrough" else CHOSEN
    text = f"Paris, said candidate {i}, is the capital."
    expected_logprobs = [token_logprob(t, k, 2) for k, t in enumerate(tokens(text))]
    if stream:
        with_choices = [c for c in chunks if c["choices"]]
        assert "".join(c["choices"][0]["delta"].get("content") or "" for c in with_choices) == text
        got_logprobs = [e for c in with_choices for e in ((c["choices"][0].get("logprobs") or {}).get("content")
                                                         or [])]
        assert got_logprobs == expected_logprobs
        assert {c["service_tier"] for c in chunks} == {"default"}
        assert {c["system_fingerprint"] for c in chunks} == {f"fp_{i}"}
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == billed(mode, i)
    else:
        body = raw.http_response.json()
        assert body["choices"][0]["message"]["content"] == text
        assert body["choices"][0]["logprobs"] == {"content": expected_logprobs, "refusal": None}
        assert body["usage"] == billed(mode, i)  # the details included
        assert body["service_tier"] == "default" and body["system_fingerprint"] == f"fp_{i}"
        details = billed(mode, i)
        assert reply.usage.prompt_tokens_details.cached_tokens == details["prompt_tokens_details"]["cached_tokens"]
        assert reply.usage.completion_tokens_details.reasoning_tokens == \
            details["completion_tokens_details"]["reasoning_tokens"]
    if stream and mode == "passthrough":  # relayed: its headers leave before its usage exists
        assert "x-turngate-billed-tokens" not in raw.headers
    else:
        assert raw.headers["x-turngate-billed-tokens"] == str(billed(mode, i)["total_tokens"])
    # The chosen call's rate-limit headers as they are, its request id under x-upstream-request-id.
    assert raw.headers["x-ratelimit-remaining-requests"] == str(499 - i)
    assert raw.headers["x-ratelimit-remaining-tokens"] == str(90_000 - i)
    assert raw.headers["x-ratelimit-reset-requests"] == "120ms"
    assert raw.headers["openai-processing-ms"] == str(300 + i)
    assert raw.headers["x-upstream-request-id"] == f"req_up{i}"
    assert "openai-organization" not in raw.headers
    # The record: each candidate's own usage, details included, and its call's request id.
    record = sink.records[0]
    assert record.chosen.usage == usage(i) and record.chosen.upstream_request_id == f"req_up{i}"
    calls = {int(c.upstream_request_id.removeprefix("req_up")): c for c in record.candidates}
    assert all(c.usage == usage(k) for k, c in calls.items())
    assert len(calls) == (1 if mode == "passthrough" else 4)
    assert record.completion_tokens == sum(40 + k for k in calls)
    assert all(c.logprobs is None for c in record.candidates)  # the route did not ask to keep them


@pytest.mark.parametrize("mode, stream", [("rank", False), ("rank", True), ("passthrough", True)])
def test_a_route_that_keeps_logprobs_records_them_without_sending_them(gateway, scripted, actor, mode, stream):
    scripted.fn = lambda body, i: Reply([assistant(f"candidate {i} says hello")])
    with start(gateway, mode, record_logprobs=True) as (url, sink):
        if stream:
            chunks = [c.to_dict() for c in client(url).chat.completions.create(
                model="gpt-test", messages=USER, stream=True)]
            assert all(not c["choices"][0].get("logprobs") for c in chunks)
        else:
            reply = client(url).chat.completions.create(model="gpt-test", messages=USER)
            assert reply.choices[0].logprobs is None
    assert all(r["logprobs"] is True for r in actor[0].requests)
    for c in sink.records[0].candidates:
        text = c.message["content"]
        assert c.logprobs == {"content": [token_logprob(t, k) for k, t in enumerate(tokens(text))],
                              "refusal": None}


def test_passthrough_streams_chunks_as_the_upstream_sends_them(gateway, scripted, actor):
    words = " ".join(f"word{k}" for k in range(10))
    scripted.fn = lambda body, i: Reply([assistant(words)], chunk_delay_s=0.3, usage=usage(0))
    with gateway(mode="passthrough") as (url, sink):
        started = time.monotonic()
        first = None
        text = ""
        stream = client(url).chat.completions.create(model="gpt-test", messages=USER, stream=True)
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                first = first or time.monotonic() - started
                text += chunk.choices[0].delta.content
            assert chunk.usage is None  # the client did not ask for usage
        total = time.monotonic() - started
    assert text == words
    assert total >= 3.0  # 12 chunks, 0.3 s apart
    assert first < 1.5  # the first word, long before the last (buffered, it came after 3.3 s)
    assert actor[0].requests[0]["stream"] is True
    assert actor[0].requests[0]["stream_options"] == {"include_usage": True}  # turngate counts tokens
    record = sink.records[0]
    assert record.decision == "passthrough" and record.chosen.message == {"role": "assistant", "content": words}
    assert record.chosen.finish_reason == "stop" and record.chosen.usage == usage(0)
    assert record.prompt_tokens == 1200 and record.completion_tokens == 40


def test_a_passthrough_stream_of_tool_calls_is_recorded_whole(gateway, scripted):
    calls = [("get_weather", {"city": "Paris", "unit": "celsius"}), ("get_time", {"tz": "Europe/Paris"})]
    scripted.fn = lambda body, i: Reply([assistant(tool_calls=calls)])
    with gateway(mode="passthrough") as (url, sink):
        stream = client(url).chat.completions.create(model="gpt-test", messages=USER, stream=True)
        args: dict[int, str] = {}
        for chunk in stream:
            for tc in chunk.choices[0].delta.tool_calls or []:
                args[tc.index] = args.get(tc.index, "") + (tc.function.arguments or "")
    assert [json.loads(a) for a in args.values()] == [c[1] for c in calls]
    message = sink.records[0].chosen.message
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in message["tool_calls"]] == calls
    assert sink.records[0].chosen.finish_reason == "tool_calls"


def test_a_client_leaving_a_passthrough_stream_hangs_up_upstream(gateway, scripted, actor):
    scripted.fn = lambda body, i: Reply([assistant(" ".join(["word"] * 40))], chunk_delay_s=0.2)
    with gateway(mode="passthrough") as (url, sink):
        body = {"model": "gpt-test", "messages": USER, "stream": True}
        with httpx.stream("POST", url + "/chat/completions", json=body, timeout=10) as resp:
            for line in resp.iter_lines():
                if "word" in line:
                    break
            started = time.monotonic()
        deadline = time.monotonic() + 5
        while (actor[0].disconnected < 1 or not sink.records) and time.monotonic() < deadline:
            time.sleep(0.05)
    assert actor[0].disconnected == 1 and time.monotonic() - started < 3  # not after the 8 s stream
    assert sink.records[0].decision == "cancelled"


def test_a_passthrough_stream_refused_upstream_gets_its_status(gateway, scripted):
    scripted.fn = lambda body, i: Reply(status=429, headers={"retry-after": "3", "x-ratelimit-remaining-requests": "0"})
    with gateway(mode="passthrough") as (url, sink), pytest.raises(openai.RateLimitError) as info:
        list(client(url).chat.completions.create(model="gpt-test", messages=USER, stream=True))
    headers = info.value.response.headers
    assert headers["retry-after"] == "3" and headers["x-ratelimit-remaining-requests"] == "0"
    assert sink.records[0].decision == "error"


@pytest.mark.parametrize("break_how", ["dropped", "error_event"])
def test_an_upstream_stream_failing_midway_ends_in_an_error_event(gateway, scripted, break_how):
    error = {"message": "The server had an error while processing your request.", "type": "server_error",
             "param": None, "code": None}
    scripted.fn = lambda body, i: Reply([assistant("one two three four five six")], break_after_chunks=3,
                                        stream_error=error if break_how == "error_event" else None)
    with gateway(mode="passthrough") as (url, sink):
        text = ""
        with pytest.raises(openai.APIError) as info:
            for chunk in client(url).chat.completions.create(model="gpt-test", messages=USER, stream=True):
                text += chunk.choices[0].delta.content or ""
    assert not isinstance(info.value, openai.APIConnectionError)  # an event the client reads, not a broken line
    assert text == "one two"
    if break_how == "error_event":
        assert info.value.message == error["message"]
    else:
        assert "upstream" in info.value.message and info.value.code == "upstream_connect"
    record = sink.records[0]
    assert record.decision == "error" and record.error
    assert record.candidates[0].message["content"] == "one two"  # what was relayed before the failure


@pytest.mark.parametrize("keepalive", [5.0, 0.1], ids=["settled", "after_keepalive"])
def test_a_turn_failing_while_its_reply_is_replayed_ends_in_an_error_event(gateway, scripted, keepalive):
    # Every candidate is garbage the structural checks veto; all_vetoed hands back the actor's first
    # reply, whose tool call a stream cannot express: the client must read an error, not a cut line.
    scripted.fn = lambda body, i: Reply([{"role": "assistant", "content": None, "tool_calls": ["not a call"]}],
                                        delay_s=0.3)
    with gateway(settings={"keepalive_interval_s": keepalive}) as (url, _), pytest.raises(openai.APIError) as info:
        list(client(url).chat.completions.create(model="gpt-test", messages=USER, stream=True))
    assert not isinstance(info.value, openai.APIConnectionError)
    assert info.value.body["type"] == "server_error"


CUSTOM_TOOL = {"type": "custom", "custom": {"name": "run_sql", "description": "Run one SQL query",
                                            "format": {"type": "text"}}}
FUNCTION_TOOL = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}


def custom_call(sql: str) -> dict:
    return {"role": "assistant", "content": None,
            "tool_calls": [{"id": "call_sql", "type": "custom", "custom": {"name": "run_sql", "input": sql}}]}


def test_custom_tools_are_forwarded_and_their_calls_gated(gateway, scripted, actor):
    history = USER + [custom_call("select 1"), {"role": "tool", "tool_call_id": "call_sql", "content": "1"}]
    unknown = {"id": "c", "type": "custom", "custom": {"name": "drop_db", "input": ""}}
    scripted.fn = lambda body, i: Reply([custom_call(f"select {i}")] if i % 2 else
                                        [{"role": "assistant", "content": None, "tool_calls": [unknown]}])
    with gateway(critic=TableCritic({"select 3": 0.9})) as (url, sink):
        reply = client(url).chat.completions.create(
            model="gpt-test", messages=history, tools=[CUSTOM_TOOL, FUNCTION_TOOL],
            tool_choice={"type": "custom", "custom": {"name": "run_sql"}})
    call = reply.choices[0].message.tool_calls[0]
    assert call.type == "custom" and call.custom.input == "select 3"
    assert actor[0].requests[0]["tools"] == [CUSTOM_TOOL, FUNCTION_TOOL]
    vetoed = {c.message["tool_calls"][0]["custom"]["name"]: c.veto_reason for c in sink.records[0].candidates}
    assert vetoed == {"drop_db": "unknown_tool", "run_sql": None}


def test_a_custom_tool_call_streams(gateway, scripted):
    scripted.fn = lambda body, i: Reply([custom_call("select 42 from answers")])
    for mode in ("rank", "passthrough"):
        with gateway(mode=mode) as (url, sink):
            stream = client(url).chat.completions.create(model="gpt-test", messages=USER, tools=[CUSTOM_TOOL],
                                                         stream=True)
            got = ""
            for chunk in stream:
                for tc in chunk.to_dict()["choices"][0]["delta"].get("tool_calls") or []:
                    got += (tc.get("custom") or {}).get("input") or ""
        assert got == "select 42 from answers"
        assert sink.records[0].chosen.message["tool_calls"][0]["custom"] == {"name": "run_sql",
                                                                             "input": "select 42 from answers"}


def test_stream_null_is_a_json_reply(gateway, actor):
    with gateway() as (url, _):
        resp = httpx.post(url + "/chat/completions", json={"model": "gpt-test", "messages": USER, "stream": None,
                                                           "stream_options": None})
    assert resp.status_code == 200 and resp.json()["choices"][0]["message"]["content"] == "hi"


def test_a_large_extra_field_of_the_upstream_is_replayed_once_not_on_every_chunk(gateway, scripted):
    """A gated reply asked as a stream is replayed in 64-character pieces; an upstream's large vendor
    field repeated on each piece multiplied the reply by its length (64 KB of each: 67 MB sent)."""
    big, content = "v" * 65536, "w" * 65536
    raw = json.dumps({"id": "x", "object": "chat.completion", "created": 1, "model": "m", "vendor": big,
                      "system_fingerprint": "fp_1", "choices": [{"index": 0, "finish_reason": "stop", "message": {
                          "role": "assistant", "content": content}}]})
    scripted.fn = lambda body, i: Reply(raw=raw)
    with start(gateway, "rank") as (url, _):
        resp = httpx.post(url + "/chat/completions", json={"model": "gpt-test", "messages": USER, "stream": True},
                          headers={"authorization": "Bearer sk-test"}, timeout=60)
    assert resp.status_code == 200 and len(resp.content) < 2_000_000
    chunks = [json.loads(line[6:]) for line in resp.text.split("\n") if line.startswith("data: {")]
    assert chunks[0]["vendor"] == big and all("vendor" not in c for c in chunks[1:])
    assert {c["system_fingerprint"] for c in chunks} == {"fp_1"}
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]) == content
