"""POST /v1/chat/completions past the router (service/api/chatpath.py) answers exactly as the routed
path does: the same request, good or bad, sent to an app with the fast path and to the same app
without it, gets the same status, body and header names."""

from __future__ import annotations

import json

import httpx
import pytest

from service.api.chatpath import ChatFastPath
from service.app import create_app
from service.demo.fake_actor import serve_in_thread
from service.settings import RouteSettings, Settings
from service.store.base import MemorySink
from tests.conftest import TableCritic

KEY = "sk-chatpath-test-0123456789abcdef"
GOOD = {"model": "gpt-test", "messages": [{"role": "user", "content": "hello"}]}
CASES = {
    "a passthrough turn": (KEY, json.dumps(GOOD).encode()),
    "a rank turn": (KEY, json.dumps({**GOOD, "model": "gpt-rank"}).encode()),
    "no key": (None, json.dumps(GOOD).encode()),
    "a wrong key": ("sk-wrong-wrong-wrong-wrong-wrong", json.dumps(GOOD).encode()),
    "broken JSON": (KEY, b'{"model": "gpt-test", '),
    "not an object": (KEY, b"[1, 2]"),
    "no messages": (KEY, json.dumps({"model": "gpt-test"}).encode()),
    "an unknown model": (KEY, json.dumps({**GOOD, "model": "nope"}).encode()),
    "n over the candidates": (KEY, json.dumps({**GOOD, "model": "gpt-rank", "n": 9}).encode()),
    "a body over the limit": (KEY, json.dumps({**GOOD, "pad": "x" * 5000}).encode()),
}
VOLATILE_BODY = {"id", "created"}
VOLATILE_HEADERS = {"date", "content-length", "server-timing"}


def served(actor_url: str, fast: bool):
    routes = [RouteSettings(alias="gpt-test", upstream_base_url=actor_url, upstream_model="m", mode="passthrough"),
              RouteSettings(alias="gpt-rank", upstream_base_url=actor_url, upstream_model="m", mode="rank",
                            candidates=2)]
    app = create_app(Settings(routes=routes, api_keys=[KEY], max_request_bytes=4096),
                     critic=TableCritic({}), sink=MemorySink())
    assert any(m.cls is ChatFastPath for m in app.user_middleware)
    if not fast:
        app.user_middleware = [m for m in app.user_middleware if m.cls is not ChatFastPath]
    return serve_in_thread(app)


def answer(base: str, key: str | None, body: bytes) -> tuple[int, object, set[str]]:
    headers = {"content-type": "application/json", **({"authorization": f"Bearer {key}"} if key else {})}
    r = httpx.post(base + "/v1/chat/completions", content=body, headers=headers, timeout=10)
    data = r.json()
    if isinstance(data, dict):
        data = {k: v for k, v in data.items() if k not in VOLATILE_BODY}
    return r.status_code, data, set(r.headers) - VOLATILE_HEADERS


@pytest.mark.parametrize("case", list(CASES))
def test_the_fast_path_answers_as_the_routed_path(actor, case):
    _, actor_url = actor
    key, body = CASES[case]
    with served(actor_url, fast=True) as fast, served(actor_url, fast=False) as routed:
        got, want = answer(fast, key, body), answer(routed, key, body)
    assert got == want
    if case.endswith("turn"):
        assert got[0] == 200
    else:
        assert got[0] >= 400 and "error" in got[1]


def test_other_methods_and_paths_take_the_routed_path(actor):
    _, actor_url = actor
    with served(actor_url, fast=True) as base:
        assert httpx.get(base + "/v1/chat/completions", timeout=10).status_code == 405
        r = httpx.post(base + "/v1/chat/completions/", content=json.dumps(GOOD),
                       headers={"authorization": f"Bearer {KEY}"}, timeout=10, follow_redirects=False)
        assert r.status_code in (307, 404)  # Starlette's answer to a trailing slash, not the endpoint's
