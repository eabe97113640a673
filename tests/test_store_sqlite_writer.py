"""The writer off the serving loop: SQLite by sqlite3 on a thread of its own, PostgreSQL by asyncpg
on a loop and thread of its own. SQLite rows are the ones SQLAlchemy wrote before; both drain at
stop and their threads end; a database that goes away and comes back loses and duplicates nothing."""

# ruff: noqa: F811 - the fixtures are imported from tests.test_store_support

from __future__ import annotations

import asyncio
import dataclasses
import logging
import sqlite3
import threading
import time

from prometheus_client import REGISTRY
from sqlalchemy import text

from service.store.engine import make_async_engine, make_sync_engine
from service.store.migrate import upgrade
from service.store.sink import StoreSink
from service.store.writer import LinkCache, prepare, rows_of, thread_rows, write_batch
from tests.test_store_support import db_url, make_pg_db, record, shared_pg_db  # noqa: F401 - fixtures

_WRITER_THREADS = ("turngate-store-sqlite", "turngate-store-pg", "turngate-store-prepare")


def _odd_records() -> list:
    """Threaded turns, plus the values the record boundary fits (NUL, lone surrogate, NaN,
    an integer past 64 bits, an overlong route, booleans, None in JSON columns), one turn twice."""
    history = [{"role": "user", "content": "hello"}]
    out = []
    for i in range(6):
        out.append(record(list(history), f"reply {i}", n=2))
        history += [{"role": "assistant", "content": f"reply {i}"}, {"role": "user", "content": f"more {i}"}]
    out += [record([{"role": "user", "content": f"other {i}"}], "x", n=1, header=f"h{i % 2}") for i in range(4)]
    out[1].tools = [{"type": "function", "function": {"name": "f\x00", "parameters": {}}}]
    out[2] = dataclasses.replace(out[2], request_messages=[{"role": "user", "content": "bad \udc80"}])
    out[3].prompt_tokens = 2**70
    out[3].feedback = ["fix it"]
    out[4].critics_agreed = True
    out[5].critics_agreed = False
    out[6].route = "r" * 500
    out[7].conversation.metadata = {"a": 1, "x": float("nan")}
    out[8].candidates[0].features = {"k": 1.5}
    out.append(out[9])
    return out


def _dump(path) -> list:
    """Every row of the tables a turn writes, raw (SQLite's own types), minus the write times."""
    conn = sqlite3.connect(path)
    try:
        out = []
        for table, skip in (("conversations", ()), ("turns", ()), ("candidates", ("id",)),
                            ("conversation_links", ("created_at",)), ("critic_versions", ("created_at",))):
            cols = [r[1] for r in conn.execute(f"PRAGMA table_info({table})")]
            keep = [c for c in cols if c not in skip]
            names = ", ".join(keep)
            out += [(table, row) for row in conn.execute(f"SELECT {names} FROM {table} ORDER BY {names}")]
        return out
    finally:
        conn.close()


async def test_rows_are_the_ones_sqlalchemy_writes(tmp_path):
    records = _odd_records()
    ours, theirs = tmp_path / "ours.db", tmp_path / "theirs.db"
    sink = StoreSink(f"sqlite:///{ours}", tmp_path / "spool", auto_migrate=True)
    await sink.start()
    for r in records:
        sink.enqueue(r)
    assert await sink.flush()
    await sink.stop()

    upgrade(f"sqlite:///{theirs}")
    engine = make_async_engine(f"sqlite:///{theirs}")
    async with engine.begin() as conn:
        await write_batch(conn, prepare(records), LinkCache(), set())
    await engine.dispose()

    rows = _dump(ours)
    assert len([r for r in rows if r[0] == "turns"]) == len(records) - 1
    assert rows == _dump(theirs)


