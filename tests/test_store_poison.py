"""One record must never stop turn logging. Records the database cannot hold as sent (NUL, lone
surrogates, over-long ids, malformed history shapes) are made to fit at the row boundary; a record
the database still refuses is isolated (the batch is split until it is found), quarantined with its
error, and every other turn lands, from the queue and from the spool alike, on both databases."""

# ruff: noqa: F811 - the fixtures are imported from tests.test_store_support

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import create_engine, text

from service.demo.fake_actor import free_port
from service.gate.record import TurnRecord
from service.store.sink import StoreSink
from service.store.urls import is_sqlite
from tests.test_store_support import db_url, make_pg_db, record, shared_pg_db  # noqa: F401 - fixtures

USER = [{"role": "user", "content": "hello"}]


def _call(fn) -> dict:
    return {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": fn}]}


def _poison() -> dict[str, TurnRecord]:
    """Each trigger found by the issue, as the gate (or a spool line, an import) would hand it over."""
    tool_nul = record(USER, _call({"name": "get\x00order", "arguments": "{}"}))
    tool_nul.tools = [{"type": "function", "function": {"name": "get\x00order", "parameters": {"type": "object"}}}]
    return {
        "header id over 200 characters": record(USER, "a", header="h" * 300),
        "metadata conversation id over 200 characters": record(USER, "a", metadata={"conversation_id": "m" * 500}),
        "NUL in content": record([{"role": "user", "content": "a\x00b"}], "reply\x00"),
        "NUL in a tool name": tool_nul,
        "NUL in a JSON key": record([{"role": "user", "content": "x", "k\x00": {"n\x00": ["\x00"]}}], "a"),
        "lone surrogate in content": record([{"role": "user", "content": "bad \ud800 text"}], "ok \udfff"),
        "lone surrogate in the route": _with(record(USER, "a"), route="r\ud800"),
        "function given as a string": record([{"role": "user", "content": "q"}, _call("get_order"),
                                              {"role": "tool", "tool_call_id": "call_1", "content": "x"}], "a"),
        "content part text not a string": record([{"role": "user", "content": [
            {"type": "text", "text": {"nested": 1}}, {"type": "text", "text": None}, "bare", 7]}], "a"),
        # deliberately not messages: what a record may hold after a bug upstream of the store
        "messages that are not objects": record(["just a string", 42, None, {"role": "user"}],  # type: ignore[list-item]
                                                "a"),
        "tool_calls not a list of objects": record([{"role": "assistant", "tool_calls": ["x", {"function": 3}]}], "a"),
        "non-finite numbers in JSON": record([{"role": "user", "content": "x", "score": float("nan"),
                                               "big": float("inf")}], "a"),
        "token counts out of range": _with(record(USER, "a"), prompt_tokens=2**40, completion_tokens=-2**40),
        "route and model names too long": _with(record(USER, "a"), route="r" * 500, upstream_model="m" * 500,
                                                critic_name="c" * 300),
    }


def _with(r: TurnRecord, **fields) -> TurnRecord:
    for k, v in fields.items():
        setattr(r, k, v)
    return r


async def _ids(sink: StoreSink) -> set[str]:
    async with sink.engine.connect() as conn:
        return {r[0] for r in await conn.execute(text("SELECT id FROM turns"))}


def _quarantine_lines(spool: Path) -> list[dict]:
    path = spool / "quarantine.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.parametrize("name", list(_poison()))
async def test_a_poison_record_neither_blocks_its_batch_nor_later_turns(db_url, tmp_path, name):
    poison = _poison()[name]
    before = [record([{"role": "user", "content": f"before {i}"}], "a") for i in range(3)]
    after = [record([{"role": "user", "content": f"after {i}"}], "a") for i in range(3)]
    sink = StoreSink(db_url, tmp_path / "spool", flush_interval_s=0.05)
    await sink.start()
    try:
        for r in [before[0], poison, *before[1:]]:  # one batch, the poison in the middle
            sink.enqueue(r)
        assert await sink.flush()
        for r in after:
            sink.enqueue(r)
        assert await sink.flush()
        stored = await _ids(sink)
        health = sink.health()
    finally:
        await sink.stop()
    # Made to fit, the poison record itself is stored too; nothing was quarantined or left spooled.
    assert {r.turn_id for r in before + after + [poison]} <= stored
    assert health["db_ok"] is True and health["quarantined"] == 0
    assert not list((tmp_path / "spool").glob("seg-*")) and not _quarantine_lines(tmp_path / "spool")


async def test_poison_records_keep_their_content_as_far_as_the_database_can_hold_it(db_url, tmp_path):
    p = _poison()
    nul, surrogate = p["NUL in content"], p["lone surrogate in content"]
    sink = StoreSink(db_url, tmp_path / "spool")
    await sink.start()
    for r in (nul, surrogate):
        sink.enqueue(r)
    assert await sink.flush()
    async with sink.engine.connect() as conn:
        rows = dict((await conn.execute(text("SELECT id, request_messages FROM turns"))).all())
    await sink.stop()

    def content(turn_id: str) -> str:
        value = rows[turn_id]
        return (json.loads(value) if isinstance(value, str) else value)[0]["content"]

    assert content(nul.turn_id) == "a\ufffdb"
    assert content(surrogate.turn_id) == "bad \ufffd text"


async def test_long_explicit_ids_still_thread_and_never_merge_distinct_ids(db_url, tmp_path):
    long_a = "A" * 250 + "-one"
    long_b = "A" * 250 + "-two"  # the same first 250 characters
    a1 = record([{"role": "user", "content": "1"}], "x", header=long_a)
    a2 = record([{"role": "user", "content": "2"}], "y", header=long_a)
    b1 = record([{"role": "user", "content": "3"}], "z", metadata={"conversation_id": long_b})
    sink = StoreSink(db_url, tmp_path / "spool")
    await sink.start()
    for r in (a1, a2, b1):
        sink.enqueue(r)
    assert await sink.flush()
    async with sink.engine.connect() as conn:
        conv = dict((await conn.execute(text("SELECT id, conversation_id FROM turns"))).all())
        ext = dict((await conn.execute(text("SELECT id, external_id FROM conversations"))).all())
    await sink.stop()
    assert conv[a1.turn_id] == conv[a2.turn_id] != conv[b1.turn_id]
    assert len(ext[conv[a1.turn_id]]) <= 200 and ext[conv[a1.turn_id]] != ext[conv[b1.turn_id]]
    assert ext[conv[a1.turn_id]].startswith("A" * 100)


# -- a record the database refuses whatever the boundary does ---------------------------------------
# A check the database applies (here a constraint an operator might add) stands for any refusal the
# boundary cannot foresee. The writer must find that record, quarantine it, and write the rest.

@pytest.fixture
def refusing_db(db_url):
    """db_url whose turns table refuses route = 'poison'."""
    if is_sqlite(db_url):
        sql = [("CREATE TRIGGER refuse_poison BEFORE INSERT ON turns WHEN NEW.route = 'poison' "
                "BEGIN SELECT RAISE(ABORT, 'poison refused'); END")]
        undo = ["DROP TRIGGER IF EXISTS refuse_poison"]
        engine = create_engine(db_url)
        with engine.begin() as conn:
            for s in sql:
                conn.execute(text(s))
        yield db_url
        with engine.begin() as conn:
            for s in undo:
                conn.execute(text(s))
        engine.dispose()
        return
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("ALTER TABLE turns ADD CONSTRAINT refuse_poison CHECK (route <> 'poison')")
    try:
        yield db_url
    finally:
        with psycopg.connect(db_url, autocommit=True) as conn:
            conn.execute("ALTER TABLE turns DROP CONSTRAINT IF EXISTS refuse_poison")


def _refused(tag: str) -> TurnRecord:
    return _with(record([{"role": "user", "content": f"refused {tag}"}], "a"), route="poison")


async def test_a_refused_record_is_quarantined_and_every_other_turn_lands(refusing_db, tmp_path):
    from prometheus_client import REGISTRY

    def quarantined_metric() -> float:
        return REGISTRY.get_sample_value("turngate_store_quarantined_total") or 0.0

    spool = tmp_path / "spool"
    good = [record([{"role": "user", "content": f"good {i}"}], "a") for i in range(40)]
    bad = [_refused("1"), _refused("2")]
    m0 = quarantined_metric()
    sink = StoreSink(refusing_db, spool, batch_max=500, flush_interval_s=0.05)
    await sink.start()
    try:
        for i, r in enumerate(good):
            sink.enqueue(r)
            if i in (7, 31):
                sink.enqueue(bad[0 if i == 7 else 1])
        assert await sink.flush()
        later = [record([{"role": "user", "content": f"later {i}"}], "a") for i in range(5)]
        for r in later:
            sink.enqueue(r)
        assert await sink.flush()
        stored = await _ids(sink)
        health = sink.health()
    finally:
        await sink.stop()
    assert {r.turn_id for r in good + later} <= stored
    assert not {r.turn_id for r in bad} & stored
    lines = _quarantine_lines(spool)
    assert sorted(q["turn"]["turn_id"] for q in lines) == sorted(r.turn_id for r in bad)
    assert all(q["v"] >= 2 and "poison" in q["error"] for q in lines)
    assert health["db_ok"] is True and health["quarantined"] == 2 and "poison" in health["quarantine_last_error"]
    assert quarantined_metric() - m0 == 2
    assert not list(spool.glob("seg-*"))


def _legacy_line(r: TurnRecord) -> bytes:
    """A spool line as the previous release wrote it: a bare TurnRecord.to_dict(), no version."""
    return json.dumps(r.to_dict(), ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


async def test_a_poison_line_in_the_spool_never_wedges_replay_across_restarts(refusing_db, tmp_path):
    spool = tmp_path / "spool"
    spool.mkdir()
    old = [record([{"role": "user", "content": f"old {i}"}], "a") for i in range(6)]
    refused = _refused("spooled")
    lines = [_legacy_line(r) for r in old[:3]] + [_legacy_line(refused), b"{not json\n"] + \
        [_legacy_line(r) for r in old[3:]]
    (spool / "seg-00000000000000000001-1-000001.jsonl").write_bytes(b"".join(lines))

    for attempt in range(2):  # the second start is a restart: nothing is retried or quarantined twice
        sink = StoreSink(refusing_db, spool, flush_interval_s=0.05)
        await sink.start()
        new = record([{"role": "user", "content": f"new {attempt}"}], "a")
        sink.enqueue(new)
        assert await sink.flush()
        stored = await _ids(sink)
        health = sink.health()
        await sink.stop()
        assert {r.turn_id for r in old} | {new.turn_id} <= stored and refused.turn_id not in stored
        assert health["db_ok"] is True and health["quarantined"] == 2
    q = _quarantine_lines(spool)
    assert len(q) == 2  # the refused record and the unreadable line, each once
    assert [x["turn"]["turn_id"] for x in q if "turn" in x] == [refused.turn_id]
    assert [x["raw"] for x in q if "raw" in x] == ["{not json\n"]
    assert not list(spool.glob("seg-*"))


async def test_a_legacy_spool_line_decodes_and_lands(db_url, tmp_path):
    spool = tmp_path / "spool"
    spool.mkdir()
    r = record([{"role": "user", "content": "from the previous release"}], "a", header="conv-legacy")
    (spool / "seg-00000000000000000001-1-000001.jsonl").write_bytes(_legacy_line(r))
    sink = StoreSink(db_url, spool)
    await sink.start()
    assert await sink.flush()
    async with sink.engine.connect() as conn:
        row = (await conn.execute(text("SELECT t.decision, c.external_id, (SELECT count(*) FROM candidates "
                                       "WHERE turn_id = t.id) FROM turns t JOIN conversations c "
                                       "ON c.id = t.conversation_id WHERE t.id = :i"), {"i": r.turn_id})).one()
    await sink.stop()
    assert tuple(row) == ("ranked", "conv-legacy", 4)


async def test_an_outage_is_never_taken_for_a_poison_record(make_pg_db, tmp_path):
    """Nothing listening: every write fails, yet nothing is quarantined; all of it lands later."""
    spool = tmp_path / "spool"
    dead = StoreSink(f"postgresql://postgres@127.0.0.1:{free_port()}/nothing", spool, flush_interval_s=0.02)
    await dead.start()
    records = [record([{"role": "user", "content": f"q{i}"}], "a") for i in range(30)]
    for r in records:
        dead.enqueue(r)
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.3)
    health = dead.health()
    await dead.stop()
    assert health["db_ok"] is False and health["quarantined"] == 0
    assert not _quarantine_lines(spool)
    live = StoreSink(make_pg_db(), spool)
    await live.start()
    assert await live.flush()
    stored = await _ids(live)
    await live.stop()
    assert stored == {r.turn_id for r in records}
