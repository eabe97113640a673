"""Engines for the store: async (the writer, the feedback API) and sync (CLI, export)."""

from __future__ import annotations

import json
from typing import Any

import orjson
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from service.store.urls import async_url, is_sqlite, sync_url


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    # Cascading deletes (prune) need foreign keys on; WAL lets the CLI read while the writer writes.
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=5000")
    cur.close()


def json_text(value: Any) -> str:
    """JSON columns' text on SQLite, for what goes through SQLAlchemy (the API, `turngate import`;
    the writer encodes its rows itself, service.store.sqlite_batch): orjson does it several times
    faster than json.dumps. Values reach it fitted by the record
    boundary, whose non-finite numbers are null either way; what orjson refuses (lone surrogates,
    huge integers: only from elsewhere) takes the standard library's path, as before."""
    try:
        return orjson.dumps(value).decode()
    except TypeError:
        return json.dumps(value)


# PostgreSQL: how long to wait for a connection, and for any one statement (the writer's own
# connection, service.store.pg_batch, uses the same).
CONNECT_TIMEOUT_S = 2.0
COMMAND_TIMEOUT_S = 10.0


def make_async_engine(url: str, *, connect_timeout_s: float = CONNECT_TIMEOUT_S,
                      command_timeout_s: float = COMMAND_TIMEOUT_S) -> AsyncEngine:
    if is_sqlite(url):
        engine = create_async_engine(async_url(url), json_serializer=json_text)
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        return engine
    return create_async_engine(
        async_url(url), pool_size=4, max_overflow=4, pool_pre_ping=True,
        connect_args={"timeout": connect_timeout_s, "command_timeout": command_timeout_s})


def make_sync_engine(url: str) -> Engine:
    if is_sqlite(url):
        engine = create_engine(sync_url(url), json_serializer=json_text)
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(sync_url(url), pool_pre_ping=True, connect_args={"connect_timeout": 5})