async def test_the_writer_threads_drain_at_stop_and_end(db_url, tmp_path):
    """Both databases: the writer's own thread (and loop) write the queue at stop, then end; a
    stopped sink starts again with new ones."""
    def turn_ids() -> set[str]:
        engine = make_sync_engine(db_url)
        try:
            with engine.connect() as conn:
                return {r[0] for r in conn.execute(text("SELECT id FROM turns"))}
        finally:
            engine.dispose()

    def writer_threads() -> list[threading.Thread]:
        # This sink's: sinks of earlier tests that were abandoned (a simulated crash) keep theirs.
        return [t for t in threading.enumerate() if t.name.startswith(_WRITER_THREADS) and t not in earlier]

    earlier = set(threading.enumerate())
    sink = StoreSink(db_url, tmp_path / "spool", flush_interval_s=60)
    await sink.start()
    records = [record([{"role": "user", "content": f"q {i}"}], "a", n=1) for i in range(50)]
    for r in records:
        sink.enqueue(r)
    await sink.stop()  # no flush asked for: stop writes the queue
    assert turn_ids() == {r.turn_id for r in records}
    assert not list((tmp_path / "spool").glob("seg-*.jsonl"))  # every segment retired
    for t in writer_threads():
        t.join(5)
    assert not writer_threads()

    await sink.start()
    late = record([{"role": "user", "content": "late"}], "a", n=1)
    sink.enqueue(late)
    assert await sink.flush()
    await sink.stop()
    assert late.turn_id in turn_ids()


async def test_tables_gone_and_back_lose_and_duplicate_nothing(tmp_path, caplog):
    """Also: with the store's log at DEBUG, the outage's warning carries the database's error and
    its traceback (it had printed "NoneType: None": it is logged after the except block)."""
    caplog.set_level(logging.DEBUG, logger="turngate.store")
    db = tmp_path / "s.db"
    sink = StoreSink(f"sqlite:///{db}", tmp_path / "spool", auto_migrate=True)
    await sink.start()
    before = [record([{"role": "user", "content": f"before {i}"}], "a", n=2) for i in range(5)]
    for r in before:
        sink.enqueue(r)
    assert await sink.flush()

    with sqlite3.connect(db) as conn:  # the writer's compiled statements name a table that is gone
        conn.execute("ALTER TABLE turns RENAME TO turns_away")
    during = [record([{"role": "user", "content": f"during {i}"}], "a", n=2) for i in range(20)]
    for r in during:
        sink.enqueue(r)
    assert not await sink.flush()
    assert not sink.db_ok and "no such table" in (sink.last_error or "")
    assert sink.quarantine.count == 0  # an outage is never blamed on the records
    [warning] = [r for r in caplog.records if r.getMessage().startswith("database write failed")]
    assert warning.exc_info and "no such table" in str(warning.exc_info[1]) and warning.exc_info[2] is not None

    with sqlite3.connect(db) as conn:
        conn.execute("ALTER TABLE turns_away RENAME TO turns")
    sink._retry_at = 0.0  # no need to wait out the backoff
    for _ in range(20):
        if await sink.flush() and sink.db_ok and sink.spool.bytes == 0:
            break
    await sink.stop()
    with sqlite3.connect(db) as conn:
        got = [r[0] for r in conn.execute("SELECT id FROM turns")]
        cands = conn.execute("SELECT count(*) FROM candidates").fetchone()[0]
    assert sorted(got) == sorted(r.turn_id for r in before + during)  # each once
    assert cands == 2 * len(got)


# -- what the writer's cheaper row building must not change -------------------------------------------

