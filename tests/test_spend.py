"""Token spend per client key and the turn's cost as the client sees it, through the openai client:
a rank reply's usage is every call billed (usage.chosen the chosen call's); tokens-per-minute limits
and token budgets answer 429, in-process and shared by replicas through the real Redis; an outage of
Redis lets requests through and is counted.

Issued keys (service.control) are not built here: the client-key dependency is overridden to give a
bearer key its KeyPolicy, which is all the enforcement reads."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import openai
import pytest
from fastapi import Request

from service.api.deps import ClientKey, client_key
from service.api.forwarded_usage import Tap
from service.app import create_app
from service.control.key_policy import KeyPolicy
from service.demo.fake_actor import Reply, assistant, serve_in_thread
from service.limits.spend import MemorySpendMeter, RedisSpendMeter, SpendMeter, period_of
from service.settings import RouteSettings, Settings
from service.store.base import MemorySink
from tests.conftest import TableCritic
from tests.test_metrics import delta, scrape

REDIS = "redis://127.0.0.1:6379/0"
USER: Any = [{"role": "user", "content": "What is the capital of France?"}]
CHOSEN = 2  # the critic prefers the third candidate
PER_CALL = 15  # the fake actor's default usage: 10 prompt + 5 completion tokens a call


def usage(i: int) -> dict:
    return {"prompt_tokens": 1000 + i, "completion_tokens": 40 + i, "total_tokens": 1040 + 2 * i,
            "prompt_tokens_details": {"cached_tokens": 128, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 16 + i, "audio_tokens": 0}}


def summed(calls: range) -> dict:
    return {"prompt_tokens": sum(1000 + i for i in calls), "completion_tokens": sum(40 + i for i in calls),
            "total_tokens": sum(1040 + 2 * i for i in calls),
            "prompt_tokens_details": {"cached_tokens": 128 * len(calls), "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": sum(16 + i for i in calls), "audio_tokens": 0}}


def per_call(body, i) -> Reply:
    return Reply([assistant(f"Paris, said candidate {i % 4}.")], usage=usage(i))  # i: the call, 0.. for the test


def client(url: str, key: str = "sk-test") -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key=key, max_retries=0)


def ask(url: str, key: str = "sk-test", **kw):
    return client(url, key).chat.completions.with_raw_response.create(model="gpt-test", messages=USER, **kw)


def with_policies(app, policies: dict[str, KeyPolicy]) -> None:
    """Bearer key -> its policy, as issued keys will be looked up (the key's id is its key_id)."""
    async def issued(request: Request) -> ClientKey:
        key = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        policy = policies.get(key)
        return ClientKey(key, policy.id if policy else key[:12], policy)

    app.dependency_overrides[client_key] = issued


@contextmanager
def serve(actor_url: str, meter: SpendMeter | None = None, policies: dict[str, KeyPolicy] | None = None,
          critic=None, settings: dict[str, Any] | None = None, **route: Any) -> Iterator[tuple[str, MemorySink]]:
    cfg = Settings(routes=[RouteSettings(**{"alias": "gpt-test", "upstream_base_url": actor_url,
                                            "upstream_model": "actor-model", "candidates": 4, "mode": "rank",
                                            "attempt_timeout_s": 5, "deadline_s": 10, **route})],
                   **(settings or {}))
    sink = MemorySink()
    app = create_app(cfg, critic=critic or TableCritic({f"candidate {CHOSEN}": 0.9}), sink=sink, spend=meter)
    with_policies(app, policies or {})
    with serve_in_thread(app) as url:
        yield url + "/v1", sink


@pytest.fixture(params=["memory", "redis"])
def meters(request) -> Callable[..., SpendMeter]:
    """meters(window_s) -> a meter; with Redis, every call gives another meter (another replica)
    over the same counters, under a prefix of this test's own."""
    prefix = f"turngate:spend:test-{uuid.uuid4().hex}"
    made: list[MemorySpendMeter] = []

    def make(window_s: float = 60.0) -> SpendMeter:
        if request.param == "redis":
            return RedisSpendMeter(REDIS, window_s=window_s, slots=4, prefix=prefix)
        if not made:
            made.append(MemorySpendMeter(window_s=window_s, slots=4))
        return made[0]

    return make


def read(meter: SpendMeter, key_id: str, period: Any = "day"):
    async def go():
        try:
            return await meter.read(key_id, period)
        finally:
            if isinstance(meter, RedisSpendMeter):
                await meter.close()
    return asyncio.run(go())


def wait_spent(make: Callable[..., SpendMeter], key_id: str, tokens: int) -> None:
    """Until the meter shows the key's spend: turns are charged after their reply."""
    give_up = time.monotonic() + 5
    while (reading := read(make(), key_id)) is None or reading.spent < tokens:
        assert time.monotonic() < give_up, f"{key_id} spent {reading and reading.spent}, not {tokens}"
        time.sleep(0.02)
    assert reading.spent == tokens


# -- the cost of a turn, as the client sees it ------------------------------------------------------------

@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_a_rank_reply_reports_every_call_it_billed(actor, scripted, stream):
    scripted.fn = per_call
    with serve(actor[1]) as (url, sink):
        if stream:
            raw = ask(url, stream=True, stream_options={"include_usage": True})
            chunks = list(raw.parse())
            assert all(c.usage is None for c in chunks[:-1])
            got = chunks[-1].usage
        else:
            raw = ask(url)
            got = raw.parse().usage
            assert raw.parse().choices[0].message.content == f"Paris, said candidate {CHOSEN}."
    billed = summed(range(4))
    assert got.prompt_tokens == billed["prompt_tokens"] and got.completion_tokens == billed["completion_tokens"]
    assert got.total_tokens == billed["total_tokens"]
    assert got.prompt_tokens_details.cached_tokens == 4 * 128  # the details summed too
    assert got.completion_tokens_details.reasoning_tokens == sum(16 + i for i in range(4))
    assert got.to_dict() == {**billed, "chosen": usage(CHOSEN), "candidates": 4}  # the SDK keeps the extras
    assert raw.headers["x-turngate-billed-tokens"] == str(billed["total_tokens"])
    record = sink.records[0]
    assert record.prompt_tokens + record.completion_tokens == billed["total_tokens"]


def test_usage_reported_chosen_restores_the_chosen_calls_usage(actor, scripted):
    scripted.fn = per_call
    with serve(actor[1], usage_reported="chosen") as (url, _):
        raw = ask(url)
        streamed = list(ask(url, stream=True, stream_options={"include_usage": True}).parse())
    assert raw.http_response.json()["usage"] == usage(CHOSEN)
    assert streamed[-1].usage.to_dict() == usage(4 + CHOSEN)  # the second turn's calls are 4..7
    assert raw.headers["x-turngate-billed-tokens"] == str(summed(range(4))["total_tokens"])  # still told


def test_an_upstream_that_takes_n_bills_one_call(actor, scripted):
    scripted.fn = lambda body, i: Reply([assistant(f"Paris, said candidate {k}.") for k in range(body["n"])],
                                        usage=usage(0))
    with serve(actor[1], upstream_supports_n=True) as (url, _):
        got = ask(url).parse().usage
    assert got.to_dict() == {**usage(0), "chosen": usage(0), "candidates": 4}


def test_an_intervention_round_is_billed_and_charged(actor, scripted):
    """N=4, one intervention round: 8 calls in the reply's usage and in the key's spend."""
    def replies(body, i):
        retried = any(m["role"] == "system" for m in body["messages"])  # the critic's feedback
        return Reply([assistant(("better" if retried else "weak") + f" answer {i}")], usage=usage(i))

    scripted.fn = replies
    meter = MemorySpendMeter()
    policy = KeyPolicy(id="key-rounds", name="rounds", budget_tokens=10**9, budget_period="day")
    with serve(actor[1], meter, {"sk-rounds": policy}, critic=TableCritic({"better": 0.9, "weak": 0.1}),
               policy={"intervene_threshold": 0.5, "max_interventions": 1}) as (url, sink):
        raw = ask(url, "sk-rounds")
        wait_spent(lambda: meter, "key-rounds", summed(range(8))["total_tokens"])
    assert raw.headers["x-turngate-decision"] == "intervened" and raw.headers["x-turngate-rounds"] == "2"
    got = raw.parse().usage
    assert got.total_tokens == summed(range(8))["total_tokens"] and got.candidates == 8
    assert len(actor[0].requests) == 8
    record = sink.records[0]
    assert record.prompt_tokens + record.completion_tokens == summed(range(8))["total_tokens"]


def test_a_shadow_reply_reports_the_calls_it_waited_for_and_the_key_is_charged_all(actor, scripted):
    scripted.fn = per_call
    meter = MemorySpendMeter()
    policy = KeyPolicy(id="key-shadow", name="shadow", budget_tokens=10**9, budget_period="day")
    with serve(actor[1], meter, {"sk-shadow": policy}, mode="shadow") as (url, _):
        raw = ask(url, "sk-shadow")
        give_up = time.monotonic() + 5
        while read(meter, "key-shadow").spent < sum(1040 + 2 * i for i in range(4)):
            assert time.monotonic() < give_up
            time.sleep(0.02)
    got = raw.parse().usage
    assert got.candidates == 1 and got.total_tokens == got.chosen["total_tokens"]  # the first call's
    assert read(meter, "key-shadow").spent == sum(1040 + 2 * i for i in range(4))  # all four


def test_passthrough_usage_is_the_upstreams_and_its_stream_is_charged(actor, scripted):
    scripted.fn = per_call
    meter = MemorySpendMeter()
    policy = KeyPolicy(id="key-pass", name="pass", budget_tokens=10**9, budget_period="month")
    with serve(actor[1], meter, {"sk-pass": policy}, mode="passthrough") as (url, _):
        raw = ask(url, "sk-pass")
        assert raw.http_response.json()["usage"] == usage(0)  # one call: as the upstream sent it
        assert raw.headers["x-turngate-billed-tokens"] == "1040"
        chunks = list(ask(url, "sk-pass", stream=True, stream_options={"include_usage": True}).parse())
        assert chunks[-1].usage.to_dict() == usage(1)
        give_up = time.monotonic() + 5
        while read(meter, "key-pass", "month").spent < 1040 + 1042:
            assert time.monotonic() < give_up
            time.sleep(0.02)
    assert read(meter, "key-pass", "month").spent == 1040 + 1042


# -- budgets and tokens per minute ------------------------------------------------------------------------

def test_a_key_over_its_budget_gets_429_and_another_key_does_not(actor, meters):
    spender = KeyPolicy(id=f"key-{uuid.uuid4().hex[:8]}", name="spender", budget_tokens=100, budget_period="day")
    other = KeyPolicy(id=f"key-{uuid.uuid4().hex[:8]}", name="other", budget_tokens=100, budget_period="day")
    with serve(actor[1], meters(), {"sk-spender": spender, "sk-other": other}) as (url, _):
        ask(url, "sk-spender")  # 4 calls, 60 tokens
        wait_spent(meters, spender.id, 60)
        ask(url, "sk-spender")  # under budget when it started: served, and the budget overshot
        wait_spent(meters, spender.id, 120)
        with pytest.raises(openai.RateLimitError) as info:
            ask(url, "sk-spender")
        ask(url, "sk-other")
    error = info.value
    assert error.status_code == 429 and error.code == "budget_exceeded" and error.type == "insufficient_quota"
    _, resets = period_of("day", time.time())
    assert "for the day (120 of 100 tokens)" in error.message
    assert f"resets at {resets.strftime('%Y-%m-%dT%H:%M:%SZ')}" in error.message
    assert 0 < int(error.response.headers["retry-after"]) <= 86_400
    assert error.response.headers["x-should-retry"] == "false"  # OpenAI's SDKs do not retry it


def test_the_budget_holds_for_the_forwarded_endpoints_too(actor, meters):
    policy = KeyPolicy(id=f"key-{uuid.uuid4().hex[:8]}", name="embedder", budget_tokens=5, budget_period="month")
    with serve(actor[1], meters(), {"sk-embed": policy}) as (url, _):
        embed = client(url, "sk-embed").embeddings
        embed.create(model="gpt-test", input="one")  # the fake reports 3 tokens
        give_up = time.monotonic() + 5
        while (reading := read(meters(), policy.id, "month")) is None or reading.spent < 3:
            assert time.monotonic() < give_up
            time.sleep(0.02)
        embed.create(model="gpt-test", input="two")
        while read(meters(), policy.id, "month").spent < 6:
            assert time.monotonic() < give_up
            time.sleep(0.02)
        with pytest.raises(openai.RateLimitError) as info:
            embed.create(model="gpt-test", input="three")
    assert info.value.code == "budget_exceeded" and "for the month" in info.value.message


def test_tokens_per_minute_429_then_the_window_moves_on(actor, meters):
    window = 2.0
    policy = KeyPolicy(id=f"key-{uuid.uuid4().hex[:8]}", name="fast", tpm=100)
    with serve(actor[1], meters(window), {"sk-fast": policy}) as (url, _):
        ask(url, "sk-fast")
        ask(url, "sk-fast")  # 60 tokens seen: still under 100
        give_up = time.monotonic() + 5
        while (reading := read(meters(window), policy.id, None)) is None or reading.tpm_used < 120:
            assert time.monotonic() < give_up
            time.sleep(0.02)
        refused_at = time.monotonic()
        with pytest.raises(openai.RateLimitError) as info:
            ask(url, "sk-fast")
        assert info.value.code == "tokens_per_minute_exceeded" and "(120 of 100 tokens" in info.value.message
        retry = int(info.value.response.headers["retry-after"])
        assert 1 <= retry <= window
        time.sleep(max(0.0, refused_at + retry + 0.1 - time.monotonic()))
        ask(url, "sk-fast")  # the window moved on


def test_two_replicas_sharing_redis_see_one_budget(actor):
    prefix = f"turngate:spend:test-{uuid.uuid4().hex}"
    policy = KeyPolicy(id=f"key-{uuid.uuid4().hex[:8]}", name="shared", budget_tokens=100, budget_period="day")
    policies = {"sk-shared": policy}

    def replica() -> RedisSpendMeter:
        return RedisSpendMeter(REDIS, prefix=prefix)

    with serve(actor[1], replica(), policies) as (a, _), serve(actor[1], replica(), policies) as (b, _):
        ask(a, "sk-shared")
        wait_spent(replica, policy.id, 60)
        ask(b, "sk-shared")  # b sees a's 60 and serves; 120 now
        wait_spent(replica, policy.id, 120)
        for url in (a, b):
            with pytest.raises(openai.RateLimitError) as info:
                ask(url, "sk-shared")
            assert info.value.code == "budget_exceeded"


def test_redis_down_lets_requests_through_and_counts_the_errors(actor, scripted):
    policy = KeyPolicy(id="key-outage", name="outage", tpm=1, budget_tokens=1, budget_period="day")
    meter = RedisSpendMeter("redis://127.0.0.1:1/0")
    with serve(actor[1], meter, {"sk-outage": policy}) as (url, _):
        before = scrape(url)
        for _ in range(3):
            assert ask(url, "sk-outage").parse().choices[0].message.content
        give_up = time.monotonic() + 5
        # Each request: one failed read before it, one failed charge after it.
        while delta(before, scrape(url), "turngate_redis_errors_total", op="spend") < 6:
            assert time.monotonic() < give_up
            time.sleep(0.05)


def test_a_forwarded_stream_is_charged_what_its_usage_event_says():
    completed = {"type": "response.completed", "response": {"id": "resp_1", "status": "completed",
                                                            "usage": {"input_tokens": 30, "output_tokens": 12,
                                                                      "total_tokens": 42}}}
    created = {"type": "response.created", "response": {"id": "resp_1", "usage": None}}
    stream = (f"event: response.created\ndata: {json.dumps(created)}\n\n"
              f"event: response.completed\r\ndata: {json.dumps(completed)}\r\n\r\n").encode()
    tap = Tap()
    for k in range(0, len(stream), 7):  # the events cut anywhere, as the network delivers them
        tap.feed(stream[k:k + 7])
    assert tap.tokens == 42


def test_keys_without_a_policy_leave_nothing_in_the_meter(actor, meters):
    """Nothing reads the spend of a key that has no policy (only issued keys have budgets and an
    admin view), and in open mode every new bearer would add counters that live for the rest of its
    day and month: a client rotating keys would grow the process (or Redis) without bound. So only
    issued keys are charged; the others are not limited either."""
    meter = meters()
    issued = KeyPolicy(id="key_issued", name="issued")
    with serve(actor[1], meter, policies={"sk-issued": issued}) as (url, _):
        for i in range(20):
            ask(url, f"sk-rotated-{i}")
        ask(url, "sk-issued")
        wait_spent(meters, "key_issued", 60)  # 4 calls of 15 tokens: the issued key was charged
    for i in range(20):
        assert read(meters(), f"sk-rotated-{i}"[:12]).spent == 0
    if isinstance(meter, RedisSpendMeter):
        async def keys() -> list[bytes]:
            try:
                return [k async for k in meter.redis.scan_iter(match=meter.prefix + ":*")]
            finally:
                await meter.close()
        assert all(b"key_issued" in k for k in asyncio.run(keys()))


def test_budget_periods_are_calendar_periods_in_utc():
    december = datetime(2026, 12, 31, 23, 59, 59, tzinfo=UTC).timestamp()
    assert period_of("day", december) == ("2026-12-31", datetime(2027, 1, 1, tzinfo=UTC))
    assert period_of("month", december) == ("2026-12", datetime(2027, 1, 1, tzinfo=UTC))
    assert period_of("month", datetime(2027, 1, 31, 12, tzinfo=UTC).timestamp()) == \
        ("2027-01", datetime(2027, 2, 1, tzinfo=UTC))
