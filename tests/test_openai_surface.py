"""The rest of the OpenAI surface an agent touches through one base_url: the catch-all route, model
listing and lookup, unknown paths, `n`."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from service.demo.fake_actor import Reply, assistant
from tests.conftest import TableCritic

USER = [{"role": "user", "content": "Which flight is cheapest?"}]


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key="sk-test", max_retries=0)


# -- the catch-all route ----------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["passthrough", "rank"])
def test_catch_all_forwards_the_model_the_client_asked_for(gateway, actor, mode):
    with gateway(alias="*", upstream_model=None, mode=mode, candidates=2) as (url, sink):
        reply = client(url).chat.completions.create(model="vendor/some-model-7b", messages=USER)
        client(url).chat.completions.create(model="other-model", messages=USER)
    calls = 1 if mode == "passthrough" else 2  # per turn
    assert [r["model"] for r in actor[0].requests] == ["vendor/some-model-7b"] * calls + ["other-model"] * calls
    assert reply.model == "vendor/some-model-7b"  # the fake actor echoes what it was asked for
    assert [r.upstream_model for r in sink.records] == ["vendor/some-model-7b", "other-model"]
    assert {r.route for r in sink.records} == {"*"}  # the metric label stays bounded


def test_catch_all_with_its_own_upstream_model_uses_it(gateway, actor):
    with gateway(alias="*", upstream_model="actor-model", mode="passthrough") as (url, _):
        client(url).chat.completions.create(model="whatever", messages=USER)
    assert actor[0].requests[0]["model"] == "actor-model"


def test_models_lists_aliases_not_the_catch_all(gateway):
    with gateway(alias="*", upstream_model=None, mode="passthrough") as (url, _):
        assert [m.id for m in client(url).models.list()] == []
    with gateway() as (url, _):
        assert [m.id for m in client(url).models.list()] == ["gpt-test"]


def test_retrieve_a_model(gateway):
    with gateway() as (url, _):
        model = client(url).models.retrieve("gpt-test")
        assert model.id == "gpt-test" and model.object == "model"
        with pytest.raises(openai.NotFoundError) as info:
            client(url).models.retrieve("no-such-model")
        assert info.value.code == "model_not_found"
    with gateway(alias="*", upstream_model=None, mode="passthrough") as (url, _):
        assert client(url).models.retrieve("org/any-model").id == "org/any-model"


@pytest.mark.parametrize("method, path, status, code", [
    ("GET", "/v1/no/such/thing", 404, "unknown_url"),
    ("POST", "/v1/fine_tuning/jobs", 404, "unknown_url"),
    ("GET", "/nothing-here", 404, "unknown_url"),
    ("DELETE", "/v1/chat/completions", 405, "method_not_allowed"),
])
def test_unknown_paths_answer_in_openais_envelope_with_a_code(gateway, method, path, status, code):
    with gateway() as (url, _):
        resp = httpx.request(method, url.removesuffix("/v1") + path)
    assert resp.status_code == status
    err = resp.json()["error"]
    assert err["code"] == code and err["type"] == "invalid_request_error"
    assert method in err["message"] and path in err["message"]


# -- n ----------------------------------------------------------------------------------------


def test_passthrough_forwards_n_and_returns_every_choice(gateway, scripted, actor):
    scripted.fn = lambda body, i: Reply([assistant(f"choice {k}") for k in range(body.get("n") or 1)])
    with gateway(mode="passthrough") as (url, sink):
        reply = client(url).chat.completions.create(model="gpt-test", messages=USER, n=3)
    assert [r.get("n") for r in actor[0].requests] == [3]
    assert [c.message.content for c in reply.choices] == ["choice 0", "choice 1", "choice 2"]
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert len(sink.records[0].candidates) == 3


def test_rank_returns_the_top_n_in_rank_order(gateway, scripted, actor):
    scripted.fn = lambda body, i: Reply([assistant(f"candidate {i}")])
    critic = TableCritic({"candidate 0": 0.2, "candidate 1": 0.9, "candidate 2": 0.4, "candidate 3": 0.7})
    with gateway(critic=critic, candidates=4) as (url, sink):
        raw = client(url).chat.completions.with_raw_response.create(model="gpt-test", messages=USER, n=2)
    reply = raw.parse()
    assert [c.message.content for c in reply.choices] == ["candidate 1", "candidate 3"]
    assert [c.index for c in reply.choices] == [0, 1]
    assert raw.headers["x-turngate-score"] == "0.9000"
    assert all("n" not in r for r in actor[0].requests)  # N single calls, as without n
    assert sink.records[0].chosen.message["content"] == "candidate 1"


def test_rank_never_returns_a_vetoed_candidate_among_the_n(gateway, scripted):
    replies = [assistant(None), assistant("fine"), assistant(""), assistant("also fine")]
    scripted.fn = lambda body, i: Reply([replies[i]])
    with gateway(critic=TableCritic({"also": 0.8, "fine": 0.6}), candidates=4) as (url, _):
        reply = client(url).chat.completions.create(model="gpt-test", messages=USER, n=3)
    assert [c.message.content for c in reply.choices] == ["also fine", "fine"]  # fewer than n: the rest vetoed


def test_n_above_the_routes_candidates_is_refused(gateway):
    with gateway(candidates=2) as (url, _), pytest.raises(openai.BadRequestError) as info:
        client(url).chat.completions.create(model="gpt-test", messages=USER, n=3)
    assert info.value.param == "n" and "2" in info.value.message


def test_n_with_stream_on_a_gated_route_is_refused(gateway):
    with gateway() as (url, _), pytest.raises(openai.BadRequestError) as info:
        client(url).chat.completions.create(model="gpt-test", messages=USER, n=2, stream=True)
    assert info.value.param == "n"


def _settled(sink, timeout: float = 5.0):
    deadline = time.monotonic() + timeout
    while not sink.records and time.monotonic() < deadline:
        time.sleep(0.02)
    return sink.records[0]


def test_shadow_returns_the_first_n_and_ranks_them_all(gateway, scripted):
    scripted.fn = lambda body, i: Reply([assistant(f"candidate {i}")])
    with gateway(critic=TableCritic({"candidate": 0.5}), mode="shadow") as (url, sink):
        raw = client(url).chat.completions.with_raw_response.create(model="gpt-test", messages=USER, n=2)
        record = _settled(sink)
    reply = raw.parse()
    assert raw.headers["x-turngate-decision"] == "shadow"
    assert len({c.message.content for c in reply.choices}) == 2
    shown = {c.message.content for c in reply.choices}
    assert shown == {c.message["content"] for c in record.candidates[:2]}
    assert len(record.candidates) == 4 and all(c.score == 0.5 for c in record.candidates)


def test_shadow_on_an_upstream_that_takes_n_ranks_every_choice(gateway, scripted, actor):
    scripted.fn = lambda body, i: Reply([assistant(f"choice {k}") for k in range(body.get("n") or 1)])
    critic = TableCritic({"choice 2": 0.9}, default=0.1)
    with gateway(critic=critic, mode="shadow", upstream_supports_n=True) as (url, sink):
        reply = client(url).chat.completions.create(model="gpt-test", messages=USER)
        record = _settled(sink)
    assert [c.message.content for c in reply.choices] == ["choice 0"]
    assert [r.get("n") for r in actor[0].requests] == [4]
    assert [c.score for c in record.candidates] == [0.1, 0.1, 0.9, 0.1]  # all four ranked, not only the first
