"""/v1/embeddings, /v1/completions and /v1/responses: forwarded to the route's upstream, not gated,
JSON and streams as the upstream answers (the real openai client -> turngate -> the fake actor)."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from service.demo.fake_actor import STREAM_WORDS


def client(url: str, key: str = "sk-client") -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key=key, max_retries=0)


def test_embeddings(gateway, actor):
    with gateway() as (url, sink):
        result = client(url).embeddings.create(model="gpt-test", input=["hello", "hi"])
    assert [d.embedding for d in result.data] == [[5.0, 0.0, 0.5], [2.0, 1.0, 0.5]]
    endpoint, body, headers = actor[0].forwarded[0]
    assert endpoint == "embeddings" and body["model"] == "actor-model"  # the route's upstream model
    assert body["input"] == ["hello", "hi"]
    assert headers["authorization"] == "Bearer sk-client"  # no route key: the client's own
    assert sink.records == []  # not a turn: nothing to rank, nothing stored


def test_completions_json_and_the_routes_own_key(gateway, actor):
    with gateway(upstream_api_key="sk-route-own-key") as (url, _):
        result = client(url).completions.create(model="gpt-test", prompt="Say something", max_tokens=5)
    assert result.choices[0].text == "fake text"
    _, body, headers = actor[0].forwarded[0]
    assert body["prompt"] == "Say something" and body["max_tokens"] == 5
    assert headers["authorization"] == "Bearer sk-route-own-key"


def test_completion_stream_is_relayed_as_it_arrives(gateway, actor):
    actor[0].stream_gap_s = 0.6
    with gateway() as (url, _):
        arrivals = []
        for chunk in client(url).completions.create(model="gpt-test", prompt="count", stream=True):
            arrivals.append((time.monotonic(), chunk.choices[0].text))
    assert "".join(text for _, text in arrivals) == "".join(STREAM_WORDS)
    # Buffered, every chunk would arrive at once after the upstream's 1.8 s; relayed, they are spread.
    assert arrivals[-1][0] - arrivals[0][0] > 1.2


def test_responses_json_and_stream(gateway, actor):
    actor[0].stream_gap_s = 0.4
    with gateway(alias="*", upstream_model=None, mode="passthrough") as (url, _):
        assert client(url).responses.create(model="o-any", input="hi").output_text == "fake text"
        events = [(time.monotonic(), e) for e in client(url).responses.create(model="o-any", input="hi", stream=True)]
    assert [e.type for _, e in events] == ["response.created"] + ["response.output_text.delta"] * 3 + \
        ["response.completed"]
    assert "".join(e.delta for _, e in events if e.type == "response.output_text.delta") == "".join(STREAM_WORDS)
    assert events[-1][0] - events[0][0] > 1.0
    assert [b["model"] for _, b, _ in actor[0].forwarded] == ["o-any", "o-any"]  # the catch-all: as asked


def test_refusals_in_openais_envelope(gateway, actor):
    with gateway() as (url, _):
        with pytest.raises(openai.NotFoundError) as info:
            client(url).embeddings.create(model="no-such-model", input="x")
        assert info.value.code == "model_not_found"
        missing = httpx.post(url + "/completions", json={"prompt": "x"})
        assert missing.status_code == 400 and missing.json()["error"]["param"] == "model"
        broken = httpx.post(url + "/responses", content=b"[1, 2", headers={"content-type": "application/json"})
        assert broken.status_code == 400 and broken.json()["error"]["code"] == "invalid_json"
        actor[0].forwarded_status = 429
        with pytest.raises(openai.RateLimitError) as limited:
            client(url).completions.create(model="gpt-test", prompt="x")
        assert limited.value.response.headers["retry-after"] == "3"
        actor[0].forwarded_status = 400
        with pytest.raises(openai.BadRequestError) as refused:
            client(url).embeddings.create(model="gpt-test", input="x")
        assert refused.value.code == "fake_error" and "fake actor error 400" in refused.value.message
        actor[0].forwarded_status = 401
        with pytest.raises(openai.AuthenticationError):  # the client's own key, refused upstream: theirs
            client(url).embeddings.create(model="gpt-test", input="x")
    with gateway(upstream_api_key="sk-route-own-key") as (url, _):
        with pytest.raises(openai.InternalServerError) as ours:  # the route's key refused: turngate's fault
            client(url).embeddings.create(model="gpt-test", input="x")
        assert ours.value.status_code == 502 and ours.value.code == "upstream_auth"


def test_unreachable_upstream_is_502(gateway):
    with gateway(upstream_base_url="http://127.0.0.1:1/v1") as (url, _), \
            pytest.raises(openai.InternalServerError) as info:
        client(url).embeddings.create(model="gpt-test", input="x")
    assert info.value.status_code == 502 and info.value.code == "upstream_connect"


def test_client_keys_and_rate_limits_apply(gateway):
    with gateway(settings={"api_keys": "sk-allowed-1"}) as (url, _):
        with pytest.raises(openai.AuthenticationError):
            client(url, "sk-wrong").embeddings.create(model="gpt-test", input="x")
        assert client(url, "sk-allowed-1").embeddings.create(model="gpt-test", input="x").data
