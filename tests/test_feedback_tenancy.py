"""Feedback is scoped by client key: one key can neither read nor label another key's turns,
conversations or idempotent feedback rows; a foreign id answers like an unknown one (404). Through
the real proxy and store, on SQLite and PostgreSQL."""

# ruff: noqa: F811 - the fixtures are imported from tests.test_store_support

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime

import httpx
import openai
import pytest
from sqlalchemy import func, select

from service.app import create_app
from service.demo.fake_actor import serve_in_thread
from service.settings import RouteSettings, Settings
from service.store.engine import make_sync_engine
from service.store.models import Feedback
from service.store.sink import StoreSink
from tests.conftest import TableCritic
from tests.test_store_support import db_url, make_pg_db, shared_pg_db  # noqa: F401 - fixtures

A, B = "sk-tenant-a", "sk-tenant-b"


def _serve(actor, db_url, tmp_path, api_keys: list[str], flush_interval_s: float):
    route = RouteSettings(alias="gpt-test", upstream_base_url=actor[1], upstream_model="actor-model",
                          candidates=2, mode="rank", attempt_timeout_s=5, deadline_s=10)
    sink = StoreSink(db_url, tmp_path / "spool", flush_interval_s=flush_interval_s)
    sink.feedback_wait_s = 0.5
    app = create_app(Settings(routes=[route], api_keys=api_keys), critic=TableCritic({}), sink=sink)
    return serve_in_thread(app), sink


@pytest.fixture
def tenants(actor, db_url, tmp_path):
    server, sink = _serve(actor, db_url, tmp_path, [A, B], flush_interval_s=5)
    with server as base:
        yield base, sink, db_url


def _turn(base: str, key: str, conversation: str | None = None) -> str:
    headers = {"x-turngate-conversation-id": conversation} if conversation else {}
    client = openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0, default_headers=headers)
    raw = client.chat.completions.with_raw_response.create(model="gpt-test",
                                                           messages=[{"role": "user", "content": "hi"}])
    return raw.headers["x-turngate-turn-id"]


def _feedback(base: str, key: str | None, **body) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.post(base + "/v1/feedback", json=body, headers=headers, timeout=10)


def _rows(url: str, client_id: str) -> int:
    engine = make_sync_engine(url)
    try:
        with engine.connect() as conn:
            return conn.execute(select(func.count()).select_from(Feedback)
                                .where(Feedback.client_id == client_id)).scalar_one()
    finally:
        engine.dispose()


def test_the_same_idempotency_id_under_two_keys_makes_two_rows(tenants):
    base, _, url = tenants
    turn_a, turn_b = _turn(base, A), _turn(base, B)
    first_a = _feedback(base, A, turn_id=turn_a, reward=1.0, comment="A's private note", id="fb-shared")
    assert first_a.status_code == 200, first_a.text
    first_b = _feedback(base, B, turn_id=turn_b, reward=0.0, comment="B's note", id="fb-shared")
    assert first_b.status_code == 200, first_b.text
    assert first_b.json()["duplicate"] is False and first_b.json()["id"] != first_a.json()["id"]
    assert first_b.json()["comment"] == "B's note" and first_b.json()["turn_id"] == turn_b
    # Each key's retry gets its own row back, never the other's.
    again_b = _feedback(base, B, turn_id=turn_b, reward=0.5, id="fb-shared")
    assert again_b.json()["duplicate"] is True and again_b.json()["id"] == first_b.json()["id"]
    again_a = _feedback(base, A, turn_id=turn_a, reward=0.5, id="fb-shared")
    assert again_a.json()["id"] == first_a.json()["id"] and again_a.json()["comment"] == "A's private note"
    assert _rows(url, "fb-shared") == 2


