"""The journal: a turn is on disk (page cache) when enqueue returns, a process that dies leaves its
journal to the next start, a live process's journal is never replayed by another, and a shadow
turn is durable before its background scoring ends."""

# ruff: noqa: F811 - the fixtures are imported from tests.test_store_support

from __future__ import annotations

import json

from sqlalchemy import text

from service.gate.record import CandidateRecord
from service.store.sink import StoreSink
from tests.test_store_support import db_url, make_pg_db, record, shared_pg_db  # noqa: F401 - fixtures


async def _rows(sink: StoreSink, sql: str, **params) -> list:
    async with sink.engine.connect() as conn:
        return list((await conn.execute(text(sql), params)).all())


def _journaled(spool) -> list[dict]:
    return [json.loads(line) for p in sorted(spool.glob("seg-*.jsonl")) for line in p.read_text().splitlines()]


def _die(sink: StoreSink) -> None:
    """What the kernel does to a killed process's files: closed (locks released), nothing retired."""
    assert sink._task is not None and sink._syncer is not None, "a started sink"
    sink._task.cancel()
    sink._syncer.cancel()
    sink.spool.release_all()


async def test_a_turn_is_in_the_journal_when_enqueue_returns(db_url, tmp_path):
    sink = StoreSink(db_url, tmp_path / "spool", flush_interval_s=60)  # the writer will not run
    await sink.start()
    r = record([{"role": "user", "content": "durable"}], "a")
    sink.enqueue(r)
    lines = _journaled(tmp_path / "spool")
    await sink.stop()
    assert [(x["v"], x["turn"]["turn_id"]) for x in lines] == [(2, r.turn_id)]


async def test_a_process_that_dies_leaves_its_journal_to_the_next_start(db_url, tmp_path):
    spool = tmp_path / "spool"
    first = StoreSink(db_url, spool, flush_interval_s=60)
    await first.start()
    records = [record([{"role": "user", "content": f"q{i}"}], "a") for i in range(20)]
    for r in records:
        first.enqueue(r)
    _die(first)
    await first.engine.dispose()
    second = StoreSink(db_url, spool)
    await second.start()
    assert await second.flush()
    ids = {r[0] for r in await _rows(second, "SELECT id FROM turns")}
    n_cand = (await _rows(second, "SELECT count(*) FROM candidates"))[0][0]
    await second.stop()
    assert ids == {r.turn_id for r in records} and n_cand == 4 * len(records)
    assert not list(spool.glob("seg-*"))


async def test_a_live_workers_journal_is_not_replayed_by_another(db_url, tmp_path):
    spool = tmp_path / "spool"
    a = StoreSink(db_url, spool, flush_interval_s=60)
    b = StoreSink(db_url, spool, flush_interval_s=60)
    await a.start()
    await b.start()
    records = [record([{"role": "user", "content": f"w{i}"}], "a") for i in range(10)]
    for r in records:
        a.enqueue(r)
    assert await b.flush()
    written_by_b, backlog_seen_by_b = b.written, b.spool.bytes
    assert await a.flush()
    ids = {r[0] for r in await _rows(a, "SELECT id FROM turns")}
    await a.stop()
    await b.stop()
    assert written_by_b == 0 and backlog_seen_by_b == 0  # a's segment is locked by a: not b's backlog
    assert ids == {r.turn_id for r in records}


async def test_a_shadow_turn_is_durable_before_its_scoring_ends(db_url, tmp_path):
    spool = tmp_path / "spool"
    sink = StoreSink(db_url, spool, flush_interval_s=60)
    await sink.start()
    scored = record([{"role": "user", "content": "shadow, scored"}], "a", n=1)
    unscored = record([{"role": "user", "content": "shadow, died while scoring"}], "a", n=1)
    for r in (scored, unscored):
        r.mode, r.decision, r.chosen_index = "shadow", "shadow", 0
        r.candidates[0].index = 0
        sink.hold(r)  # the reply leaves now; the record is completed by background scoring
    # Scoring finished for one of them: the complete record (more candidates, scores) is enqueued.
    scored.candidates = [CandidateRecord(index=i, round=0, message={"role": "assistant", "content": f"c{i}"},
                                         score=0.1 * i) for i in range(3)]
    sink.enqueue(scored)
    _die(sink)  # before the other one's scoring ended
    await sink.engine.dispose()
    after = StoreSink(db_url, spool)
    await after.start()
    assert await after.flush()
    cands = dict(await _rows(after, "SELECT turn_id, count(*) FROM candidates GROUP BY turn_id"))
    decisions = dict(await _rows(after, "SELECT id, decision FROM turns"))
    await after.stop()
    assert decisions == {scored.turn_id: "shadow", unscored.turn_id: "shadow"}
    assert cands == {scored.turn_id: 3, unscored.turn_id: 1}  # the scored version won where there was one


