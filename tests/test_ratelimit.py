"""Per-key request limits, in-process and shared by replicas through the real Redis."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import uuid

import httpx
import openai
import pytest
import redis
from openai.types.chat import ChatCompletionMessageParam

from service.app import create_app
from service.demo.fake_actor import serve_in_thread
from service.settings import RouteSettings, Settings
from tests.test_metrics import delta, scrape

USER: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]


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
        # The sliding window: this minute's 3 still weigh in the next one, until 2 of them slid out (<= 80 s).
        assert 0 < int(info.value.response.headers["retry-after"]) <= 80
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


def _limited_app(actor_url: str, redis_url: str, per_minute: int):
    route = RouteSettings(alias="gpt-test", upstream_base_url=actor_url, candidates=1, mode="passthrough")
    return create_app(Settings(routes=[route], redis_url=redis_url, rate_limit_per_minute=per_minute))


def test_a_burst_of_concurrent_requests_is_counted_not_let_through(actor):
    key = f"sk-{uuid.uuid4().hex}"
    with serve_in_thread(_limited_app(actor[1], "redis://127.0.0.1:6379/0", 40)) as base:
        before = scrape(base + "/v1")

        async def burst() -> list[int]:
            limits = httpx.Limits(max_connections=300, max_keepalive_connections=300)
            async with httpx.AsyncClient(base_url=base, limits=limits, timeout=60) as client:
                replies = await asyncio.gather(*[client.post(
                    "/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
                    json={"model": "gpt-test", "messages": USER}) for _ in range(300)])
            return [r.status_code for r in replies]
        statuses = asyncio.run(burst())
        after = scrape(base + "/v1")
    # Redis was up the whole time: exactly the budget passes, whatever the concurrency.
    assert statuses.count(200) == 40 and statuses.count(429) == 260, sorted(set(statuses))
    assert delta(before, after, "turngate_redis_errors_total", op="ratelimit") == 0
    key_id = hashlib.sha256(key.encode()).hexdigest()[:12]
    redis.Redis(host="127.0.0.1", port=6379).delete(*redis.Redis(host="127.0.0.1", port=6379).keys(
        f"turngate:rl:{key_id}:*"))


def test_a_redis_outage_logs_one_warning_per_interval_and_counts_every_error(actor, caplog):
    with serve_in_thread(_limited_app(actor[1], "redis://127.0.0.1:1/0", 1)) as base:
        before = scrape(base + "/v1")
        with caplog.at_level(logging.WARNING, logger="service.limits.ratelimit"):
            for _ in range(20):
                assert ask(base + "/v1", "sk-x").choices[0].message.content == "hi"
        after = scrape(base + "/v1")
    warnings = [r for r in caplog.records if r.name == "service.limits.ratelimit"]
    assert len(warnings) == 1 and "redis" in warnings[0].getMessage().lower()
    assert delta(before, after, "turngate_redis_errors_total", op="ratelimit") == 20


async def test_a_connection_redis_closed_is_retried_not_counted_as_an_outage():
    """Redis closing a pooled connection (a restart, an idle timeout) costs one retry, not a request
    let through unchecked."""
    from prometheus_client import REGISTRY

    from service.limits.ratelimit import RedisLimiter

    limiter = RedisLimiter("redis://127.0.0.1:6379/0", per_minute=2, prefix=f"turngate:test:{uuid.uuid4().hex}",
                           max_connections=1)
    admin = redis.Redis(host="127.0.0.1", port=6379)
    errors = REGISTRY.get_sample_value("turngate_redis_errors_total", {"op": "ratelimit"}) or 0.0
    try:
        assert (await limiter.hit("k")).allowed
        admin.execute_command("CLIENT", "KILL", "ID", await limiter.redis.client_id())  # the pool's one connection
        verdicts = [await limiter.hit("k") for _ in range(2)]
        assert [v.allowed for v in verdicts] == [True, False]  # counted: the third request is over the budget
        assert (REGISTRY.get_sample_value("turngate_redis_errors_total", {"op": "ratelimit"}) or 0.0) == errors
    finally:
        admin.close()
        await limiter.close()


def test_many_live_keys_cost_a_request_what_few_do():
    """Where no keys are issued every bearer is a key: past 10,000 live ones the in-process limiter and
    spend meter rebuilt their whole table on every request (about 1 ms each at 20,000 keys)."""
    import time

    from service.limits.ratelimit import MemoryLimiter
    from service.limits.spend import MemorySpendMeter

    async def cost(keys: int) -> float:
        limiter, meter = MemoryLimiter(per_minute=1000), MemorySpendMeter()
        for i in range(keys):
            await limiter.hit(f"k{i}")
            await meter.charge(f"k{i}", 10)
        started = time.perf_counter()
        for i in range(2000):
            assert (await limiter.hit(f"k{i % keys}")).allowed
            await meter.charge(f"k{i % keys}", 10)
        return time.perf_counter() - started

    few, many = asyncio.run(cost(100)), asyncio.run(cost(20_000))
    assert many < 5 * few + 0.05, (few, many)


def test_the_score_api_counts_against_the_keys_limit(gateway):
    """Scoring runs the critic: the most CPU a request can ask for, limited like a chat request."""
    body = {"messages": USER, "candidates": [{"role": "assistant", "content": "hello"}]}
    with gateway(settings={"rate_limit_per_minute": 2}, candidates=1) as (url, _):
        ask(url, "sk-a")
        assert httpx.post(url + "/critic/score", json=body, headers={"authorization": "Bearer sk-a"}).status_code == 200
        refused = httpx.post(url + "/critic/score", json=body, headers={"authorization": "Bearer sk-a"})
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "rate_limit_exceeded"
        assert httpx.post(url + "/critic/score", json=body, headers={"authorization": "Bearer sk-b"}).status_code == 200
