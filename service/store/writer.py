"""Writing a batch of turn records in one transaction: thread them into conversations, then
multi-row inserts. Idempotent by turn id (ON CONFLICT DO NOTHING), so a replayed batch is safe.
Every row passes the record boundary (service.store.boundary) on its way: whatever a record holds,
its rows fit the tables."""

from __future__ import annotations

import dataclasses
import time
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime
from operator import attrgetter
from typing import Any

import asyncpg
import orjson
from sqlalchemy import func, select, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from service.gate.record import TurnRecord
from service.store.boundary import fit_columns, fit_time
from service.store.conversations import ThreadKeys, new_conversation_id, thread_keys
from service.store.models import Candidate, Conversation, ConversationLink, CriticVersion, Turn


class LinkCache:
    """A small LRU of prefix hash -> conversation id in front of the conversation_links table."""

    def __init__(self, size: int = 100_000) -> None:
        self.size = size
        self._d: OrderedDict[str, str] = OrderedDict()

    def get(self, key: str) -> str | None:
        v = self._d.get(key)
        if v is not None:
            self._d.move_to_end(key)
        return v

    def put(self, key: str, value: str) -> None:
        self._d[key] = value
        self._d.move_to_end(key)
        if len(self._d) > self.size:
            self._d.popitem(last=False)

    def clear(self) -> None:
        """After a failed write: entries put by it may name conversations that were never committed."""
        self._d.clear()


def utc(ts: float) -> datetime:
    return fit_time(ts)


@dataclass
class Prepared:
    """A batch made ready off the event loop: threading keys and rows, column by column (JSON already
    encoded for SQLite and PostgreSQL's bulk path; conversation ids are filled in by thread_rows)."""

    records: list[TurnRecord]  # the batch, each turn id once
    keys: list[ThreadKeys]
    turns: dict[str, list[Any]]  # column -> a value per record
    candidates: dict[str, list[Any]]  # column -> a value per candidate of every record
    conversations: dict[str, list[Any]]  # key_id, external_id: a fitted value per record
    encoded: bool

    def turn_rows(self) -> list[dict[str, Any]]:
        return rows_of(self.turns)

    def candidate_rows(self) -> list[dict[str, Any]]:
        return rows_of(self.candidates)


def rows_of(columns: dict[str, list[Any]]) -> list[dict[str, Any]]:
    names = list(columns)
    return [dict(zip(names, values)) for values in zip(*columns.values())]


