"""The store's writer: turns threaded into conversations, nothing lost when the queue is full or the
database is unreachable, replay after a restart, exactly once by turn id."""

# ruff: noqa: F811 - the fixtures are imported from tests.test_store_support

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest
from sqlalchemy import text

from service.demo.fake_actor import free_port
from service.store.sink import StoreSink
from tests.test_store_support import db_url, make_pg_db, record, shared_pg_db, sql, store_turns  # noqa: F401 - fixtures

# The shared trajectories (never copied into the repo): $TURNGATE_TRAJECTORIES, else shared/ beside
# the checkout (../shared beside the clone).
TRAJECTORIES = Path(os.environ.get("TURNGATE_TRAJECTORIES")
                    or Path(__file__).resolve().parents[2] / "shared" / "data" / "trajectories")
needs_trajectories = pytest.mark.skipif(not TRAJECTORIES.is_dir(),
                                        reason=f"shared trajectories not found at {TRAJECTORIES}")


def _first(name: str) -> dict:
    with open(TRAJECTORIES / name) as f:
        return json.loads(f.readline())


def as_turns(traj: dict, **hint) -> list:
    """The agent's view of a trajectory: one request per assistant message, whole history resent."""
    msgs = traj["messages"]
    return [record(msgs[:i], m, **hint) for i, m in enumerate(msgs) if m["role"] == "assistant"]


async def _rows(sink: StoreSink, query: str, **params) -> list:
    async with sink.engine.connect() as conn:
        return list((await conn.execute(text(query), params)).all())


async def _stored_once_released(sink: StoreSink, blocker, n: int) -> list[str]:
    """Ends the blocking transaction, waits (up to about 10 s) for the sink to write n turns, and
    returns the ids of the turns stored."""
    await blocker.rollback()
    await blocker.close()
    for _ in range(100):
        if sink.written >= n:
            break
        await sink.flush()
        await asyncio.sleep(0.1)  # past a retry's back-off
    return [r[0] for r in await _rows(sink, "SELECT id FROM turns")]


@needs_trajectories
async def test_replayed_trajectories_land_in_one_conversation_each(db_url, tmp_path):
    a = as_turns(_first("tau2-retail-toolorchestra.jsonl"))
    b = as_turns(_first("tau-bench-airline-gpt-4o.jsonl"))
    assert len(a) > 3 and len(b) > 3
    sink = StoreSink(db_url, tmp_path / "spool", batch_max=7)
    await sink.start()
    # Interleaved, as two agents talking through one gateway would be.
    for i in range(max(len(a), len(b))):
        for turns in (a, b):
            if i < len(turns):
                sink.enqueue(turns[i])
    assert await sink.flush()
    rows = await _rows(sink, "SELECT id, conversation_id, idx FROM turns")
    await sink.stop()
    by_id = {r[0]: (r[1], r[2]) for r in rows}
    assert len(by_id) == len(a) + len(b)
    conv_a = {by_id[t.turn_id][0] for t in a}
    conv_b = {by_id[t.turn_id][0] for t in b}
    assert len(conv_a) == 1 and len(conv_b) == 1 and conv_a != conv_b
    assert [by_id[t.turn_id][1] for t in a] == list(range(len(a)))


async def test_resent_reply_with_cosmetic_differences_still_threads(db_url, tmp_path):
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_order", "arguments": '{"order_id": "#W1", "full": true}'}}
    first = record([{"role": "user", "content": "where is my order"}],
                   {"role": "assistant", "content": None, "tool_calls": [call]})
    # The client echoes the reply back re-serialized: content missing, extra fields, compact JSON.
    echoed = {"role": "assistant", "refusal": None, "tool_calls": [
        {**call, "function": {"name": "get_order", "arguments": '{"full":true,"order_id":"#W1"}'}}]}
    second = record([{"role": "user", "content": "where is my order"}, echoed,
                     {"role": "tool", "tool_call_id": "call_1", "content": "shipped"}], "It shipped.")
    other_key = record(second.request_messages, "It shipped.", key_id="k2")
    sink = StoreSink(db_url, tmp_path / "spool")
    await sink.start()
    for r in (first, second, other_key):
        sink.enqueue(r)
    assert await sink.flush()
    conv = dict(await _rows(sink, "SELECT id, conversation_id FROM turns"))
    await sink.stop()
    assert conv[first.turn_id] == conv[second.turn_id]
    assert conv[other_key.turn_id] != conv[first.turn_id]  # another client's key never joins it


