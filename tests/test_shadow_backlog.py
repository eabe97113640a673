"""Shadow mode's background ranking is bounded: beyond `shadow_max_backlog` turns in the background,
a shadow turn is shed (one upstream call, recorded unscored, counted), and no reply waits for it."""

from __future__ import annotations

import asyncio
import time

import openai
from openai.types.chat import ChatCompletionMessageParam

from service.demo.fake_actor import Reply, assistant
from tests.conftest import TableCritic
from tests.test_metrics import delta, scrape
from tests.test_metrics_serve import total

USER: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Refund order 7."}]


class SlowCritic(TableCritic):
    """Takes `seconds` per scoring (off the event loop, as the ONNX critic does)."""

    def __init__(self, seconds: float) -> None:
        super().__init__({})
        self.seconds = seconds

    async def score(self, messages, candidates, tools=None):
        await asyncio.to_thread(time.sleep, self.seconds)
        return await super().score(messages, candidates, tools)


def test_a_full_backlog_sheds_shadow_turns_and_every_turn_is_recorded(gateway, scripted, actor):
    scripted.fn = lambda body, i: Reply([assistant(f"reply {i}")])
    critic = SlowCritic(3.0)
    with gateway(critic=critic, mode="shadow", settings={"shadow_max_backlog": 2}) as (url, sink):
        before = scrape(url)

        async def turns() -> list[float]:
            async with openai.AsyncOpenAI(base_url=url, api_key="sk-test", max_retries=0) as client:
                async def one() -> float:
                    t0 = time.monotonic()
                    await client.chat.completions.create(model="gpt-test", messages=USER)
                    return time.monotonic() - t0
                return await asyncio.gather(*[one() for _ in range(6)])
        took = asyncio.run(turns())
        after = scrape(url)
        deadline = time.monotonic() + 15
        while len(sink.records) < 6 and time.monotonic() < deadline:
            time.sleep(0.05)
    # No reply waited for the 3 s scoring, ranked or shed.
    assert max(took) < 2.5, took
    assert delta(before, after, "turngate_shadow_shed_total", route="gpt-test") == 4
    assert delta(before, after, "turngate_shadow_backlog") == 2  # the two ranked turns, still scoring
    assert len(sink.records) == 6 and {r.decision for r in sink.records} == {"shadow"}
    ranked = [r for r in sink.records if len(r.candidates) == 4]
    shed = [r for r in sink.records if len(r.candidates) == 1]
    assert len(ranked) == 2 and len(shed) == 4
    assert all(c.score is not None for r in ranked for c in r.candidates)
    assert all(r.candidates[0].score is None and r.latency_critic_ms is None for r in shed)
    assert len(actor[0].requests) == 2 * 4 + 4  # a shed turn asks the upstream once
    assert critic.calls == [4, 4]


def test_the_backlog_frees_up_once_ranking_is_done(gateway, scripted):
    scripted.fn = lambda body, i: Reply([assistant(f"reply {i}")])
    with gateway(critic=SlowCritic(0.0), mode="shadow", settings={"shadow_max_backlog": 1}) as (url, sink):
        client = openai.OpenAI(base_url=url, api_key="sk-test", max_retries=0)
        for n in range(1, 4):  # one at a time: each finds the backlog empty again
            client.chat.completions.create(model="gpt-test", messages=USER)
            deadline = time.monotonic() + 5
            while len(sink.records) < n and time.monotonic() < deadline:
                time.sleep(0.02)
        assert total(scrape(url), "turngate_shadow_backlog") == 0
    assert [len(r.candidates) for r in sink.records] == [4, 4, 4]