def test_prefix_hashes_are_the_ones_earlier_releases_stored():
    """Threading looks up stored prefix hashes: a release that hashed differently would start a new
    conversation for every conversation already in the store. Hashes computed by the release before."""
    from service.gate.record import CandidateRecord, ConversationHint, TurnRecord
    from service.store.conversations import thread_keys

    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c é"}]
    expected = {
        (None, None): ("1f57fdbfb17e8b35a57f83bf2d68b1d5017a7f68f1f4c10bac8509e9dfaea543",
                       "c3ee0a9f1c88803e939ae3bda9b927e2b3bc8bcfaa9de0a310c06fc421d2003e"),
        ("k1", None): ("8cd420bff03bf06b25c98caa164530eb37c7591f878a3246f2a60f7ca3274b42",
                       "6956401f2373969c95b3ba0a6267f3cd71430ed5b12d6fb9fba8f29aac43fe8f"),
        ("k1", 'ü"ser'): ("3da02355dfbc562002d665f42c1c1ad6671f900a7f4ebb7c8443ecb0f6a593ea",
                          "5db75ccb03187df99f8ac2430b0e70f05475f64fe0e05210468fa4398806e60e"),
        (7, "u"): ("cb292a136ba386b369f98bb0f69c6d192faac5a16bc5b8534b054a189d486471",
                   "1789b730a1fbfaaa8d28df8bf20efb43cd98b1bc1f7bf102b41f5695bab01cf4"),
    }
    for (key, user), hashes in expected.items():
        r = TurnRecord(turn_id="turn-1", route="r", mode="rank", upstream_model="m", request_messages=msgs,
                       decision="ranked", chosen_index=0,
                       candidates=[CandidateRecord(index=0, round=0, message={"role": "assistant", "content": "hi"})],
                       conversation=ConversationHint(key_id=key, user=user))
        k = thread_keys(r)
        assert (k.lookup_hash, k.link_hash) == hashes, (key, user)


async def test_two_writers_on_one_sqlite_file_both_land_everything(tmp_path):
    """`serve --workers N` on SQLite: each process's writer takes the write lock before its
    transaction (BEGIN IMMEDIATE) and waits for the other's, so neither sees an outage."""
    db = tmp_path / "s.db"
    a = StoreSink(f"sqlite:///{db}", tmp_path / "spool-a", auto_migrate=True, flush_interval_s=0.02, batch_max=50)
    b = StoreSink(f"sqlite:///{db}", tmp_path / "spool-b", auto_migrate=True, flush_interval_s=0.02, batch_max=50)
    await a.start()
    await b.start()
    history = [{"role": "user", "content": "shared"}]
    records = [record(history + [{"role": "user", "content": f"q {i}"}], "a", n=2) for i in range(600)]
    for i, r in enumerate(records):
        (a if i % 2 else b).enqueue(r)
        if i % 50 == 0:
            await asyncio.sleep(0)
    assert await a.flush(30) and await b.flush(30)
    assert a.db_ok and b.db_ok and a.quarantine.count == b.quarantine.count == 0
    await a.stop()
    await b.stop()
    with sqlite3.connect(db) as conn:
        got = [r[0] for r in conn.execute("SELECT id FROM turns")]
        cands = conn.execute("SELECT count(*) FROM candidates").fetchone()[0]
    assert sorted(got) == sorted(r.turn_id for r in records) and cands == 2 * len(records)


async def test_a_write_held_elsewhere_when_the_writer_first_connects_is_waited_for(tmp_path):
    """The file leaves the migrations in WAL mode. Before, the first connection to ask for WAL
    converted it, and a conversion needs the file to itself: beside another process's write it
    failed at once ("database is locked", no busy wait), an outage at `serve --workers 2`'s
    start. Now the writer waits for the other write like any other."""
    db = tmp_path / "s.db"
    upgrade(f"sqlite:///{db}")
    with sqlite3.connect(db) as probe:
        assert probe.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    other = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    threading.Timer(0.5, other.execute, ("COMMIT",)).start()
    sink = StoreSink(f"sqlite:///{db}", tmp_path / "spool", auto_migrate=False, flush_interval_s=0.02)
    await sink.start()
    try:
        sink.enqueue(record([{"role": "user", "content": "q"}], "a"))
        assert await sink.flush(10) and sink.db_ok and sink.last_error is None
    finally:
        await sink.stop()
        other.close()
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM turns").fetchone()[0] == 1