async def test_explicit_ids_win_over_message_prefix(db_url, tmp_path):
    h1 = record([{"role": "user", "content": "a"}], "x", header="client-conv-1")
    h2 = record([{"role": "user", "content": "something else"}], "y", header="client-conv-1")
    m1 = record([{"role": "user", "content": "b"}], "x", metadata={"session_id": "s-9"})
    m2 = record([{"role": "user", "content": "c"}], "y", metadata={"session_id": "s-9"})
    sink = StoreSink(db_url, tmp_path / "spool")
    await sink.start()
    for r in (h1, h2, m1, m2):
        sink.enqueue(r)
    assert await sink.flush()
    conv = dict(await _rows(sink, "SELECT id, conversation_id FROM turns"))
    ext = dict(await _rows(sink, "SELECT id, external_id FROM conversations"))
    await sink.stop()
    assert conv[h1.turn_id] == conv[h2.turn_id] != conv[m1.turn_id] == conv[m2.turn_id]
    assert ext[conv[h1.turn_id]] == "client-conv-1" and ext[conv[m1.turn_id]] == "s-9"


# Client-chosen ids as the writer must store them, byte for byte: quotes, backslashes, escapes,
# text that looks like JSON or SQL, control characters, other scripts and emoji, the longest kept.
AWKWARD_IDS = ['say "hi"', "back\\slash\\", '{"conversation_id": [1, null]}', "'; DROP TABLE turns; --",
               "tab\tnew\nline\x1f\x7f", "\u2028\u2029 ünïcödé 会話 🧪", "\\u0000 literal", "z" * 200]


async def test_awkward_client_ids_and_times_are_stored_exactly(db_url, tmp_path):
    firsts = [record([{"role": "user", "content": f"q{i}"}], f"a{i}", metadata={"conversation_id": ext})
              for i, ext in enumerate(AWKWARD_IDS)]
    await store_turns(db_url, tmp_path, *firsts)
    # The next turns, a minute later, carry no id: a new writer (nothing cached) threads them by their
    # message prefix alone, through the links the first writer stored.
    seconds = [record([*r.request_messages, r.chosen.message, {"role": "user", "content": "and?"}], "more")
               for r in firsts]
    for r in seconds:
        r.created_at = r.created_at + 60
    await store_turns(db_url, tmp_path, *seconds)
    conv = dict(sql(db_url, "SELECT id, conversation_id FROM turns"))
    at = dict(sql(db_url, "SELECT id, created_at FROM turns"))
    convs = {r[0]: r[1:] for r in sql(db_url, "SELECT id, external_id, first_seen, last_seen FROM conversations")}
    assert len(convs) == len(AWKWARD_IDS)
    for first, second, ext in zip(firsts, seconds, AWKWARD_IDS):
        assert conv[first.turn_id] == conv[second.turn_id]
        assert convs[conv[first.turn_id]] == (ext, at[first.turn_id], at[second.turn_id])


async def test_hostile_client_ids_are_fitted_and_still_thread(db_url, tmp_path):
    """A NUL, a lone surrogate and an id past the column's 200 characters: stored fitted (U+FFFD, a
    shortened stand-in), never refusing the batch, and the next turn still finds its conversation."""
    hostile = ["a\x00b", "bad \ud800 id", "y" * 5000]
    firsts = [record([{"role": "user", "content": f"h{i}"}], f"r{i}", metadata={"conversation_id": ext})
              for i, ext in enumerate(hostile)]
    seconds = [record([*r.request_messages, r.chosen.message, {"role": "user", "content": "next"}], "ok")
               for r in firsts]
    health = await store_turns(db_url, tmp_path, *firsts, *seconds)
    assert health["quarantined"] == 0 and health["last_error"] is None
    conv = dict(sql(db_url, "SELECT id, conversation_id FROM turns"))
    ext = dict(sql(db_url, "SELECT id, external_id FROM conversations"))
    assert all(conv[a.turn_id] == conv[b.turn_id] for a, b in zip(firsts, seconds))
    stored = [ext[conv[r.turn_id]] for r in firsts]
    assert stored[:2] == ["a\ufffdb", "bad \ufffd id"]
    assert stored[2].startswith("y" * 100) and len(stored[2]) <= 200


