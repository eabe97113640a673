"""Schemathesis over the whole API, from the app's own OpenAPI document: zero 5xx.

The gateway runs for real (uvicorn, the shipped critic, a SQLite store, client keys and an admin key
set) in front of the fake actor. For every operation the document declares, the chat request body included, schemathesis
generates requests that fit the schema and requests that break it; none may get a 5xx, and every
4xx must be OpenAI's error envelope. Examples are bounded so the module stays near a minute.

(Schemathesis' own pytest integration, `from_fixture`, does not run under pytest 9, so the
operations are parametrized here and each one is driven by a Hypothesis strategy.)
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode

from service.app import create_app
from service.demo.fake_actor import FakeActor, Reply, assistant, serve_in_thread
from service.settings import RouteSettings, Settings
from service.store.sink import StoreSink

KEY = "sk-fuzz-client-and-admin"
# Examples per operation and mode: a chat or score example runs the critic, the others are cheap.
# (Against the code before this module, 75 examples of the activate route found its 500 on a NUL path.)
EXAMPLES = 100
EXAMPLES_WITH_CRITIC = 30


def gateway_settings(actor_url: str) -> Settings:
    route = RouteSettings(alias="gpt-test", upstream_base_url=actor_url, upstream_model="actor",
                          candidates=2, mode="rank", attempt_timeout_s=5, deadline_s=10)
    # The key hash secret lets the admin API issue keys: the keys endpoints are fuzzed past that check.
    return Settings(routes=[route], api_keys=[KEY], admin_key=KEY, keepalive_interval_s=0.5,
                    key_hash_secret="fuzz-key-hash-secret-5c1e")


# The document the server serves: building the app does not start it.
SCHEMA = schemathesis.openapi.from_dict(create_app(gateway_settings("http://127.0.0.1:9/v1")).openapi())
# .ok() of an Err raises: our own document would be broken, and the module should fail to load.
OPERATIONS = [result.ok() for result in SCHEMA.get_all_operations()]  # type: ignore[union-attr]
# Requests that break the schema exist only for operations that take something.
RUNS = [pytest.param(op, mode, id=f"{op.label} {mode}") for op in OPERATIONS
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
        if mode is GenerationMode.POSITIVE or len(op.body) or any(True for _ in op.iter_parameters())]


def reply_with_a_tool_call_when_tools_are_declared(body, attempt) -> Reply:
    tools = [t for t in body.get("tools") or [] if isinstance(t.get("function"), dict)]
    if tools and attempt % 2:
        return Reply([assistant(tool_calls=[(tools[0]["function"]["name"], {"x": "y"})])])
    return Reply([assistant("fuzzed")])


@pytest.fixture(scope="module")
def base_url(tmp_path_factory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("fuzz")
    actor = FakeActor(reply_with_a_tool_call_when_tools_are_declared)
    with serve_in_thread(actor.app) as actor_url:
        sink = StoreSink(f"sqlite:///{tmp}/store.db", tmp / "spool", flush_interval_s=0.2)
        sink.feedback_wait_s = 0.05  # feedback on an unknown turn waits this long for it to land
        # The shipped critic, as deployed: it renders every message it is given.
        app = create_app(gateway_settings(actor_url + "/v1"), sink=sink)
        with serve_in_thread(app) as url:
            yield url


def test_the_document_declares_the_chat_request_body():
    body = SCHEMA.raw_schema["paths"]["/v1/chat/completions"]["post"]["requestBody"]
    ref = body["content"]["application/json"]["schema"]["$ref"]
    declared = SCHEMA.raw_schema["components"]["schemas"][ref.rsplit("/", 1)[1]]
    assert {"model", "messages", "tools", "tool_choice", "stream"} <= set(declared["properties"])
    assert declared.get("additionalProperties", True) is not False  # unknown fields are forwarded


@pytest.mark.parametrize("operation, mode", RUNS)
def test_no_request_gets_a_5xx(base_url, operation, mode):
    examples = EXAMPLES_WITH_CRITIC if operation.path in ("/v1/chat/completions", "/v1/critic/score") else EXAMPLES

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large])
    def run(case) -> None:
        if operation.path == "/v1/chat/completions" and isinstance(case.body, dict) and mode == "positive":
            case.body["model"] = "gpt-test"  # a route that exists, so the turn reaches the actor and critic
        response = case.call(base_url=base_url, headers={"authorization": f"Bearer {KEY}"}, timeout=30)
        assert response.status_code < 500, (case.method, case.formatted_path, case.body, response.text[:500])
        if response.status_code >= 400:
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["message"]

    run()