@pytest.mark.parametrize("flushed", [False, True], ids=["queued", "in-database"])
def test_another_keys_turn_is_404_like_an_unknown_one(tenants, flushed):
    base, sink, _ = tenants
    turn_a = _turn(base, A)
    if flushed:  # the writer flushes every 5 s
        deadline = time.monotonic() + 15
        while turn_a in sink.pending_ids and time.monotonic() < deadline:
            time.sleep(0.1)
        assert turn_a not in sink.pending_ids
    else:
        assert turn_a in sink.pending_ids
    foreign = _feedback(base, B, turn_id=turn_a, reward=0.0, comment="poison")
    unknown = _feedback(base, B, turn_id="turn-" + "0" * 32, reward=0.0)
    assert foreign.status_code == unknown.status_code == 404
    assert foreign.json()["error"]["code"] == unknown.json()["error"]["code"] == "turn_not_found"
    assert _feedback(base, A, turn_id=turn_a, reward=1.0).status_code == 200


def test_another_keys_conversation_is_404_by_either_id(tenants):
    base, _, _ = tenants
    turn_a = _turn(base, A, conversation="session-42")
    own = _feedback(base, A, conversation_id="session-42", reward=1.0)
    assert own.status_code == 200, own.text
    internal = own.json()["conversation_id"]
    for cid in ("session-42", internal):
        r = _feedback(base, B, conversation_id=cid, label="bad")
        assert r.status_code == 404 and r.json()["error"]["code"] == "conversation_not_found", cid
    # B's own conversation under the same client id is B's, not A's.
    _turn(base, B, conversation="session-42")
    mine = _feedback(base, B, conversation_id="session-42", label="good")
    assert mine.status_code == 200 and mine.json()["conversation_id"] != internal
    assert _feedback(base, A, turn_id=turn_a, label="ok").json()["conversation_id"] == internal


def test_anonymous_clients_stay_idempotent(actor, db_url, tmp_path):
    server, _ = _serve(actor, db_url, tmp_path, [], flush_interval_s=0.05)
    with server as base:
        # No key at all (the openai client insists on one).
        turn = httpx.post(base + "/v1/chat/completions", json={
            "model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]}).headers["x-turngate-turn-id"]
        first = _feedback(base, None, turn_id=turn, reward=1.0, id="anon-1")
        again = _feedback(base, None, turn_id=turn, reward=0.0, id="anon-1")
        assert first.status_code == again.status_code == 200, (first.text, again.text)
        assert again.json()["duplicate"] is True and again.json()["id"] == first.json()["id"]

        async def race() -> list[httpx.Response]:  # concurrent retries: the database decides
            async with httpx.AsyncClient(base_url=base, timeout=10) as client:
                return await asyncio.gather(*[client.post("/v1/feedback", json={
                    "turn_id": turn, "reward": 0.5, "id": "anon-race"}) for _ in range(8)])
        replies = asyncio.run(race())
        assert {r.status_code for r in replies} == {200}
        assert len({r.json()["id"] for r in replies}) == 1
        # A keyed client reusing an anonymous id gets its own row.
        keyed = _feedback(base, "sk-someone", turn_id=_turn(base, "sk-someone"), reward=1.0, id="anon-1")
        assert keyed.json()["duplicate"] is False
    assert _rows(db_url, "anon-1") == 2 and _rows(db_url, "anon-race") == 1


def test_upgrade_to_0002_keeps_feedback_and_scopes_ids_by_key(db_url):
    from sqlalchemy import insert
    from sqlalchemy.exc import IntegrityError

    from service.store.migrate import downgrade, upgrade

    downgrade(db_url, "0001")
    engine = make_sync_engine(db_url)
    row = {"turn_id": "turn-1", "reward": 1.0, "source": "api", "created_at": datetime.now(UTC)}
    try:
        with engine.begin() as conn:  # the old schema has no upstream_errors column: plain columns only
            conn.execute(insert(Feedback.__table__), [{**row, "client_id": "old-anon", "key_id": None},
                                                       {**row, "client_id": "old-keyed", "key_id": "k1"}])
        upgrade(db_url)
        with engine.begin() as conn:
            conn.execute(insert(Feedback.__table__), [{**row, "client_id": "old-keyed", "key_id": "k2"}])
        for dup in ({**row, "client_id": "old-anon", "key_id": None},
                    {**row, "client_id": "old-keyed", "key_id": "k1"}):
            with pytest.raises(IntegrityError), engine.begin() as conn:
                conn.execute(insert(Feedback.__table__), [dup])
    finally:
        engine.dispose()
    assert _rows(db_url, "old-anon") == 1 and _rows(db_url, "old-keyed") == 2