async def test_a_batch_meeting_its_own_earlier_rows_writes_only_the_new_turns_whole(db_url, tmp_path):
    """A replay after a commit whose acknowledgement was lost: the batch's first turn is stored
    already. The others are written with all their columns and candidates; nothing is doubled."""
    stored = record([{"role": "user", "content": "first"}], "one")
    awkward = [{"role": "user", "content": 'say "hi" \\ \u2028 会話 🧪 \x1f'},
               {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {
                   "name": "lookup", "arguments": '{"q": "\\"quoted\\""}'}}]},
               {"role": "tool", "tool_call_id": "c1", "content": '{"rows": [1, null, 2.5]}'}]
    new = record(awkward, "two", metadata={"tag": ['a "b"', None]})
    new.tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
    await store_turns(db_url, tmp_path, stored)
    health = await store_turns(db_url, tmp_path, stored, new)  # one batch, the first turn stored already
    turns = {r[0]: r[1:] for r in sql(db_url, "SELECT id, request_messages, tools, client_metadata FROM turns")}
    counts = dict(sql(db_url, "SELECT turn_id, count(*) FROM candidates GROUP BY turn_id"))
    assert health["quarantined"] == 0 and health["last_error"] is None  # written as one batch, as it was
    assert set(turns) == {stored.turn_id, new.turn_id}
    assert counts == {stored.turn_id: 4, new.turn_id: 4}

    def parsed(v):  # SQLite hands JSON back as text where PostgreSQL's JSONB gives objects
        return json.loads(v) if isinstance(v, str) else v
    assert [parsed(v) for v in turns[new.turn_id]] == [awkward, new.tools, {"tag": ['a "b"', None]}]


async def test_full_queue_spills_to_spool_and_loses_nothing(db_url, tmp_path):
    sink = StoreSink(db_url, tmp_path / "spool", max_queue=5, batch_max=3)
    await sink.start()
    records = [record([{"role": "user", "content": f"q{i}"}], f"a{i}") for i in range(200)]
    for r in records:  # no await in between: the writer cannot run, the queue overflows
        sink.enqueue(r)
    assert len(sink.queue) == 5 and sink.spool.bytes > 0
    await sink.stop()
    # Whatever stop() could not write is on disk; a new sink (a restart) replays it.
    sink2 = StoreSink(db_url, tmp_path / "spool")
    await sink2.start()
    assert await sink2.flush()
    ids = [r[0] for r in await _rows(sink2, "SELECT id FROM turns")]
    n_cand = (await _rows(sink2, "SELECT count(*) FROM candidates"))[0][0]
    await sink2.stop()
    assert sorted(ids) == sorted(r.turn_id for r in records)
    assert n_cand == 4 * len(records)
    assert not list((tmp_path / "spool").glob("seg-*"))


async def test_unreachable_database_spools_then_replays_exactly_once(make_pg_db, tmp_path):
    url = make_pg_db()
    spool = tmp_path / "spool"
    dead = StoreSink(f"postgresql://postgres@127.0.0.1:{free_port()}/nothing", spool, flush_interval_s=0.05)
    await dead.start()
    records = [record([{"role": "user", "content": f"q{i}"}], f"a{i}") for i in range(50)]
    for r in records[:30]:
        dead.enqueue(r)
    await asyncio.sleep(0.3)
    assert dead.db_ok is False and dead.ready is True and dead.spool.bytes > 0
    for r in records[30:]:
        dead.enqueue(r)
    await dead.stop()
    # Some turns were also written before the outage: replay must not duplicate them.
    live = StoreSink(url, spool)
    await live.start()
    for r in records[:10]:
        live.enqueue(r)
    assert await live.flush()
    assert await live.flush()
    ids = [r[0] for r in await _rows(live, "SELECT id FROM turns")]
    n_cand = (await _rows(live, "SELECT count(*) FROM candidates"))[0][0]
    await live.stop()
    assert len(ids) == len(records) and set(ids) == {r.turn_id for r in records}
    assert n_cand == 4 * len(records)
    assert live.db_ok and live.spool.bytes == 0


async def test_a_turn_twice_in_one_batch_is_written_once(db_url, tmp_path):
    r = record([{"role": "user", "content": "dup"}], "a")
    sink = StoreSink(db_url, tmp_path / "spool")
    await sink.start()
    sink.enqueue(r)
    sink.enqueue(r)
    assert await sink.flush()
    rows = await _rows(sink, "SELECT count(*) FROM candidates WHERE turn_id = :t", t=r.turn_id)
    await sink.stop()
    assert rows[0][0] == 4 and sink.db_ok


