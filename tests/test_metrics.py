"""/metrics through the proxy: the gate's metrics appear with the right labels under traffic."""

from __future__ import annotations

import socket
import time

import httpx
import openai
import pytest

from service.app import create_app
from service.demo.fake_actor import Reply, assistant, serve_in_thread
from service.settings import GatePolicy, RouteSettings, Settings
from service.store.base import MemorySink
from tests.conftest import TableCritic
from tests.test_metrics_serve import TOOLS, parse_metrics, total


def scrape(base_url: str):
    resp = httpx.get(base_url.removesuffix("/v1") + "/metrics")
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/plain")
    return parse_metrics(resp.text)


def delta(before, after, metric: str, **labels: str) -> float:
    return total(after, metric, **labels) - total(before, metric, **labels)


def test_ranked_turns_show_decisions_candidates_vetoes_and_scores(gateway, scripted):
    # Four candidates: a good call, an unknown tool, a schema break, a good call the critic prefers.
    pool = [assistant(tool_calls=[("get_order", {"order_id": "A1"})]),
            assistant(tool_calls=[("drop_tables", {})]),
            assistant(tool_calls=[("get_order", {"order_id": 7})]),
            assistant(tool_calls=[("get_order", {"order_id": "best"})])]
    scripted.fn = lambda body, i: Reply([pool[i % 4]], usage={"prompt_tokens": 11, "completion_tokens": 3,
                                                               "total_tokens": 14})
    critic = TableCritic({"best": 0.9}, default=0.4)
    with gateway(critic=critic) as (url, _):
        before = scrape(url)
        client = openai.OpenAI(base_url=url, api_key="sk-test", max_retries=0)
        for _ in range(3):
            client.chat.completions.create(model="gpt-test", tools=TOOLS,
                                           messages=[{"role": "user", "content": "where is A1?"}])
        after = scrape(url)
    route = {"route": "gpt-test"}
    assert delta(before, after, "turngate_turns_total", mode="rank", decision="ranked", **route) == 3
    assert delta(before, after, "turngate_request_duration_seconds_count", mode="rank", **route) == 3
    assert delta(before, after, "turngate_overhead_seconds_count", mode="rank", **route) == 3
    assert delta(before, after, "turngate_upstream_duration_seconds_count", **route) == 12
    assert delta(before, after, "turngate_candidates_per_turn_sum", **route) == 12
    assert delta(before, after, "turngate_structural_vetoes_total", reason="unknown_tool", **route) == 3
    assert delta(before, after, "turngate_structural_vetoes_total", reason="schema", **route) == 3
    assert delta(before, after, "turngate_tokens_total", kind="prompt", **route) == 12 * 11
    assert delta(before, after, "turngate_tokens_total", kind="completion", **route) == 12 * 3
    # Every scored candidate lands in the histogram: the three 0.9s above the 0.85 bucket, the rest below.
    scored = delta(before, after, "turngate_critic_score_count", **route)
    assert scored >= 6
    assert delta(before, after, "turngate_critic_score_bucket", le="0.85", **route) == scored - 3
    assert delta(before, after, "turngate_critic_score_bucket", le="0.9", **route) == scored


def test_interventions_and_upstream_errors_by_kind(gateway, scripted):
    scripted.fn = lambda body, i: (Reply(status=429) if i % 4 == 3
                                   else Reply([assistant("fixed" if len(body["messages"]) > 1 else "meh")]))
    critic = TableCritic({"fixed": 0.8}, default=0.2)
    with gateway(critic=critic, policy={"intervene_threshold": 0.5, "max_interventions": 1}) as (url, _):
        before = scrape(url)
        client = openai.OpenAI(base_url=url, api_key="sk-test", max_retries=0)
        client.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "hi"}])
        after = scrape(url)
    route = {"route": "gpt-test"}
    assert delta(before, after, "turngate_interventions_total", **route) == 1
    assert delta(before, after, "turngate_turns_total", decision="intervened", **route) == 1
    assert delta(before, after, "turngate_upstream_errors_total", kind="rate_limited", **route) == 2


def test_critic_info_names_the_active_critic(gateway):
    critic = TableCritic({})
    critic.name, critic.version, critic.provider = "probe-critic", "7.1", "CPUExecutionProvider"
    with gateway(critic=critic) as (url, _):
        samples = scrape(url)
    assert total(samples, "turngate_critic_info", name="probe-critic", version="7.1",
                 provider="CPUExecutionProvider") == 1
    assert total(samples, "turngate_critic_cuda_available") in (0, 1)


def test_unknown_models_add_no_label_values(gateway):
    with gateway() as (url, _):
        client = openai.OpenAI(base_url=url, api_key="sk-test", max_retries=0)
        with pytest.raises(openai.APIStatusError):
            client.chat.completions.create(model="made-up-model-123", messages=[{"role": "user", "content": "x"}])
        text = httpx.get(url.removesuffix("/v1") + "/metrics").text
    assert "made-up-model-123" not in text


