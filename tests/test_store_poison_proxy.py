"""End to end: hostile requests through the real openai client and proxy, a real StoreSink on
PostgreSQL and SQLite. Whatever a request holds, every turn answered 200 is stored, later turns
still land, and /readyz tells what the store is doing."""

# ruff: noqa: F811 - the fixtures are imported from tests.test_store_support / test_store_poison

from __future__ import annotations

import time

import httpx
import openai
from sqlalchemy import create_engine, text

from service.app import create_app
from service.demo.fake_actor import serve_in_thread
from service.settings import RouteSettings, Settings
from service.store.sink import StoreSink
from tests.conftest import TableCritic
from tests.test_store_poison import refusing_db  # noqa: F401 - fixture
from tests.test_store_support import db_url, make_pg_db, shared_pg_db  # noqa: F401 - fixtures


def _stored(url: str, ids: list[str]) -> set[str]:
    engine = create_engine(url.replace("postgresql://", "postgresql+psycopg://"))
    try:
        with engine.connect() as conn:
            return {r[0] for r in conn.execute(text("SELECT id FROM turns")) if r[0] in set(ids)}
    finally:
        engine.dispose()


def _wait_stored(url: str, ids: list[str], timeout: float = 20) -> set[str]:
    deadline = time.monotonic() + timeout
    while (got := _stored(url, ids)) != set(ids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return got


def _serve(url: str, spool, actor_url: str, alias: str = "gpt-test"):
    route = RouteSettings(alias=alias, upstream_base_url=actor_url, upstream_model="actor-model",
                          candidates=3, mode="rank", attempt_timeout_s=5, deadline_s=10)
    sink = StoreSink(url, spool, flush_interval_s=0.05)
    return sink, serve_in_thread(create_app(Settings(routes=[route]), critic=TableCritic({}), sink=sink))


def _call(fn) -> dict:
    return {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": fn}]}


HOSTILE = {
    "header id over 200 characters": {"messages": [{"role": "user", "content": "h"}],
                                      "extra_headers": {"x-turngate-conversation-id": "h" * 300}},
    "metadata conversation id over 200 characters": {"messages": [{"role": "user", "content": "m"}],
                                                     "metadata": {"conversation_id": "m" * 300}},
    "NUL in content": {"messages": [{"role": "user", "content": "a\x00b"}]},
    "NUL in a tool name": {
        "messages": [{"role": "user", "content": "q"}, _call({"name": "get\x00order", "arguments": "{}"}),
                     {"role": "tool", "tool_call_id": "call_1", "content": "x"}],
        "tools": [{"type": "function", "function": {"name": "get\x00order", "parameters": {"type": "object"}}}]},
    # The openai client cannot encode a lone surrogate; a raw client sends the JSON escape.
    "lone surrogate in content": b'{"model": "gpt-test", "messages": [{"role": "user", "content": "bad \\ud800"}]}',
    "function given as a string": {"messages": [{"role": "user", "content": "q"}, _call("get_order"),
                                                {"role": "tool", "tool_call_id": "call_1", "content": "x"}]},
    "content part text not a string": {"messages": [{"role": "user", "content": [
        {"type": "text", "text": {"nested": 1}}]}]},
}


def test_hostile_requests_never_stop_turn_logging(actor, db_url, tmp_path):
    _, actor_url = actor
    _, server = _serve(db_url, tmp_path / "spool", actor_url)
    answered: list[str] = []
    refused: list[str] = []
    with server as base:
        client = openai.OpenAI(base_url=base + "/v1", api_key="k", max_retries=0)

        def normal(tag: str) -> None:
            raw = client.chat.completions.with_raw_response.create(
                model="gpt-test", messages=[{"role": "user", "content": tag}])
            answered.append(raw.headers["x-turngate-turn-id"])

        normal("first")
        for name, request in HOSTILE.items():
            if isinstance(request, bytes):
                resp = httpx.post(base + "/v1/chat/completions", content=request, timeout=30,
                                  headers={"authorization": "Bearer k", "content-type": "application/json"})
                assert resp.status_code in (200, 400), resp.text
                (answered.append(resp.headers["x-turngate-turn-id"]) if resp.status_code == 200
                 else refused.append(name))
            else:
                try:
                    raw = client.chat.completions.with_raw_response.create(model="gpt-test", **request)
                    answered.append(raw.headers["x-turngate-turn-id"])
                except openai.BadRequestError:  # refused at the edge: fine, as long as logging goes on
                    refused.append(name)
            normal(f"after {name}")
        stored = _wait_stored(db_url, answered)
        ready = httpx.get(base + "/readyz")
    assert stored == set(answered), f"lost: {set(answered) - stored}"
    assert len(answered) >= 1 + len(HOSTILE) + (len(HOSTILE) - len(refused))
    store = ready.json()["store"]
    assert ready.status_code == 200 and store["db_ok"] is True
    assert store["quarantined"] == 0 and store["behind_s"] < 5
    assert not list((tmp_path / "spool").glob("seg-*"))  # everything written, the journal retired


def test_feedback_reaches_a_conversation_named_by_a_long_id(actor, db_url, tmp_path):
    """The store keeps a 300-character id cut to its column; feedback naming the whole id finds it."""
    _, actor_url = actor
    long_id = "conv-" + "x" * 295
    _, server = _serve(db_url, tmp_path / "spool", actor_url)
    with server as base:
        client = openai.OpenAI(base_url=base + "/v1", api_key="k", max_retries=0)
        raw = client.chat.completions.with_raw_response.create(
            model="gpt-test", messages=[{"role": "user", "content": "hi"}],
            extra_headers={"x-turngate-conversation-id": long_id})
        _wait_stored(db_url, [raw.headers["x-turngate-turn-id"]])
        fb = httpx.post(base + "/v1/feedback", json={"conversation_id": long_id, "reward": 1},
                        headers={"authorization": "Bearer k"})
        other = httpx.post(base + "/v1/feedback", json={"conversation_id": long_id[:-1] + "y", "reward": 1},
                           headers={"authorization": "Bearer k"})
    assert fb.status_code == 200, fb.text
    assert other.status_code == 404  # ids that differ after the cut stay apart


def test_a_turn_the_database_refuses_is_quarantined_and_readyz_says_so(actor, refusing_db, tmp_path):
    """Turns of route alias 'poison' are refused by the database (a constraint): each is quarantined
    while the turns of another route, served in between, all land."""
    _, actor_url = actor
    sink = StoreSink(refusing_db, tmp_path / "spool", flush_interval_s=0.05)
    sink_ok_route = RouteSettings(alias="gpt-test", upstream_base_url=actor_url, upstream_model="actor-model",
                                  candidates=2, mode="rank", attempt_timeout_s=5, deadline_s=10)
    poison_route = RouteSettings(alias="poison", upstream_base_url=actor_url, upstream_model="actor-model",
                                 candidates=2, mode="rank", attempt_timeout_s=5, deadline_s=10)
    app = create_app(Settings(routes=[sink_ok_route, poison_route]), critic=TableCritic({}), sink=sink)
    good, bad = [], []
    with serve_in_thread(app) as base:
        client = openai.OpenAI(base_url=base + "/v1", api_key="k", max_retries=0)
        for i in range(12):
            model = "poison" if i % 4 == 1 else "gpt-test"
            raw = client.chat.completions.with_raw_response.create(
                model=model, messages=[{"role": "user", "content": f"turn {i}"}])
            (bad if model == "poison" else good).append(raw.headers["x-turngate-turn-id"])
        stored = _wait_stored(refusing_db, good)
        deadline = time.monotonic() + 10
        while httpx.get(base + "/readyz").json()["store"]["quarantined"] < len(bad) and time.monotonic() < deadline:
            time.sleep(0.1)
        ready = httpx.get(base + "/readyz").json()["store"]
        metrics = httpx.get(base + "/metrics").text
    assert stored == set(good) and not _stored(refusing_db, bad)
    assert ready["db_ok"] is True and ready["quarantined"] == len(bad) == 3
    assert "refuse_poison" in ready["quarantine_last_error"] or "poison" in ready["quarantine_last_error"]
    assert "turngate_store_quarantined_total" in metrics
    lines = (tmp_path / "spool" / "quarantine.jsonl").read_text().splitlines()
    assert len(lines) == 3
