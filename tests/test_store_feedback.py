"""POST /v1/feedback through the real proxy and store: validation, 404, idempotency, turns that
are not in the database yet (this replica's queue, another replica's late flush)."""

# ruff: noqa: F811 - the fixtures are imported from tests.test_store_support

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from service.app import create_app
from service.demo.fake_actor import serve_in_thread
from service.settings import RouteSettings, Settings
from service.store.sink import StoreSink
from tests.conftest import TableCritic
from tests.test_store_support import db_url, make_pg_db, record, shared_pg_db  # noqa: F401 - fixtures

KEY = {"authorization": "Bearer sk-test"}
ADMIN_KEY = "adm-feedback-" + "3e9c1a" * 5
ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}


@pytest.fixture
def proxy(actor, db_url, tmp_path):
    _, actor_url = actor
    route = RouteSettings(alias="gpt-test", upstream_base_url=actor_url, upstream_model="actor-model",
                          candidates=2, mode="rank", attempt_timeout_s=5, deadline_s=10)
    # A long flush interval: turns stay in the writer queue while the test sends feedback.
    sink = StoreSink(db_url, tmp_path / "spool", flush_interval_s=5)
    sink.feedback_wait_s = 1.5
    settings = Settings(routes=[route], api_keys=["sk-test"], admin_key=ADMIN_KEY)
    with serve_in_thread(create_app(settings, critic=TableCritic({}), sink=sink)) as base:
        yield base, sink, db_url


def _turn(base: str, headers: dict | None = None) -> str:
    client = openai.OpenAI(base_url=base + "/v1", api_key="sk-test", max_retries=0,
                           default_headers=headers or {})
    raw = client.chat.completions.with_raw_response.create(model="gpt-test",
                                                           messages=[{"role": "user", "content": "hi"}])
    return raw.headers["x-turngate-turn-id"]


def test_feedback_on_a_turn_still_in_the_queue_is_accepted_and_idempotent(proxy):
    base, sink, _ = proxy
    turn_id = _turn(base)
    assert turn_id in sink.pending_ids  # not in the database yet
    body = {"turn_id": turn_id, "reward": 1.0, "label": "solved", "comment": "great", "id": "client-fb-1"}
    first = httpx.post(base + "/v1/feedback", json=body, headers=KEY)
    assert first.status_code == 200, first.text
    again = httpx.post(base + "/v1/feedback", json={**body, "reward": 0.0}, headers=KEY)
    assert again.status_code == 200
    assert again.json()["id"] == first.json()["id"] and again.json()["duplicate"] is True
    assert again.json()["reward"] == 1.0 and first.json()["duplicate"] is False


def test_feedback_on_a_conversation_by_the_clients_own_id(proxy):
    base, _, _ = proxy
    _turn(base, {"x-turngate-conversation-id": "agent-session-42"})
    r = httpx.post(base + "/v1/feedback", json={"conversation_id": "agent-session-42", "reward": 0.5},
                   headers=KEY)
    assert r.status_code == 200, r.text
    assert r.json()["conversation_id"].startswith("conv-") and r.json()["source"] == "api"


@pytest.mark.parametrize("body, param", [
    ({"turn_id": "turn-x", "reward": 1.5}, "reward"),
    ({"turn_id": "turn-x", "reward": -0.1}, "reward"),
    ({"turn_id": "turn-x"}, None),
    ({"reward": 1.0}, None),
    ({"turn_id": "turn-x", "conversation_id": "c", "reward": 1}, None),
    ({"turn_id": "turn-x", "reward": 1, "unexpected": True}, "unexpected"),
])
def test_invalid_feedback_is_a_400_in_the_openai_envelope(proxy, body, param):
    base, _, _ = proxy
    r = httpx.post(base + "/v1/feedback", json=body, headers=KEY)
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["message"]
    if param:
        assert err["param"] == param


def test_unknown_ids_are_404_and_a_key_is_required(proxy):
    base, _, _ = proxy
    r = httpx.post(base + "/v1/feedback", json={"turn_id": "turn-" + "0" * 32, "reward": 1}, headers=KEY)
    assert r.status_code == 404 and r.json()["error"]["code"] == "turn_not_found"
    r = httpx.post(base + "/v1/feedback", json={"conversation_id": "nobody", "label": "bad"}, headers=KEY)
    assert r.status_code == 404 and r.json()["error"]["code"] == "conversation_not_found"
    r = httpx.post(base + "/v1/feedback", json={"turn_id": "turn-x", "reward": 1})
    assert r.status_code == 401
    r = httpx.post(base + "/v1/feedback", content=b"{not json", headers={**KEY, "content-type": "application/json"})
    assert r.status_code == 400


def test_turn_flushed_late_by_another_replica_is_found(proxy, tmp_path):
    base, _, url = proxy
    late = record([{"role": "user", "content": "served elsewhere"}], "ok",
                  key_id=hashlib.sha256(b"sk-test").hexdigest()[:12])  # the key_id of KEY

    async def other_replica_writes() -> None:
        other = StoreSink(url, tmp_path / "other-spool")
        await other.start()
        other.enqueue(late)
        await other.stop()

    timer = threading.Timer(0.6, lambda: asyncio.run(other_replica_writes()))
    timer.start()
    try:
        r = httpx.post(base + "/v1/feedback", json={"turn_id": late.turn_id, "reward": 0.0}, headers=KEY)
    finally:
        timer.join()
    assert r.status_code == 200, r.text
    assert r.json()["conversation_id"].startswith("conv-")


def test_feedback_waiting_for_unknown_turns_holds_no_connection(proxy):
    # More waits than the engine's pool has connections (PostgreSQL 4+4, SQLite 5+10): each used to
    # hold one for its whole wait, and every other reader of the store queued behind them.
    base, sink, _ = proxy
    # A wait long enough that holding connections through it cannot pass for a slow machine: CI once
    # took 1.0-1.2 s here, with the fix, against 0.1 s on the same kind of machine.
    sink.feedback_wait_s = 6.0
    queued = _turn(base)
    with ThreadPoolExecutor(max_workers=24) as pool:
        waiting = [pool.submit(httpx.post, base + "/v1/feedback", json={"turn_id": f"turn-nope{i}", "label": "x"},
                               headers=KEY, timeout=30) for i in range(24)]
        time.sleep(0.3)  # all of them waiting now
        started = time.perf_counter()
        listed = httpx.get(base + "/v1/admin/turns", params={"limit": 1}, headers=ADMIN)
        accepted = httpx.post(base + "/v1/feedback", json={"turn_id": queued, "reward": 1.0}, headers=KEY)
        took = time.perf_counter() - started
        unknown = [f.result().status_code for f in waiting]
    assert listed.status_code == 200, listed.text
    assert accepted.status_code == 200, accepted.text
    # Holding a connection a wait, the first 8 waits kept the pool 6 s, less the 0.3 s slept: 5.7 s at least.
    assert took < 3.0
    assert unknown == [404] * 24
