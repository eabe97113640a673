"""Per-key request limits, in-process and shared by replicas through the real Redis."""

from __future__ import annotations

import hashlib
import uuid

import openai
import pytest
import redis

from service.app import create_app
from service.demo.fake_actor import serve_in_thread
from service.settings import RouteSettings, Settings

USER = [{"role": "user", "content": "hi"}]


def ask(url: str, key: str):
    return openai.OpenAI(base_url=url, api_key=key, max_retries=0).chat.completions.create(
        model="gpt-test", messages=USER)


def test_in_process_limit_per_key(gateway):
    with gateway(settings={"rate_limit_per_minute": 3}, candidates=1) as (url, _):
        for _ in range(3):
            ask(url, "sk-a")
        with pytest.raises(openai.RateLimitError) as info:
            ask(url, "sk-a")
        assert info.value.code == "rate_limit_exceeded"
        assert 0 < int(info.value.response.headers["retry-after"]) <= 60
        ask(url, "sk-b")  # another key has its own budget


def test_replicas_share_one_budget_through_redis(actor):
    client = redis.Redis(host="127.0.0.1", port=6379)
    prefix_key = f"sk-{uuid.uuid4().hex}"  # a key no other test run uses: its counters are its own
    route = RouteSettings(alias="gpt-test", upstream_base_url=actor[1], candidates=1)
    cfg = Settings(routes=[route], redis_url="redis://127.0.0.1:6379/0", rate_limit_per_minute=4)
    with serve_in_thread(create_app(cfg)) as a, serve_in_thread(create_app(cfg)) as b:
        for url in (a, b, a, b):
            ask(url + "/v1", prefix_key)
        for url in (a, b):
            with pytest.raises(openai.RateLimitError):
                ask(url + "/v1", prefix_key)
    key_id = hashlib.sha256(prefix_key.encode()).hexdigest()[:12]
    assert client.delete(*client.keys(f"turngate:rl:{key_id}:*")) >= 1  # only this test's counters


def test_redis_outage_fails_open(actor):
    route = RouteSettings(alias="gpt-test", upstream_base_url=actor[1], candidates=1)
    cfg = Settings(routes=[route], redis_url="redis://127.0.0.1:1/0", rate_limit_per_minute=1)
    with serve_in_thread(create_app(cfg)) as url:
        for _ in range(3):  # over the limit, but the limiter cannot count: agents keep working
            assert ask(url + "/v1", "sk-x").choices[0].message.content == "hi"