def columns_of(rows: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """rows_of's inverse."""
    return {c: [r[c] for r in rows] for c in rows[0]} if rows else {}


# Records prepared between two hand-overs of the GIL: a thread running Python keeps the GIL until
# another has waited 5 ms (CPython's switch interval), so a whole batch prepared in one go would stall
# the event loop that long. A chunk is prepared column by column, a few calls a column whatever its
# length, so longer chunks cost less a turn (`bench/store_instructions.py --parts prepare --batch B`,
# instructions a turn: 139,000 for a batch of 16, 110,000 for one of 32). 32 turns hold the GIL about
# as long as the 16 of row-by-row preparation did (3.5 M instructions against 2.7 M).
GIL_CHUNK = 32


def prepare(records: list[TurnRecord], encode_json: bool = False) -> Prepared:
    """CPU work (hashing, row building, fitting, JSON encoding); the sink runs it in a thread, which
    lets the GIL go every GIL_CHUNK records."""
    last = {r.turn_id: i for i, r in enumerate(records)}  # a turn twice: the later record wins
    records = [r for i, r in enumerate(records) if last[r.turn_id] == i]
    prepared = Prepared(records, [], {}, {}, {}, encode_json)
    for i in range(0, len(records), GIL_CHUNK):
        if i:
            time.sleep(0)  # releases the GIL: a thread waiting for it (the event loop) takes it now
        _add_rows(prepared, records[i:i + GIL_CHUNK])
    return prepared


def _add_rows(prepared: Prepared, records: list[TurnRecord]) -> None:
    keys = [thread_keys(r) for r in records]
    prepared.keys += keys
    encode = prepared.encoded
    _extend(prepared.turns, fit_columns(Turn.__table__, turn_columns(records, keys), encode))
    _extend(prepared.candidates, fit_columns(Candidate.__table__, candidate_columns(records), encode))
    _extend(prepared.conversations, fit_columns(Conversation.__table__, {
        "key_id": [r.conversation.key_id for r in records], "external_id": [k.external_id for k in keys]}))


def _extend(columns: dict[str, list[Any]], more: dict[str, list[Any]]) -> None:
    for name, values in more.items():
        columns.setdefault(name, []).extend(values)


# Turn and candidate columns copied from the record's attribute of the same name (or the one given).
_TURN_COPIED = {"id": "turn_id", "request_messages": "request_messages", "tools": "tools", "route": "route",
                "mode": "mode", "upstream_model": "upstream_model", "decision": "decision",
                "chosen_index": "chosen_index", "critic_name": "critic_name", "critic_version": "critic_version",
                "latency_total_ms": "latency_total_ms", "latency_upstream_ms": "latency_upstream_ms",
                "latency_critic_ms": "latency_critic_ms", "prompt_tokens": "prompt_tokens",
                "completion_tokens": "completion_tokens", "rounds": "rounds", "candidates_saved": "candidates_saved",
                "error": "error", "decided_by": "decided_by", "judge_reason": "judge_reason",
                "critics_agreed": "critics_agreed", "judge_prompt_tokens": "judge_prompt_tokens",
                "judge_completion_tokens": "judge_completion_tokens"}
_CANDIDATE_COPIED = {"idx": "index", "round": "round", "message": "message", "finish_reason": "finish_reason",
                     "verdict": "verdict", "veto_reason": "veto_reason", "veto_detail": "veto_detail",
                     "score": "score", "features": "features", "contributions": "contributions",
                     "upstream_latency_ms": "upstream_latency_ms", "prompt_tokens": "prompt_tokens",
                     "completion_tokens": "completion_tokens", "usage": "usage", "logprobs": "logprobs",
                     "upstream_request_id": "upstream_request_id", "judge_score": "judge_score",
                     "judge_reason": "judge_reason"}
_turn_values = attrgetter(*_TURN_COPIED.values())
_candidate_values = attrgetter(*_CANDIDATE_COPIED.values())


def turn_columns(records: list[TurnRecord], keys: list[ThreadKeys]) -> dict[str, list[Any]]:
    """The turns' rows, column by column, as the records hold them (conversation_id: to be threaded)."""
    columns: dict[str, list[Any]] = {"conversation_id": [""] * len(records), "idx": [k.idx for k in keys]}
    copied = zip(*map(_turn_values, records)) if records else [[] for _ in _TURN_COPIED]
    columns.update(zip(_TURN_COPIED, map(list, copied)))
    columns["client_metadata"] = [m if isinstance(m := r.conversation.metadata, dict) else None for r in records]
    columns["feedback_texts"] = [r.feedback or None for r in records]
    columns["upstream_errors"] = [[dataclasses.asdict(e) for e in r.upstream_errors] or None for r in records]
    columns["created_at"] = [utc(r.created_at) for r in records]
    return columns


def candidate_columns(records: list[TurnRecord]) -> dict[str, list[Any]]:
    """Every record's candidates' rows, column by column."""
    candidates = [c for r in records for c in r.candidates]
    columns: dict[str, list[Any]] = {"turn_id": [r.turn_id for r in records for _ in r.candidates]}
    copied = zip(*map(_candidate_values, candidates)) if candidates else [[] for _ in _CANDIDATE_COPIED]
    columns.update(zip(_CANDIDATE_COPIED, map(list, copied)))
    return columns


def thread_rows(prepared: Prepared, found: dict[str, str]) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Puts each turn in its conversation (`found`: prefix hash -> conversation id, from the cache
    and the links table; extended here). Returns the conversation rows, sorted by id (replicas
    upserting the same conversations then lock rows in one order), and the links to add."""
    if not prepared.records:
        return [], {}
    conversations: dict[str, dict[str, Any]] = {}
    links: dict[str, str] = {}
    ids: list[str] = []
    turns, convs = prepared.turns, prepared.conversations
    for r, k, at, route, key_id, external_id in zip(prepared.records, prepared.keys, turns["created_at"],
                                                    turns["route"], convs["key_id"], convs["external_id"]):
        conv = (k.explicit_id or (k.lookup_hash and found.get(k.lookup_hash))
                or new_conversation_id(r.turn_id, r.created_at))
        if k.link_hash:
            found[k.link_hash] = links[k.link_hash] = conv  # a later turn of this batch may need it
        ids.append(conv)
        seen = conversations.get(conv)
        if seen is None:
            conversations[conv] = {"id": conv, "first_seen": at, "last_seen": at, "route": route,
                                   "key_id": key_id, "external_id": external_id}
        else:
            seen["first_seen"], seen["last_seen"] = min(seen["first_seen"], at), max(seen["last_seen"], at)
    turns["conversation_id"] = ids
    return [conversations[c] for c in sorted(conversations)], links


def new_critics(prepared: Prepared, seen: set) -> set[tuple[str, str]]:
    """The critic name/version pairs of the batch not in `seen`."""
    if not prepared.records:
        return set()
    turns = prepared.turns
    return {(n, v) for n, v in zip(turns["critic_name"], turns["critic_version"]) if n and v} - seen


def _insert(conn: AsyncConnection, table):
    return (postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert)(table)


def cached_links(prepared: Prepared, cache: LinkCache) -> tuple[dict[str, str], list[str]]:
    """The prefix hashes the batch looks up: those the cache knows (hash -> conversation id) and
    the rest, sorted, to be read from conversation_links."""
    wanted = {k.lookup_hash for k in prepared.keys if k.explicit_id is None and k.lookup_hash}
    found = {h: c for h in wanted if (c := cache.get(h))}
    return found, sorted(wanted - found.keys())


async def write_batch(conn: AsyncConnection, prepared: Prepared, cache: LinkCache,
                      seen_critics: set | None = None) -> None:
    """Writes a prepared batch (in served order) inside the caller's transaction."""
    if conn.dialect.name == "postgresql" and prepared.encoded:
        await conn.execute(text("SET LOCAL lock_timeout = '5s'"))
        raw = (await conn.get_raw_connection()).driver_connection
        links, critics = await write_pg_batch(raw, prepared, cache, seen_critics)
        remember(cache, links, seen_critics, critics)
        return
    found, missing = cached_links(prepared, cache)
    for i in range(0, len(missing), 1000):
        rows = await conn.execute(select(ConversationLink.prefix_hash, ConversationLink.conversation_id)
                                  .where(ConversationLink.prefix_hash.in_(missing[i:i + 1000])))
        found.update((h, c) for h, c in rows)

    conv_rows, links = thread_rows(prepared, found)
    # Conversations first (sorted: see thread_rows). The sink writes SQLite with
    # service.store.sqlite_batch and PostgreSQL with write_pg_batch; this path serves an in-memory
    # SQLite, `turngate import` to SQLite and tests.
    stmt = _insert(conn, Conversation)
    await conn.execute(stmt.on_conflict_do_update(index_elements=["id"], set_={
        "last_seen": func.max(Conversation.last_seen, stmt.excluded.last_seen)}), conv_rows)
    await conn.execute(_insert(conn, Turn).on_conflict_do_nothing(index_elements=["id"]), prepared.turn_rows())
    if candidate_rows := prepared.candidate_rows():
        await conn.execute(_insert(conn, Candidate).on_conflict_do_nothing(), candidate_rows)
    if links:
        now = datetime.now(UTC)
        link_rows = [{"prefix_hash": h, "conversation_id": c, "created_at": now} for h, c in sorted(links.items())]
        await conn.execute(_insert(conn, ConversationLink).on_conflict_do_nothing(), link_rows)
    critics = new_critics(prepared, seen_critics or set())
    if critics:
        now = datetime.now(UTC)
        await conn.execute(_insert(conn, CriticVersion).on_conflict_do_nothing(),
                           [{"name": n, "version": v, "created_at": now} for n, v in sorted(critics)])
    remember(cache, links, seen_critics, critics)


def remember(cache: LinkCache, links: dict[str, str], seen_critics: set | None, critics: set) -> None:
    """What a written batch teaches the writer: its new links, the critics it recorded."""
    for h, c in links.items():
        cache.put(h, c)
    if seen_critics is not None:
        seen_critics |= critics


async def write_pg_batch(raw: asyncpg.Connection, prepared: Prepared, cache: LinkCache,
                         seen_critics: set | None = None) -> tuple[dict[str, str], set]:
    """Writes a prepared, encoded batch to PostgreSQL through asyncpg itself, inside the caller's
    transaction: COPY for turns and candidates, INSERT ... SELECT FROM json_to_recordset for the
    rest (SQLAlchemy's per-row parameter handling costs more than the database's own work). Returns
    the links and the critics it added, for the caller to remember once the transaction commits."""
    found, missing = cached_links(prepared, cache)
    for i in range(0, len(missing), 1000):
        found.update(await raw.fetch("SELECT prefix_hash, conversation_id FROM conversation_links "
                                     "WHERE prefix_hash = ANY($1::text[])", missing[i:i + 1000]))
    conv_rows, links = thread_rows(prepared, found)
    # Conversations first (sorted: see thread_rows).
    await _pg_bulk(raw, Conversation.__table__, conv_rows, conflict="ON CONFLICT (id) DO UPDATE "
                   "SET last_seen = greatest(conversations.last_seen, excluded.last_seen)")
    new_turns = await _pg_insert_new(raw, Turn.__table__, prepared.turns)
    cands = prepared.candidates
    if len(new_turns) != len(prepared.records):
        keep = [t in new_turns for t in cands["turn_id"]]
        cands = {c: [v for v, k in zip(values, keep) if k] for c, values in cands.items()}
    # Candidates of turns inserted just now cannot exist yet (foreign key): plain COPY.
    await _pg_copy(raw, Candidate.__table__, cands)
    now = datetime.now(UTC)
    await _pg_bulk(raw, ConversationLink.__table__, [{"prefix_hash": h, "conversation_id": links[h], "created_at": now}
                                                     for h in sorted(links)])
    critics = new_critics(prepared, seen_critics or set())
    await _pg_bulk(raw, CriticVersion.__table__, [{"name": n, "version": v, "created_at": now}
                                                  for n, v in sorted(critics)])
    return links, critics


_PG_TYPES = {"STRING": "text", "VARCHAR": "text", "TEXT": "text", "INTEGER": "int4", "BIGINT": "int8",
             "DOUBLE": "float8", "FLOAT": "float8", "DATETIME": "timestamptz", "JSON": "jsonb",
             "BOOLEAN": "bool"}


def _pg_type(col) -> str:
    name = type(col.type).__name__.upper()
    return next(v for k, v in _PG_TYPES.items() if name.startswith(k))


# The PostgreSQL bulk path takes a batch column by column, as prepare built it: COPY's records are
# the columns zipped (no row dicts in between).
async def _pg_copy(raw, table, columns: dict[str, list[Any]]) -> None:
    if columns and columns[next(iter(columns))]:
        await raw.copy_records_to_table(table.name, records=list(zip(*columns.values())), columns=list(columns))


async def _pg_insert_new(raw, table, columns: dict[str, list[Any]]) -> set[str]:
    """Inserts the rows whose id is new; returns those ids. Usually none exists (only a replayed
    batch meets its own earlier rows), so COPY is tried first, inside a savepoint; on a duplicate
    it falls back to INSERT ... ON CONFLICT DO NOTHING RETURNING id."""
    if not columns or not columns["id"]:
        return set()
    try:
        async with raw.transaction():  # a savepoint inside the writer's transaction
            await _pg_copy(raw, table, columns)
        return set(columns["id"])
    except asyncpg.UniqueViolationError:
        return set(await _pg_bulk(raw, table, rows_of(columns), returning="id"))


async def _pg_bulk(raw, table, rows: list[dict[str, Any]], returning: str | None = None,
                   conflict: str = "ON CONFLICT DO NOTHING") -> list:
    """One INSERT ... SELECT FROM json_to_recordset(the rows as one JSON text) ON CONFLICT ...: a
    single round trip with a cached prepared statement. orjson encodes the rows for a fraction of
    what asyncpg's encoding of an array per column (unnest) cost the writer's loop (docs/store.md,
    "Eighth pass"). JSON columns arrive encoded by prepare: text in the recordset, parsed by the cast."""
    if not rows:
        return []
    cols = [(c.name, _pg_type(c)) for c in table.c if c.name in rows[0]]
    names = ", ".join(f'"{n}"' for n, _ in cols)
    spec = ", ".join(f'"{n}" {"text" if t == "jsonb" else t}' for n, t in cols)
    values = ", ".join(f'"{n}"::jsonb' if t == "jsonb" else f'"{n}"' for n, t in cols)
    sql = (f"INSERT INTO {table.name} ({names}) SELECT {values} FROM json_to_recordset($1::json) AS r({spec}) "
           f"{conflict}")
    payload = orjson.dumps(rows).decode()
    if returning:
        return [r[0] for r in await raw.fetch(f"{sql} RETURNING {returning}", payload)]
    await raw.execute(sql, payload)
    return []