def test_a_turn_orjson_refuses_is_journaled_at_the_standard_encoders_cost_and_round_trips():
    """An integer past 64 bits (a client may send one) sends the journal line to the standard library.
    Before, the record was deep-copied first (dataclasses.asdict): 2.6 s on the event loop for a 4 MB
    body, 13 times the encoding itself."""
    import json
    import time

    from service.gate.record import CandidateRecord, TurnRecord
    from service.store import lines

    messages = [{"role": "user", "content": [{"type": "text", "text": "hi \ud800", "x": [0] * 400_000 + [10**30]}]}]
    turn = TurnRecord(turn_id="turn-big", route="r", mode="rank", upstream_model="m", request_messages=messages,
                      candidates=[CandidateRecord(index=0, round=0, message={"role": "assistant", "content": "ok"})])
    started = time.perf_counter()
    line = lines.encode_turn(turn)
    took = time.perf_counter() - started
    started = time.perf_counter()
    json.dumps(messages, ensure_ascii=True)
    alone = time.perf_counter() - started
    assert took < 3 * alone + 0.02, (took, alone)
    back, provisional = lines.decode_turn(line)
    assert back == turn and not provisional


def test_a_record_nested_past_every_encoder_is_still_quarantined_by_its_id():
    """Before, the quarantine's own encoding raised (repr and json recursed too deep), and the record
    was lost without a line."""
    import json

    from service.gate.record import TurnRecord
    from service.store import lines

    deep: list = []
    for _ in range(5_000):
        deep = [deep]
    turn = TurnRecord(turn_id="turn-deep", route="r", mode="rank", upstream_model="m",
                      request_messages=[{"role": "user", "content": "x", "x": deep}])
    got = json.loads(lines.encode_quarantined("refused", record=turn))
    assert got["turn_id"] == "turn-deep" and got["error"].startswith("refused; unserializable")
    shallow = TurnRecord(turn_id="turn-ok", route="r", mode="rank", upstream_model="m", request_messages=[])
    kept = json.loads(lines.encode_quarantined("x", record=shallow))["turn"]
    assert TurnRecord.from_dict(kept) == shallow


def test_a_segment_being_opened_is_never_claimed_by_another_workers_scan(tmp_path, monkeypatch):
    """A new segment was created, then locked: two calls. Another worker's scan for foreign segments
    (every writer iteration) that fell between them took the new, empty file for a dead process's,
    replayed it and deleted it; the turns then journaled into it were in no file on disk, and a kill
    lost them (a CI run of tests/test_store_crash.py lost 12 of 471 answered turns)."""
    import fcntl

    from service.store import spool as spool_module
    from service.store.spool import Spool

    mine, other = Spool(tmp_path), Spool(tmp_path)  # two workers sharing one spool folder
    real_flock, scanned = fcntl.flock, []

    def flock_after_a_scan(fd, op):
        if op == fcntl.LOCK_EX and not scanned:  # a segment being opened (scans never wait for a lock)
            claimed = other.claim_foreign()
            scanned.append([reader.path.name for reader in claimed])
            for reader in claimed:
                reader.done()  # replayed (nothing in it) and deleted, as the writer does
        return real_flock(fd, op)

    monkeypatch.setattr(spool_module.fcntl, "flock", flock_after_a_scan)
    mine.open()
    mine.append(b'{"v": 2, "turn": {"turn_id": "journaled"}}\n', keep=True)
    on_disk = [line for p in tmp_path.glob("seg-*.jsonl") for line in p.read_bytes().splitlines()]
    mine.release_all()
    assert on_disk == [b'{"v": 2, "turn": {"turn_id": "journaled"}}']
    assert scanned == [[]]  # the scan ran while the segment was being opened, and saw nothing to claim


def test_a_segment_its_process_died_before_naming_is_replayed_or_removed_once_stale(tmp_path):
    """A machine crash can keep a segment's lines (fsynced) but not its rename: those are replayed."""
    import os
    import time

    from service.store.spool import NEW_PREFIX, Spool

    empty, kept, fresh = (tmp_path / f"{NEW_PREFIX}{n}-1-000001.jsonl" for n in (1, 2, 3))
    empty.touch()
    kept.write_bytes(b'{"v": 2, "turn": {"turn_id": "kept"}}\n')
    fresh.touch()  # a live process may be between creating this one and naming it
    for p in (empty, kept):
        os.utime(p, (time.time() - 120, time.time() - 120))
    claimed = Spool(tmp_path).claim_foreign()
    found = [(r.path.name, [line for chunk in r.chunks(10) for _, line in chunk]) for r in claimed]
    for r in claimed:
        r.release()
    assert found == [("seg-2-1-000001.jsonl", [b'{"v": 2, "turn": {"turn_id": "kept"}}\n'])]
    assert not empty.exists() and fresh.exists()
