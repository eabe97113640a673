"""Fixtures for the store tests: real PostgreSQL databases (created and dropped per session) and
SQLite files, both migrated with Alembic; helpers to build turn records."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from sqlalchemy import text

from service.gate.record import CandidateRecord, ConversationHint, TurnRecord, new_turn_id
from service.store.engine import make_sync_engine
from service.store.migrate import upgrade
from service.store.sink import StoreSink

PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"


def _admin(sql: str) -> None:
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(sql)


@pytest.fixture(scope="session")
def make_pg_db() -> Iterator:
    """make_pg_db(migrate=True) -> URL of a fresh, uniquely named database (dropped at the end)."""
    try:
        _admin("SELECT 1")
    except psycopg.OperationalError as e:  # pragma: no cover - CI always has it
        pytest.skip(f"PostgreSQL not reachable on 127.0.0.1:5432: {e}")
    created: list[str] = []

    def make(migrate: bool = True) -> str:
        name = f"turngate_test_{uuid.uuid4().hex[:12]}"
        _admin(f'CREATE DATABASE "{name}"')
        created.append(name)
        url = f"postgresql://postgres@127.0.0.1:5432/{name}"
        if migrate:
            upgrade(url)
        return url

    yield make
    for name in created:
        _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def shared_pg_db(make_pg_db) -> str:
    return make_pg_db()


TABLES = ("conversations, turns, candidates, feedback, conversation_links, critic_versions, api_keys, route_overrides, "
          "audit_log, candidate_labels")


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path) -> str:
    """A migrated, empty database of each kind. PostgreSQL: one per session, emptied per test
    (creating and dropping a database per test costs seconds each)."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path}/store.db"
        upgrade(url)
        return url
    url = request.getfixturevalue("shared_pg_db")
    upgrade(url)  # a test may have downgraded it
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"TRUNCATE {TABLES} CASCADE")
    return url


def pg_admin(sql: str) -> None:
    _admin(sql)


def db_name(url: str) -> str:
    return url.rsplit("/", 1)[1]


def record(messages: list[dict], reply: str | dict, *, n: int = 4, header: str | None = None,
           metadata: dict | None = None, key_id: str | None = "k1", user: str | None = None) -> TurnRecord:
    """A ranked turn: n candidates, the one at index 1 chosen (its message is `reply`)."""
    chosen = reply if isinstance(reply, dict) else {"role": "assistant", "content": reply}
    cands = [CandidateRecord(index=i, round=0, finish_reason="stop", score=round(0.2 * i, 3),
                             upstream_latency_ms=12.5, prompt_tokens=100, completion_tokens=20,
                             message=chosen if i == 1 else {"role": "assistant", "content": f"alt {i}"})
             for i in range(n)]
    return TurnRecord(turn_id=new_turn_id(), route="gpt-test", mode="rank", upstream_model="actor-model",
                      request_messages=messages, decision="ranked", chosen_index=1, critic_name="table",
                      critic_version="test", latency_total_ms=30.0, candidates=cands,
                      conversation=ConversationHint(header_id=header, user=user, metadata=metadata,
                                                    key_id=key_id))


async def store_turns(db_url: str, tmp_path, *turns) -> dict:
    """The turns written by the real sink, as the gate's records are (a new sink: nothing cached);
    returns its health once they are written."""
    sink = StoreSink(db_url, tmp_path / "spool")
    await sink.start()
    for turn in turns:
        sink.enqueue(turn)
    assert await sink.flush()
    health = sink.health()
    await sink.stop()
    return health


def sql(url: str, query: str) -> list[Any]:
    """Rows of `query` on the store at `url`, read through a sync engine of its own."""
    engine = make_sync_engine(url)
    try:
        with engine.connect() as conn:
            return list(conn.execute(text(query)).all())
    finally:
        engine.dispose()
