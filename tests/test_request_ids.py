"""`x-request-id` on every answer (the client's own, or a new one), the turn id on error answers of a
turn, and turngate_requests_total{route, endpoint, status} for everything the HTTP layer answers."""

from __future__ import annotations

import re

import httpx
import openai
import pytest
from prometheus_client import REGISTRY

from service.demo.fake_actor import Reply

USER = [{"role": "user", "content": "hi"}]
NEW_ID = re.compile(r"req_[0-9a-f]{32}")


def chat(url: str, **kw) -> httpx.Response:
    return httpx.post(url + "/chat/completions", json={"model": "gpt-test", "messages": USER}, **kw)


def test_the_clients_id_is_echoed_and_a_new_one_made_otherwise(gateway):
    with gateway() as (url, _):
        assert chat(url, headers={"x-request-id": "agent-run-42:step.7"}).headers["x-request-id"] == \
            "agent-run-42:step.7"
        made = [chat(url).headers["x-request-id"] for _ in range(2)]
        assert all(NEW_ID.fullmatch(i) for i in made) and made[0] != made[1]
        # Not kept: too long, or characters a log line or header should not carry.
        for odd in ("x" * 200, "a b", "<script>"):
            assert NEW_ID.fullmatch(chat(url, headers={"x-request-id": odd}).headers["x-request-id"])


def test_every_refusal_carries_an_id(gateway):
    with gateway(settings={"max_request_bytes": 2000, "api_keys": "sk-known-key"}) as (url, _):
        root = url.removesuffix("/v1")
        auth = {"authorization": "Bearer sk-known-key"}
        answers = {
            401: chat(url),
            404: httpx.get(root + "/v1/nowhere", headers=auth),
            405: httpx.delete(url + "/chat/completions", headers=auth),
            400: httpx.post(url + "/chat/completions", content=b"{", headers=auth),
            413: httpx.post(url + "/chat/completions", content=b"x" * 5000, headers=auth),
        }
        ok = [httpx.get(root + p) for p in ("/healthz", "/readyz", "/metrics")]
    for status, resp in answers.items():
        assert resp.status_code == status
        assert NEW_ID.fullmatch(resp.headers["x-request-id"]), status
        assert resp.json()["error"]["message"]
    assert all(NEW_ID.fullmatch(r.headers["x-request-id"]) for r in ok)


@pytest.mark.parametrize("reply, status", [(Reply(status=500), 502), (Reply(status=429), 429),
                                           (Reply(raw="not json"), 502)])
def test_a_failed_turns_error_carries_its_turn_id(gateway, scripted, reply, status):
    scripted.fn = lambda body, i: reply
    with gateway() as (url, sink):
        client = openai.OpenAI(base_url=url, api_key="k", max_retries=0)
        with pytest.raises(openai.APIStatusError) as info:
            client.chat.completions.create(model="gpt-test", messages=USER, extra_headers={"x-request-id": "r-1"})
    headers = info.value.response.headers
    assert info.value.status_code == status
    assert headers["x-request-id"] == "r-1"
    assert headers["x-turngate-turn-id"] == sink.records[0].turn_id


def count(route: str, endpoint: str, status: int) -> float:
    return REGISTRY.get_sample_value("turngate_requests_total",
                                     {"route": route, "endpoint": endpoint, "status": str(status)}) or 0.0


def test_requests_are_counted_by_route_endpoint_and_status(gateway, scripted):
    chat_path = "/v1/chat/completions"
    cases = [("gpt-test", chat_path, 200), ("none", chat_path, 401), ("none", chat_path, 404),
             ("none", chat_path, 413), ("none", "other", 404), ("gpt-test", "/v1/embeddings", 200),
             ("gpt-test", chat_path, 502), ("none", "/v1/models/{model_id:path}", 404)]
    before = {c: count(*c) for c in cases}
    with gateway(settings={"max_request_bytes": 2000, "api_keys": "sk-known-key"}) as (url, _):
        auth = {"authorization": "Bearer sk-known-key"}
        chat(url, headers=auth)
        chat(url)
        httpx.post(url + "/chat/completions", json={"model": "nope", "messages": USER}, headers=auth)
        httpx.post(url + "/chat/completions", content=b"x" * 5000, headers=auth)
        httpx.get(url + "/no/such/path/123", headers=auth)
        httpx.post(url + "/embeddings", json={"model": "gpt-test", "input": "x"}, headers=auth)
        httpx.get(url + "/models/nope", headers=auth)
        scripted.fn = lambda body, i: Reply(status=500)
        chat(url, headers=auth)
    for case in cases:
        assert count(*case) - before[case] == 1, case


def test_an_unexpected_exception_is_a_500_in_the_envelope_with_an_id():
    from starlette.applications import Starlette
    from starlette.routing import Route

    from service.api.requests import RequestContext
    from service.demo.fake_actor import serve_in_thread

    async def broken(request):
        raise RuntimeError("a bug")

    app = Starlette(routes=[Route("/broken", broken)])
    app.add_middleware(RequestContext, paths={"/broken"})
    before = count("none", "/broken", 500)
    with serve_in_thread(app) as url:
        resp = httpx.get(url + "/broken", headers={"x-request-id": "trace-me"})
    assert resp.status_code == 500 and resp.headers["x-request-id"] == "trace-me"
    assert resp.json()["error"] == {"message": "internal error in turngate", "type": "server_error",
                                    "param": None, "code": None}
    assert count("none", "/broken", 500) - before == 1