async def test_slow_database_never_slows_enqueue_and_loses_nothing(make_pg_db, tmp_path):
    """The writer's insert hangs on a table lock: the queue fills, turns spill to the spool, and
    enqueue stays instant; after the lock goes, every turn is written once."""
    import time

    import psycopg

    url = make_pg_db()
    sink = StoreSink(url, tmp_path / "spool", max_queue=50, batch_max=20, flush_interval_s=0.05)
    await sink.start()
    blocker = await psycopg.AsyncConnection.connect(url)
    await blocker.execute("LOCK TABLE turns IN ACCESS EXCLUSIVE MODE")  # held until rollback
    records = [record([{"role": "user", "content": f"slow {i}"}], "a") for i in range(300)]
    worst = 0.0
    for r in records:
        t0 = time.perf_counter()
        sink.enqueue(r)
        worst = max(worst, time.perf_counter() - t0)
        await asyncio.sleep(0.002)  # a steady stream of turns while the write hangs
    assert sink.spool.bytes > 0  # the queue overflowed into the spool
    ids = await _stored_once_released(sink, blocker, len(records))
    await sink.stop()
    assert sorted(ids) == sorted(r.turn_id for r in records)
    assert worst < 0.05  # no enqueue waited on the database (a spool append is a buffered write)


async def test_a_connection_the_database_closed_is_replaced_without_an_outage(make_pg_db, tmp_path):
    """PostgreSQL ends the writer's idle connection (a restart, an idle timeout on the way), five
    times: each next batch goes through on a new connection, with no failed write and nothing
    lost, whether or not the writer saw the connection end before the batch (a race: both happen)."""
    import psycopg

    url = make_pg_db()
    sink = StoreSink(url, tmp_path / "spool")
    await sink.start()
    written = []
    for n in range(6):
        if n:
            with psycopg.connect(url, autocommit=True) as admin:
                ended = admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE "
                                      "datname = current_database() AND pid <> pg_backend_pid()").fetchall()
            assert ended  # the writer's connection was among them
        batch = [record([{"role": "user", "content": f"round {n}, {i}"}], "a") for i in range(3)]
        for r in batch:
            sink.enqueue(r)
        assert await sink.flush()
        written += batch
        assert sink.db_ok and sink.health()["last_error"] is None, sink.health()["last_error"]
    ids = [r[0] for r in await _rows(sink, "SELECT id FROM turns")]
    await sink.stop()
    assert sorted(ids) == sorted(r.turn_id for r in written)


async def test_a_lock_held_on_a_table_fails_the_write_in_seconds_and_keeps_the_turns(make_pg_db, tmp_path):
    """The writer waits at most 5 s for a lock (lock_timeout), then reports the outage and keeps
    the turns; they are written once the lock goes."""
    import psycopg

    url = make_pg_db()
    sink = StoreSink(url, tmp_path / "spool", flush_interval_s=0.05)
    await sink.start()
    blocker = await psycopg.AsyncConnection.connect(url)
    await blocker.execute("LOCK TABLE conversations IN ACCESS EXCLUSIVE MODE")
    records = [record([{"role": "user", "content": f"locked {i}"}], "a") for i in range(5)]
    for r in records:
        sink.enqueue(r)
    for _ in range(80):  # 8 s: past the lock timeout, short of the 10 s command timeout
        if sink.last_error:
            break
        await asyncio.sleep(0.1)
    error = sink.last_error
    ids = await _stored_once_released(sink, blocker, len(records))
    await sink.stop()
    assert error and "lock timeout" in error, error
    assert sorted(ids) == sorted(r.turn_id for r in records)


def test_the_writer_reads_a_url_as_the_api_engine_does():
    """The writer connects with asyncpg itself: user, an escaped password, host, port, database and
    the URL's options (ssl) come through as SQLAlchemy's dialect reads them for the API's engine."""
    from service.store.pg_batch import connect_args

    assert connect_args("postgresql://tg:p%40ss@db.internal:6432/store?ssl=require") == {
        "user": "tg", "password": "p@ss", "host": "db.internal", "port": 6432, "database": "store",
        "ssl": "require"}