def test_critic_info_follows_a_hot_swap(actor):
    _, actor_url = actor
    old, new = TableCritic({}), TableCritic({})
    old.name, old.version, old.provider = "swap-critic", "1", "CPUExecutionProvider"
    new.name, new.version, new.provider = "swap-critic", "2", "CUDAExecutionProvider"
    settings = Settings(routes=[RouteSettings(alias="gpt-test", upstream_base_url=actor_url)])
    app = create_app(settings, critic=old, sink=MemorySink())
    with serve_in_thread(app) as url:
        assert total(scrape(url), "turngate_critic_info", name="swap-critic", version="1") == 1
        app.state.services.critics.swap(new)
        samples = scrape(url)
    assert total(samples, "turngate_critic_info", name="swap-critic", version="1",
                 provider="CPUExecutionProvider") == 0
    assert total(samples, "turngate_critic_info", name="swap-critic", version="2",
                 provider="CUDAExecutionProvider") == 1


@pytest.mark.parametrize("mode", ["rank", "shadow"])
def test_tokens_of_an_n_call_are_counted_once(gateway, scripted, mode):
    """An upstream that takes n answers N choices with one usage: the prompt counted once, the
    completion tokens of all choices counted (not dropped)."""
    scripted.fn = lambda body, i: Reply([assistant(f"choice {k}") for k in range(body.get("n") or 1)],
                                        usage={"prompt_tokens": 50, "completion_tokens": 44, "total_tokens": 94})
    with gateway(mode=mode, upstream_supports_n=True) as (url, sink):
        before = scrape(url)
        openai.OpenAI(base_url=url, api_key="k", max_retries=0).chat.completions.create(
            model="gpt-test", messages=[{"role": "user", "content": "hi"}])
        deadline = time.monotonic() + 5
        while not sink.records and time.monotonic() < deadline:
            time.sleep(0.02)
        after = scrape(url)
    record = sink.records[0]
    assert len(record.candidates) == 4
    assert (record.prompt_tokens, record.completion_tokens) == (50, 44)
    route = {"route": "gpt-test"}
    assert delta(before, after, "turngate_tokens_total", kind="prompt", **route) == 50
    assert delta(before, after, "turngate_tokens_total", kind="completion", **route) == 44


def test_tokens_add_up_over_calls_and_rounds(gateway, scripted):
    scripted.fn = lambda body, i: Reply([assistant("risky")], usage={"prompt_tokens": 10, "completion_tokens": 3,
                                                                     "total_tokens": 13})
    policy = GatePolicy(intervene_threshold=0.9, max_interventions=1)
    with gateway(critic=TableCritic({}, default=0.1), candidates=3, policy=policy) as (url, sink):
        openai.OpenAI(base_url=url, api_key="k", max_retries=0).chat.completions.create(
            model="gpt-test", messages=[{"role": "user", "content": "hi"}])
    record = sink.records[0]
    assert record.rounds == 2 and len(record.candidates) == 6
    assert (record.prompt_tokens, record.completion_tokens) == (60, 18)


def test_a_client_hanging_up_mid_body_is_a_499_not_a_server_error(gateway, caplog):
    """Any client could otherwise raise the 5xx rate that alerts watch, and fill the log with tracebacks."""
    with gateway() as (url, _):
        base = url.removesuffix("/v1")
        before = parse_metrics(httpx.get(base + "/metrics").text)
        host, port = base.removeprefix("http://").split(":")
        for _ in range(3):
            with socket.create_connection((host, int(port))) as sock:
                sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk-test\r\n"
                             b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"model\":")
                time.sleep(0.1)
        time.sleep(0.3)
        after = parse_metrics(httpx.get(base + "/metrics").text)
    counted = {status: total(after, "turngate_requests_total", endpoint="/v1/chat/completions", status=status)
               - total(before, "turngate_requests_total", endpoint="/v1/chat/completions", status=status)
               for status in ("499", "500")}
    assert counted == {"499": 3, "500": 0}
    assert "unhandled error" not in caplog.text


def test_a_turn_the_critic_failed_to_score_is_counted(gateway):
    """The gate then fails open (the structural checks alone choose): operators must see it happen."""
    class BrokenCritic(TableCritic):
        async def score(self, messages, candidates, tools=None) -> list[float]:
            raise RuntimeError("the critic is down")

    with gateway(critic=BrokenCritic({})) as (url, _):
        before = scrape(url)
        client = openai.OpenAI(base_url=url, api_key="sk-test", max_retries=0)
        reply = client.chat.completions.with_raw_response.create(model="gpt-test",
                                                                 messages=[{"role": "user", "content": "x"}])
        after = scrape(url)
    assert reply.http_response.status_code == 200
    assert delta(before, after, "turngate_critic_failures_total", route="gpt-test") == 1
