"""Turns served through the real proxy while PostgreSQL connections are killed and while the
database refuses connections: after recovery every served turn is in the database exactly once."""

# ruff: noqa: F811 - the fixtures are imported from tests.test_store_support

from __future__ import annotations

import time

import httpx
import openai
import psycopg

from service.app import create_app
from service.demo.fake_actor import serve_in_thread
from service.settings import RouteSettings, Settings
from service.store.sink import StoreSink
from tests.conftest import TableCritic
from tests.test_store_support import db_name, make_pg_db, pg_admin  # noqa: F401 - fixtures


def _terminate(name: str) -> None:
    pg_admin(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
             f"WHERE datname = '{name}' AND pid <> pg_backend_pid()")


def _stored(url: str, ids: list[str]) -> tuple[int, int, set[str]]:
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT id FROM turns WHERE id = ANY(%s)", (ids,)).fetchall()
        (cands,) = conn.execute("SELECT count(*) FROM candidates WHERE turn_id = ANY(%s)", (ids,)).fetchone() or (0,)
    return len(rows), cands, {r[0] for r in rows}


def test_turns_survive_killed_connections_and_an_unreachable_database(actor, make_pg_db, tmp_path):
    _, actor_url = actor
    url = make_pg_db()
    name = db_name(url)
    route = RouteSettings(alias="gpt-test", upstream_base_url=actor_url, upstream_model="actor-model",
                          candidates=4, mode="rank", attempt_timeout_s=5, deadline_s=10)
    sink = StoreSink(url, tmp_path / "spool", flush_interval_s=0.1)
    served: list[str] = []
    with serve_in_thread(create_app(Settings(routes=[route]), critic=TableCritic({}), sink=sink)) as base:
        client = openai.OpenAI(base_url=base + "/v1", api_key="k", max_retries=0)

        def turns(n: int, tag: str) -> None:
            for i in range(n):
                raw = client.chat.completions.with_raw_response.create(
                    model="gpt-test", messages=[{"role": "user", "content": f"{tag} {i}"}])
                assert raw.parse().choices[0].message.content == "hi"
                served.append(raw.headers["x-turngate-turn-id"])

        turns(10, "healthy")
        deadline = time.monotonic() + 10
        while _stored(url, served)[0] < 10 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _stored(url, served)[0] == 10

        # The writer's pooled connections die under it.
        for i in range(10):
            turns(1, f"killed {i}")
            _terminate(name)

        # The database refuses every connection for a while.
        pg_admin(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        _terminate(name)
        turns(15, "outage")
        time.sleep(0.5)
        assert sink.db_ok is False and sink.spool.bytes > 0
        ready = httpx.get(base + "/readyz")
        assert ready.status_code == 200  # still taking turns: the spool holds them
        assert ready.json()["store"]["db_ok"] is False and ready.json()["store"]["spool_bytes"] > 0
        metrics = httpx.get(base + "/metrics").text
        assert "turngate_db_write_errors_total" in metrics
        pg_admin(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        turns(5, "recovered")

        deadline = time.monotonic() + 20
        while _stored(url, served)[0] < len(served) and time.monotonic() < deadline:
            time.sleep(0.1)
    count, cands, ids = _stored(url, served)
    assert len(served) == 40 == len(set(served))
    assert count == len(served) and ids == set(served)  # exactly once: ids are the primary key
    assert cands == 4 * len(served)
    assert not list((tmp_path / "spool").glob("seg-*"))


def test_embedded_sqlite_store_migrates_itself_and_records_turns(actor, tmp_path):
    """No sink given: the app builds the store from settings (the default embedded SQLite mode)."""
    import sqlite3

    _, actor_url = actor
    route = RouteSettings(alias="gpt-test", upstream_base_url=actor_url, upstream_model="actor-model",
                          candidates=3, mode="rank", attempt_timeout_s=5, deadline_s=10)
    db = tmp_path / "data" / "turngate.db"
    settings = Settings(routes=[route], database_url=f"sqlite:///{db}", spool_dir=str(tmp_path / "spool"))
    with serve_in_thread(create_app(settings, critic=TableCritic({}))) as base:
        client = openai.OpenAI(base_url=base + "/v1", api_key="k", max_retries=0)
        raw = client.chat.completions.with_raw_response.create(
            model="gpt-test", messages=[{"role": "user", "content": "hello"}],
            extra_headers={"x-turngate-conversation-id": "embedded-1"})
        turn_id = raw.headers["x-turngate-turn-id"]
        fb = httpx.post(base + "/v1/feedback", json={"turn_id": turn_id, "reward": 1},
                        headers={"authorization": "Bearer k"})
        assert fb.status_code == 200, fb.text
    # The app has shut down: the queue was drained into the file.
    with sqlite3.connect(db) as conn:
        turn = conn.execute("SELECT t.decision, c.external_id FROM turns t JOIN conversations c "
                            "ON c.id = t.conversation_id WHERE t.id = ?", (turn_id,)).fetchone()
        n_cands = conn.execute("SELECT count(*) FROM candidates WHERE turn_id = ?", (turn_id,)).fetchone()[0]
        critics = conn.execute("SELECT name, version FROM critic_versions").fetchall()
        rewards = conn.execute("SELECT reward FROM feedback WHERE turn_id = ?", (turn_id,)).fetchall()
    assert turn == ("ranked", "embedded-1") and n_cands == 3
    assert critics == [("table", "test")] and rewards == [(1.0,)]
