"""Streams no well-behaved upstream sends: endless ones, one event that never ends, a reply in a
million tiny deltas, a huge error body. Each ends in bounded memory and time, with a clear error in
OpenAI's format where the client can still be told, and the service keeps serving everyone else.

The parsers are also timed on their own: before, each piece re-scanned (and copied) everything
buffered so far, and each delta re-copied the text so far, so a stream cost the square of its length
in event-loop time (8 MiB in 4 KiB pieces: 19 s of a stalled loop)."""

from __future__ import annotations

import itertools
import json
import time

import openai
import pytest

from service.api.forwarded_usage import Tap
from service.demo.fake_actor import Reply
from service.upstream.streaming import MAX_EVENT_BYTES, Assembler, Decoder, StreamGarbage

USER = [{"role": "user", "content": "hi"}]
LIMIT = 256 * 1024  # TURNGATE_UPSTREAM_MAX_REPLY_BYTES in these tests


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key="sk-client", max_retries=0)


def chunk(text: str) -> bytes:
    body = {"id": "c", "object": "chat.completion.chunk", "model": "m",
            "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]}
    return b"data: " + json.dumps(body).encode() + b"\n\n"


def endless_chunks():
    return itertools.repeat(chunk("x" * 1000))


def assert_hung_up(fake) -> None:
    """The upstream's endless stream stopped: turngate closed the connection (what it had sent by
    then is at most the limit plus what the loopback's socket buffers hold)."""
    deadline = time.monotonic() + 10
    while True:
        sent = fake.raw_bytes_sent
        time.sleep(0.5)
        if fake.raw_bytes_sent == sent or time.monotonic() > deadline:
            break
    assert fake.raw_bytes_sent == sent and sent < 32 * LIMIT + (16 << 20)


# -- the parsers alone: linear in what arrives ----------------------------------------------------

def test_one_event_arriving_in_small_pieces_is_read_in_linear_time():
    decoder, piece = Decoder(), b"x" * 4096
    start = time.process_time()
    with pytest.raises(StreamGarbage, match="an event over"):
        decoder.feed(b"data: ")
        for _ in range(MAX_EVENT_BYTES // len(piece) + 1):
            decoder.feed(piece)
    assert time.process_time() - start < 1.0  # 19 s before


def test_events_split_anywhere_decode_as_sent():
    events = b"data: {\"a\": 1}\r\n\r\n: keepalive\n\ndata: {\"b\":\r\ndata: 2}\r\n\r\ndata: [DONE]\n\n"
    whole = Decoder().feed(events)
    for size in (1, 2, 3, 7):
        decoder, got = Decoder(), []
        for i in range(0, len(events), size):
            got += decoder.feed(events[i:i + size])
        got += decoder.close()
        assert [(e.raw, e.data, e.done) for e in got] == [(e.raw, e.data, e.done) for e in whole]
    assert [e.data for e in whole] == [{"a": 1}, None, {"b": 2}, None] and whole[-1].done


def test_a_reply_in_many_tiny_deltas_is_assembled_in_linear_time():
    assembler, n = Assembler(), 300_000
    start = time.process_time()
    for _ in range(n):
        assembler.add({"choices": [{"index": 0, "delta": {"content": "abcd", "tool_calls": [
            {"index": 0, "function": {"arguments": "ab"}}]},
            "logprobs": {"content": [{"token": "abcd", "logprob": -0.1}]}}]})
    choice = assembler.body()["choices"][0]
    assert time.process_time() - start < 5.0  # minutes before
    assert choice["message"]["content"] == "abcd" * n
    assert choice["message"]["tool_calls"][0]["function"]["arguments"] == "ab" * n
    assert len(choice["logprobs"]["content"]) == n


def test_assembled_text_fields_keep_their_order_and_replacements():
    assembler = Assembler()
    for delta in ({"role": "assistant", "content": "a"}, {"refusal": "r"}, {"content": "b"},
                  {"reasoning": {"x": 1}}, {"reasoning": "t"}, {"audio": {"id": "1"}}):
        assembler.add({"choices": [{"index": 0, "delta": delta}]})
    assert assembler.body()["choices"][0]["message"] == {
        "role": "assistant", "content": "ab", "refusal": "r", "reasoning": "t", "audio": {"id": "1"}}


def test_a_forwarded_stream_without_event_ends_is_watched_in_linear_time():
    tap = Tap()
    start = time.process_time()
    for _ in range(2560):  # 10 MiB in 4 KiB pieces
        tap.feed(b"x" * 4096)
    tap.feed(b'\n\ndata: {"usage": {"total_tokens": 7}}\n\n')
    assert time.process_time() - start < 1.0  # 11 s before
    assert tap.tokens == 7


# -- through the service ---------------------------------------------------------------------------

@pytest.fixture
def limited(monkeypatch):
    monkeypatch.setenv("TURNGATE_UPSTREAM_MAX_REPLY_BYTES", str(LIMIT))


def test_an_endless_chat_stream_is_cut_at_the_size_limit(gateway, scripted, actor, limited):
    scripted.fn = lambda body, i: Reply(raw_pieces=endless_chunks())
    with gateway(mode="passthrough") as (url, sink), pytest.raises(openai.APIError) as info:
        for _ in client(url).chat.completions.create(model="gpt-test", messages=USER, stream=True):
            pass
    assert info.value.code == "upstream_garbage" and f"{LIMIT} bytes" in info.value.message
    record = sink.records[0]
    assert record.decision == "error" and f"{LIMIT} bytes" in record.error
    assert record.candidates[0].message["content"].startswith("x" * 1000)  # what came is kept
    assert_hung_up(actor[0])


@pytest.mark.parametrize("mode", ["passthrough", "rank"])
def test_a_huge_error_body_of_a_stream_request_is_a_502(gateway, scripted, limited, mode):
    error = json.dumps({"error": {"message": "no" * LIMIT}})
    scripted.fn = lambda body, i: Reply(raw=error, status=400)
    with gateway(mode=mode) as (url, _), pytest.raises(openai.APIError) as info:
        for _ in client(url).chat.completions.create(model="gpt-test", messages=USER, stream=True):
            pass
    assert info.value.code == "upstream_garbage" and f"{LIMIT} bytes" in info.value.message


def test_a_forwarded_reply_over_the_size_limit_is_a_502(gateway, actor, limited):
    actor[0].forwarded_reply = Reply(raw=json.dumps({"data": [{"embedding": [0.5] * LIMIT}]}))
    with gateway() as (url, _), pytest.raises(openai.InternalServerError) as info:
        client(url).embeddings.create(model="gpt-test", input="hi")
    assert info.value.status_code == 502 and info.value.code == "upstream_garbage"
    assert f"{LIMIT} bytes" in info.value.message


def test_a_forwarded_error_body_over_the_size_limit_is_a_502(gateway, actor, limited):
    actor[0].forwarded_reply = Reply(raw=json.dumps({"error": {"message": "no" * LIMIT}}), status=400)
    with gateway() as (url, _), pytest.raises(openai.InternalServerError) as info:
        client(url).embeddings.create(model="gpt-test", input="hi")
    assert info.value.status_code == 502 and info.value.code == "upstream_garbage"


def test_an_endless_forwarded_stream_is_cut_at_the_size_limit(gateway, actor, limited):
    event = b'data: {"id": "c", "object": "text_completion", "choices": [{"index": 0, "text": "' + \
        b"x" * 1000 + b'", "finish_reason": null}]}\n\n'
    actor[0].forwarded_reply = Reply(raw_pieces=itertools.repeat(event))
    with gateway() as (url, _), pytest.raises(openai.APIError) as info:
        for _ in client(url).completions.create(model="gpt-test", prompt="count", stream=True):
            pass
    assert info.value.code == "upstream_garbage" and f"{LIMIT} bytes" in info.value.message
    assert_hung_up(actor[0])


def test_a_streamed_tool_call_nested_too_deep_to_assemble_still_records_the_turn(gateway, scripted):
    """Assembling the reply for the record recursed past Python's limit; the error escaped before the
    turn was handed to the store, so it was in neither the database, the journal nor the quarantine."""
    nested = '{"x":' * 600 + "1" + "}" * 600
    event = ('{"id":"c","object":"chat.completion.chunk","model":"m","choices":[{"index":0,"delta":{"role":'
             '"assistant","tool_calls":[{"index":0,"id":"call_0","type":"function","function":{"name":"f",'
             '"arguments":"{}","meta":' + nested + '}}]},"finish_reason":null}]}')
    scripted.fn = lambda body, i: Reply(raw_pieces=[b"data: " + event.encode() + b"\n\n", b"data: [DONE]\n\n"])
    with gateway(mode="passthrough") as (url, sink):
        stream = client(url).chat.completions.create(model="gpt-test", messages=USER, stream=True)
        assert [c.choices[0].delta.tool_calls[0].function.name for c in stream if c.choices] == ["f"]
        deadline = time.monotonic() + 5
        while not sink.records and time.monotonic() < deadline:
            time.sleep(0.02)
    assert len(sink.records) == 1 and sink.records[0].candidates == []
