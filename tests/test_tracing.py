"""OpenTelemetry traces (the `otel` extra), read back from the SDK's in-memory exporter: a span per
turn under the client's trace, children for each upstream call (whose traceparent the upstream gets),
the critic and the store hand-off; configured by OTEL_* variables; nothing of the SDK when off."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import openai
import pytest

pytest.importorskip("opentelemetry.sdk.trace", reason="the `otel` extra is not installed")

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from service.app import create_app
from service.demo.fake_actor import FakeActor, Reply, assistant, serve_in_thread
from service.settings import RouteSettings, Settings
from service.store.base import MemorySink
from service.telemetry import tracing
from tests.conftest import TableCritic

ROOT = Path(__file__).resolve().parent.parent
USER = [{"role": "user", "content": "Book the 9am flight."}]
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"


class HeaderLog:
    """The fake actor's app, noting the headers of every request it gets."""

    def __init__(self, app) -> None:
        self.app = app
        self.seen: list[dict[str, str]] = []

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            self.seen.append({k.decode(): v.decode() for k, v in scope["headers"]})
        await self.app(scope, receive, send)


@pytest.fixture
def traced():
    """start(responder, **route) -> (turngate url, the exporter, the actor's header log)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    stack = []

    def start(responder, **route):
        actor = HeaderLog(FakeActor(responder).app)
        actor_cm = serve_in_thread(actor)
        actor_url = actor_cm.__enter__()
        stack.append(actor_cm)
        cfg = Settings(routes=[RouteSettings(**{"alias": "gpt-test", "upstream_base_url": actor_url + "/v1",
                                                "upstream_model": "actor-model", "candidates": 3, **route})])
        app = create_app(cfg, critic=TableCritic({"9am": 0.8}), sink=MemorySink(),
                         tracing=tracing.Tracing(provider))
        gate_cm = serve_in_thread(app)
        url = gate_cm.__enter__()
        stack.append(gate_cm)
        return url + "/v1", exporter, actor

    yield start
    for cm in reversed(stack):
        cm.__exit__(None, None, None)


def by_name(exporter, name):
    return [s for s in exporter.get_finished_spans() if s.name == name]


def test_a_turn_is_a_span_under_the_clients_trace_with_its_steps_as_children(traced):
    url, exporter, actor = traced(lambda body, i: Reply([assistant(f"The 9am flight, option {i}")],
                                                        usage={"prompt_tokens": 7, "completion_tokens": 4,
                                                               "total_tokens": 11}))
    client = openai.OpenAI(base_url=url, api_key="k", max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-test", messages=USER, extra_headers={"traceparent": f"00-{TRACE_ID}-{CLIENT_SPAN}-01"})
    (turn,) = by_name(exporter, "turngate.turn")
    assert format(turn.context.trace_id, "032x") == TRACE_ID
    assert format(turn.parent.span_id, "016x") == CLIENT_SPAN
    assert turn.attributes["turngate.turn_id"] == raw.headers["x-turngate-turn-id"]
    assert turn.attributes["turngate.decision"] == "ranked" and turn.attributes["turngate.candidates"] == 3
    assert turn.attributes["turngate.score"] == pytest.approx(0.8)
    assert turn.attributes["gen_ai.usage.input_tokens"] == 21 and turn.attributes["gen_ai.usage.output_tokens"] == 12
    calls = by_name(exporter, "chat actor-model")
    critic, store = by_name(exporter, "turngate.critic"), by_name(exporter, "turngate.store")
    assert len(calls) == 3 and len(critic) == 1 and len(store) == 1
    assert all(s.parent.span_id == turn.context.span_id for s in [*calls, *critic, *store])
    assert {s.attributes["gen_ai.request.model"] for s in calls} == {"actor-model"}
    assert critic[0].attributes["turngate.critic.name"] == "table"
    # Each upstream call carried its own span as the parent for the upstream's trace.
    sent = sorted(h["traceparent"] for h in actor.seen)
    assert sent == sorted(f"00-{TRACE_ID}-{format(s.context.span_id, '016x')}-01" for s in calls)


def test_a_failed_turn_and_its_failed_calls_are_errors(traced):
    url, exporter, _ = traced(lambda body, i: Reply(status=503), candidates=2)
    client = openai.OpenAI(base_url=url, api_key="k", max_retries=0)
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(model="gpt-test", messages=USER)
    (turn,) = by_name(exporter, "turngate.turn")
    assert turn.status.status_code is StatusCode.ERROR and turn.attributes["turngate.decision"] == "error"
    calls = by_name(exporter, "chat actor-model")
    assert len(calls) == 2
    assert all(s.status.status_code is StatusCode.ERROR and s.attributes["error.type"] == "server_error"
               for s in calls)
    assert format(turn.parent.span_id if turn.parent else 0, "x") == "0"  # no client trace: a new root


def test_forwarded_requests_carry_the_trace_too(traced):
    url, exporter, actor = traced(lambda body, i: Reply([assistant("x")]))
    client = openai.OpenAI(base_url=url, api_key="k", max_retries=0)
    client.embeddings.create(model="gpt-test", input="hello",
                             extra_headers={"traceparent": f"00-{TRACE_ID}-{CLIENT_SPAN}-01"})
    (span,) = by_name(exporter, "embeddings actor-model")
    assert format(span.context.trace_id, "032x") == TRACE_ID
    assert actor.seen[-1]["traceparent"] == f"00-{TRACE_ID}-{format(span.context.span_id, '016x')}-01"


@pytest.mark.parametrize("environ, on", [
    ({}, False),
    ({"OTEL_TRACES_EXPORTER": "none"}, False),
    ({"OTEL_TRACES_EXPORTER": "console", "OTEL_SDK_DISABLED": "true"}, False),
    ({"OTEL_TRACES_EXPORTER": "console"}, True),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}, True),
])
def test_configured_by_the_standard_variables(environ, on):
    made = tracing.from_environment(environ)
    assert (made is not None) is on
    if made is not None:
        assert made.provider.resource.attributes["service.name"] == "turngate"
        made.shutdown()


def test_an_unknown_exporter_is_named():
    with pytest.raises(RuntimeError, match="no span exporter 'zipkin-nope'"):
        tracing.from_environment({"OTEL_TRACES_EXPORTER": "zipkin-nope"})


def test_off_the_sdk_is_not_even_imported(tmp_path):
    """Without OTEL_* configuration a served turn imports nothing of the SDK."""
    code = """
import sys, openai
from service.app import create_app
from service.demo.fake_actor import FakeActor, Reply, assistant, serve_in_thread
from service.settings import RouteSettings, Settings
from service.store.base import MemorySink
from tests.conftest import TableCritic
with serve_in_thread(FakeActor(lambda b, i: Reply([assistant("ok")])).app) as actor:
    cfg = Settings(routes=[RouteSettings(alias="m", upstream_base_url=actor + "/v1", candidates=2)])
    with serve_in_thread(create_app(cfg, critic=TableCritic({}), sink=MemorySink())) as url:
        openai.OpenAI(base_url=url + "/v1", api_key="k").chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}])
print(sorted(m for m in sys.modules if m.startswith("opentelemetry.sdk")))
"""
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"