def test_prepare_lets_the_gil_go_between_chunks_and_rows_stay_the_same(monkeypatch):
    """A batch is prepared GIL_CHUNK records at a time with a time.sleep(0) (the GIL let go)
    between chunks, so the event loop waits for a chunk, not a batch; the rows are those of the
    records prepared one by one, and a turn twice across chunks is still kept once, the later."""
    from service.store import writer

    records = [record([{"role": "user", "content": f"q {i}"}], f"a {i}", n=2) for i in range(2 * writer.GIL_CHUNK + 5)]
    later = dataclasses.replace(records[0], route="later")
    records.append(later)
    naps = []
    monkeypatch.setattr(writer.time, "sleep", naps.append)
    got = prepare(records, encode_json=True)
    assert naps == [0, 0]
    one_by_one = [prepare([r], encode_json=True) for r in records[1:]]
    assert got.records == records[1:]
    assert got.turn_rows() == [t for p in one_by_one for t in p.turn_rows()]
    assert got.candidate_rows() == [c for p in one_by_one for c in p.candidate_rows()]
    assert rows_of(got.conversations) == [c for p in one_by_one for c in rows_of(p.conversations)]
    assert got.keys == [k for p in one_by_one for k in p.keys]


def test_new_conversation_ids_sort_by_their_first_turns_time_and_replay_the_same():
    """Time first, so that new conversations append to the B-trees indexed by conversation id;
    derived from the record alone, so that a replayed turn threads the same way."""
    from service.store.conversations import new_conversation_id

    records = [record([{"role": "user", "content": f"q {i}"}], "a", n=1) for i in range(12)]
    for i, r in enumerate(records):
        r.created_at = 1_700_000_000.0 + i * 0.5
    ids = [new_conversation_id(r.turn_id, r.created_at) for r in records]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert all(len(c) == len("conv-") + 32 for c in ids)  # as long as the ids of earlier releases
    assert ids == [new_conversation_id(r.turn_id, r.created_at) for r in records]
    for odd in (None, "soon", float("nan"), float("inf"), -5.0, 1e300):
        assert new_conversation_id("turn-x", odd) == new_conversation_id("turn-x", odd)
    got = prepare(records)
    conv_rows, _ = thread_rows(got, {})
    assert [c["id"] for c in conv_rows] == ids


def test_turn_ids_are_unique_time_ordered_and_as_long_as_before():
    from service.gate.record import new_turn_id

    ids = []
    for _ in range(3):
        ids += [new_turn_id() for _ in range(2000)]
        time.sleep(0.002)  # the next ones fall in a later millisecond
    assert len(set(ids)) == len(ids)
    assert all(len(t) == len("turn-") + 32 and t.startswith("turn-") for t in ids)
    stamps = [t[5:17] for t in ids]
    assert stamps == sorted(stamps) and stamps[0] < stamps[-1]
    assert abs(int(stamps[-1], 16) / 1000 - time.time()) < 60


async def test_the_queue_depth_gauge_follows_turns_waiting_behind_a_locked_database(tmp_path):
    """turngate_log_queue_depth is not set on every enqueue (a lock per turn); it must still show
    turns piling up while the writer waits, and fall back once they are written."""
    db = tmp_path / "s.db"
    sink = StoreSink(f"sqlite:///{db}", tmp_path / "spool", auto_migrate=True, flush_interval_s=0.05)
    await sink.start()
    lock = sqlite3.connect(db, isolation_level=None)
    lock.execute("BEGIN IMMEDIATE")  # another process's writer, holding SQLite's write lock
    try:
        sink.enqueue(record([{"role": "user", "content": "first"}], "a", n=1))
        await asyncio.sleep(0.3)  # the writer took it and now waits for the lock
        for i in range(300):
            sink.enqueue(record([{"role": "user", "content": f"q {i}"}], "a", n=1))
        depth = REGISTRY.get_sample_value("turngate_log_queue_depth")
        assert depth is not None and 256 <= depth <= 300, depth
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    assert await sink.flush(30)
    await sink.flush(5)  # one more wake-up of the writer, which sets the gauge
    assert REGISTRY.get_sample_value("turngate_log_queue_depth") == 0
    await sink.stop()
