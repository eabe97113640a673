"""The writer's SQLite path: the standard library's sqlite3 on one thread of its own.

Through SQLAlchemy's async engine a batch cost several times SQLite's own work: per-row parameter
processing, greenlet switches, and aiosqlite's thread hop for every call. Here a batch is one call
on the writer thread: prepare (service.store.writer.prepare: threading keys, rows fitted by the
record boundary, JSON encoded once), then fixed INSERT ... ON CONFLICT statements (sqlite3 keeps
them compiled) executemany'd over the rows as tuples, in one BEGIN IMMEDIATE transaction. The event
loop only hands the batch over and takes the outcome back.

The values are what SQLAlchemy writes for these columns, so that everything reading the store
through SQLAlchemy (API, CLI, export, prune) sees the same rows: times as 'YYYY-MM-DD
HH:MM:SS.ffffff' (UTC), JSON as text with None as 'null', booleans as 0/1.
"""

from __future__ import annotations

import asyncio
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Table

from service.gate.record import TurnRecord
from service.store.boundary import column_kinds
from service.store.models import Candidate, Conversation, ConversationLink, CriticVersion, Turn
from service.store.writer import (
    LinkCache,
    Prepared,
    cached_links,
    columns_of,
    new_critics,
    prepare,
    remember,
    thread_rows,
)

_LOOKUP_CHUNK = 1000  # prefix hashes per SELECT ... IN (...)

# sqlite3 looks for an adapter for every parameter that is not exactly an int, float, str or
# bytearray. For None (SQL NULL: a third of a turn's values) and bool that search fails twice, each
# time formatting an AttributeError: about 3,000 instructions a value, 8% of the store's work
# (bench/proxy_instructions.py). Registered adapters answer from the registry, in C and with the
# values sqlite3 would bind anyway (NULL, 0/1); they apply to every sqlite3 connection of the process.
sqlite3.register_adapter(type(None), {}.get)  # type: ignore[arg-type]  # {}.get(None) is None
sqlite3.register_adapter(bool, int)


def sqlite_time(dt: datetime) -> str:
    """SQLAlchemy's SQLite DATETIME storage format (fixed width: text order is time order)."""
    return (f"{dt.year:04d}-{dt.month:02d}-{dt.day:02d} "
            f"{dt.hour:02d}:{dt.minute:02d}:{dt.second:02d}.{dt.microsecond:06d}")


class _Table:
    """One table's insert statement (positional parameters: sqlite3 binds a tuple cheaper than a
    dict) and the conversion of a batch's columns to its parameter tuples."""

    def __init__(self, table: Table, columns: list[str], conflict: str) -> None:
        kinds = column_kinds(table)
        self.sql = (f"INSERT INTO {table.name} ({', '.join(columns)}) "
                    f"VALUES ({', '.join('?' * len(columns))}) {conflict}")
        self.columns = columns
        self.json = {c for c in columns if kinds[c] == "json"}

    def params(self, columns: dict[str, list[Any]]) -> list[tuple]:
        """The rows' values in column order (JSON arrives encoded by prepare, times as text)."""
        ordered = []
        for c in self.columns:
            values = columns[c]
            if c in self.json and None in values:
                # SQLAlchemy's JSON type writes None as JSON null, not SQL NULL
                values = ["null" if v is None else v for v in values]
            ordered.append(values)
        return list(zip(*ordered))


class SqliteBatchWriter:
    """Writes batches to one SQLite file from a dedicated thread that owns the connection."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._pool: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None
        self._tables: dict[str, _Table] = {}

    def start(self) -> None:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="turngate-store-sqlite")

    async def stop(self) -> None:
        """Closes the connection on its thread, then lets the thread end."""
        pool, self._pool = self._pool, None
        if pool is None:
            return
        try:
            await asyncio.get_running_loop().run_in_executor(pool, self._close)
        finally:
            pool.shutdown(wait=False)

    async def write(self, records: list[TurnRecord], cache: LinkCache, critics: set) -> Prepared:
        """Prepares and writes the batch in one transaction; returns what was written. `cache` and
        `critics` are updated by the thread; the caller awaits before it touches them again."""
        if self._pool is None:
            raise RuntimeError("the SQLite writer is not started")
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._write, records, cache, critics)

    # -- on the writer thread ----------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        if self._conn is None:
            # isolation_level=None: transactions are this module's own BEGIN IMMEDIATE / COMMIT.
            conn = sqlite3.connect(self.path, timeout=5.0, isolation_level=None, cached_statements=64)
            try:
                conn.execute("PRAGMA foreign_keys=ON")
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA busy_timeout=5000")
            except BaseException:
                conn.close()
                raise
            self._conn = conn
        return self._conn

    def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def _write(self, records: list[TurnRecord], cache: LinkCache, critics: set) -> Prepared:
        prepared = prepare(records, encode_json=True)
        conn = self._connect()
        # IMMEDIATE: the write lock is taken (or waited for, busy_timeout) before the first read,
        # so another process's writer cannot make this transaction fail half way.
        conn.execute("BEGIN IMMEDIATE")
        try:
            self._insert(conn, prepared, cache, critics)
            conn.execute("COMMIT")
        except BaseException:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                self._close()  # a connection that cannot roll back is not used again
            raise
        return prepared

    def _insert(self, conn: sqlite3.Connection, prepared: Prepared, cache: LinkCache, critics: set) -> None:
        found, missing = cached_links(prepared, cache)
        for i in range(0, len(missing), _LOOKUP_CHUNK):
            chunk = missing[i:i + _LOOKUP_CHUNK]
            found.update(conn.execute(
                "SELECT prefix_hash, conversation_id FROM conversation_links WHERE prefix_hash IN "
                f"({', '.join('?' * len(chunk))})", chunk).fetchall())
        # Times as SQLite's text before threading: the conversation rows take theirs from the turns
        # (and compare them: text order is time order), so each is formatted once.
        turns = prepared.turns
        if prepared.records:
            turns["created_at"] = list(map(sqlite_time, turns["created_at"]))
        conv_rows, links = thread_rows(prepared, found)
        critics_new = new_critics(prepared, critics)

        self._many(conn, Conversation.__table__, columns_of(conv_rows),
                   "ON CONFLICT (id) DO UPDATE SET last_seen = max(conversations.last_seen, excluded.last_seen)")
        self._many(conn, Turn.__table__, turns, "ON CONFLICT (id) DO NOTHING")
        self._many(conn, Candidate.__table__, prepared.candidates, "ON CONFLICT DO NOTHING")
        now = sqlite_time(datetime.now(UTC))
        if links:
            hashes = sorted(links)
            self._many(conn, ConversationLink.__table__, {
                "prefix_hash": hashes, "conversation_id": [links[h] for h in hashes],
                "created_at": [now] * len(hashes)}, "ON CONFLICT DO NOTHING")
        if critics_new:
            rows = [{"name": n, "version": v, "created_at": now} for n, v in sorted(critics_new)]
            self._many(conn, CriticVersion.__table__, columns_of(rows), "ON CONFLICT DO NOTHING")
        # Only once the statements ran: a failed batch leaves both as they were (the sink also
        # clears the cache then, since an earlier batch's links may have been rolled back).
        remember(cache, links, critics, critics_new)

    def _many(self, conn: sqlite3.Connection, table: Table, columns: dict[str, list[Any]], conflict: str) -> None:
        if not columns or not next(iter(columns.values())):
            return
        key = f"{table.name} {conflict}"
        t = self._tables.get(key)
        if t is None:
            t = self._tables[key] = _Table(table, list(columns), conflict)
        conn.executemany(t.sql, t.params(columns))
