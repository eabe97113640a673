"""Replies no well-behaved upstream sends (nesting thousands deep, lone surrogates, bodies of many
megabytes) still end as a clear answer: a 502 in OpenAI's error format, or the reply relayed, and
the turn recorded either way. Never a 500, never the process's memory."""

from __future__ import annotations

import json

import openai
import pytest

from service.demo.fake_actor import Reply

USER = [{"role": "user", "content": "hi"}]


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key="sk-client", max_retries=0)


def reply_with(message: str) -> str:
    return ('{"id": "x", "object": "chat.completion", "model": "m", "choices": [{"index": 0, '
            f'"finish_reason": "stop", "message": {message}}}]}}')


def nested_reply(depth: int) -> str:
    return reply_with(f'{{"role": "assistant", "content": "x", "x": {"[" * depth + "]" * depth}}}')


@pytest.mark.parametrize("mode", ["passthrough", "rank"])
def test_a_reply_nested_as_deep_as_the_parser_reads_is_relayed(gateway, scripted, mode):
    scripted.fn = lambda body, i: Reply(raw=nested_reply(300))
    with gateway(mode=mode) as (url, sink):
        resp = client(url).chat.completions.with_raw_response.create(model="gpt-test", messages=USER)
    assert resp.http_response.status_code == 200
    x = json.loads(resp.http_response.content)["choices"][0]["message"]["x"]
    for _ in range(299):
        x = x[0]
    assert x == []
    assert sink.records[0].error is None


@pytest.mark.parametrize("depth", [2_000, 100_000])
@pytest.mark.parametrize("mode", ["passthrough", "rank"])
def test_a_reply_nested_deeper_than_the_parser_reads_is_a_502(gateway, scripted, depth, mode):
    scripted.fn = lambda body, i: Reply(raw=nested_reply(depth))
    with gateway(mode=mode) as (url, sink), pytest.raises(openai.InternalServerError) as info:
        client(url).chat.completions.create(model="gpt-test", messages=USER)
    assert info.value.status_code == 502 and info.value.code == "upstream_garbage", info.value.response.text
    assert "nested" in info.value.message
    assert sink.records and sink.records[0].decision == "error"


@pytest.mark.parametrize("mode", ["passthrough", "rank"])
def test_a_lone_surrogate_in_a_reply_is_relayed_escaped(gateway, scripted, mode):
    scripted.fn = lambda body, i: Reply(raw=reply_with('{"role": "assistant", "content": "a\\ud800b"}'))
    with gateway(mode=mode) as (url, sink):
        resp = client(url).chat.completions.with_raw_response.create(model="gpt-test", messages=USER)
    assert resp.http_response.status_code == 200
    assert b"\\ud800" in resp.http_response.content  # escaped: the body stays valid UTF-8
    assert json.loads(resp.http_response.content)["choices"][0]["message"]["content"] == "a\ud800b"
    assert sink.records[0].error is None and sink.records[0].decision != "error"


def test_a_reply_over_the_size_limit_is_a_502(gateway, scripted, monkeypatch):
    monkeypatch.setenv("TURNGATE_UPSTREAM_MAX_REPLY_BYTES", str(1 << 20))
    scripted.fn = lambda body, i: Reply(raw=reply_with('{"role": "assistant", "content": "%s"}' % ("y" * (2 << 20))))
    with gateway() as (url, sink), pytest.raises(openai.InternalServerError) as info:
        client(url).chat.completions.create(model="gpt-test", messages=USER)
    assert info.value.status_code == 502 and info.value.code == "upstream_garbage"
    assert "1048576 bytes" in info.value.message
    assert sink.records[0].decision == "error"


@pytest.mark.parametrize("usage", [{"prompt_tokens": -1, "completion_tokens": 3},
                                   {"prompt_tokens": 5, "completion_tokens": 10**400}], ids=["negative", "huge"])
@pytest.mark.parametrize("mode", ["passthrough", "rank"])
def test_token_counts_no_counter_takes_still_answer_and_record_the_turn(gateway, scripted, mode, usage):
    """A Prometheus counter refuses a negative or unbounded increment: the good reply was a 500 (and a
    passthrough stream's turn was never recorded)."""
    scripted.fn = lambda body, i: Reply([{"role": "assistant", "content": "fine"}], usage=usage)
    with gateway(mode=mode) as (url, sink):
        resp = client(url).chat.completions.with_raw_response.create(model="gpt-test", messages=USER)
        assert resp.http_response.status_code == 200
        assert sink.records[-1].error is None and sink.records[-1].candidates
        if mode == "passthrough":
            stream = client(url).chat.completions.create(model="gpt-test", messages=USER, stream=True)
            assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "fine"
            assert len(sink.records) == 2 and sink.records[-1].error is None
