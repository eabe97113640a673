"""Conversation store throughput: sustained turns/s into local PostgreSQL through StoreSink (the
batched async writer), and the cost of `enqueue` on the request path, beside two baselines over the
same rows: a naive writer (one transaction of single-row INSERTs per turn, the way a logger that
awaits its write would do it) and asyncpg COPY of pre-built rows (the ceiling: no threading into
conversations, no conflict handling, no ORM).

    python bench/store.py [--turns 20000] [--candidates 4] [--repeats 3]

Creates and drops its own database on 127.0.0.1:5432.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
import uuid

import asyncpg

from service.gate.record import CandidateRecord, ConversationHint, TurnRecord, new_turn_id
from service.store.migrate import upgrade
from service.store.sink import StoreSink
from service.store.writer import prepare

ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
SYSTEM = "You are a support agent. Follow the policy. " * 25  # ~1 KB, like an agent's policy prompt


def make_turns(n: int, candidates: int, turns_per_conversation: int = 8) -> list[TurnRecord]:
    """Agents' conversations: each turn resends the history plus one new user message."""
    out: list[TurnRecord] = []
    while len(out) < n:
        conv = uuid.uuid4().hex[:8]
        msgs = [{"role": "system", "content": SYSTEM}]
        for t in range(turns_per_conversation):
            msgs = msgs + [{"role": "user", "content": f"[{conv}] question {t}: " + "details " * 20}]
            cands = [CandidateRecord(index=i, round=0, finish_reason="stop", score=0.1 * i,
                                     upstream_latency_ms=250.0, prompt_tokens=400, completion_tokens=60,
                                     message={"role": "assistant", "content": f"answer {t}.{i} " + "text " * 40})
                     for i in range(candidates)]
            rec = TurnRecord(turn_id=new_turn_id(), route="bench", mode="rank", upstream_model="m",
                             request_messages=msgs, decision="ranked", chosen_index=0, critic_name="c",
                             critic_version="1", latency_total_ms=300.0, candidates=cands,
                             conversation=ConversationHint(key_id="bench"))
            out.append(rec)
            msgs = msgs + [cands[0].message]
            if len(out) == n:
                break
    return out


async def admin(sql: str) -> None:
    conn = await asyncpg.connect(ADMIN)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def truncate(url: str) -> None:
    conn = await asyncpg.connect(url)
    await conn.execute("TRUNCATE conversations, turns, candidates, feedback, conversation_links CASCADE")
    await conn.execute("CHECKPOINT")
    await conn.close()


async def run_sink(url: str, turns: list[TurnRecord], batch_max: int = 500) -> tuple[float, list[float]]:
    """turns/s from the first enqueue until the last row is committed; per-call enqueue costs (s)."""
    sink = StoreSink(url, tempfile.mkdtemp(prefix="tg-bench-spool-"), batch_max=batch_max)
    await sink.start()
    costs = []
    t0, cpu0 = time.perf_counter(), time.process_time()
    for i in range(0, len(turns), 100):  # bursts of 100 turns, then let the loop run (as a server would)
        for r in turns[i:i + 100]:
            a = time.perf_counter()
            sink.enqueue(r)
            costs.append(time.perf_counter() - a)
        await asyncio.sleep(0)
    while sink.written < len(turns):
        await asyncio.sleep(0.005)
    elapsed = time.perf_counter() - t0
    print(f"  StoreSink: {(time.process_time() - cpu0) / len(turns) * 1e6:.0f} us of this process's CPU per turn "
          "(hashing, rows, JSON, driver)")
    spooled = sink.spool.bytes
    await sink.stop()
    if spooled:
        print(f"  (note: {spooled} bytes went through the spool: the queue overflowed)")
    return len(turns) / elapsed, costs


def _pg_rows(turns: list[TurnRecord]):
    """The writer's own rows (JSON encoded), each turn its own conversation."""
    prepared = prepare(turns, encode_json=True)
    prepared.turns["conversation_id"] = ["conv-" + r.turn_id[5:21] for r in turns]
    return prepared.turn_rows(), prepared.candidate_rows()


async def run_naive(url: str, turns: list[TurnRecord]) -> float:
    """One transaction per turn: conversation, turn and each candidate as single-row INSERTs."""
    conn = await asyncpg.connect(url)
    trows, crows = _pg_rows(turns)
    ncand = len(crows) // len(trows)
    tcols, ccols = list(trows[0]), list(crows[0])
    tsql = f"INSERT INTO turns ({','.join(tcols)}) VALUES ({','.join(f'${i + 1}' for i in range(len(tcols)))})"
    csql = f"INSERT INTO candidates ({','.join(ccols)}) VALUES ({','.join(f'${i + 1}' for i in range(len(ccols)))})"
    t0 = time.perf_counter()
    for k, t in enumerate(trows):
        async with conn.transaction():
            await conn.execute("INSERT INTO conversations (id, first_seen, last_seen, route) VALUES ($1, $2, $2, $3)"
                               " ON CONFLICT (id) DO UPDATE SET last_seen = excluded.last_seen",
                               t["conversation_id"], t["created_at"], "bench")
            await conn.execute(tsql, *t.values())
            for c in crows[k * ncand:(k + 1) * ncand]:
                await conn.execute(csql, *c.values())
    elapsed = time.perf_counter() - t0
    await conn.close()
    return len(turns) / elapsed


async def run_copy(url: str, turns: list[TurnRecord]) -> float:
    """asyncpg COPY of the same rows, built in the timed section too (JSON encoding included)."""
    conn = await asyncpg.connect(url)
    t0 = time.perf_counter()
    trows, crows = _pg_rows(turns)
    convs = {t["conversation_id"]: (t["conversation_id"], t["created_at"], t["created_at"], "bench") for t in trows}
    async with conn.transaction():
        await conn.copy_records_to_table("conversations", records=list(convs.values()),
                                         columns=["id", "first_seen", "last_seen", "route"])
        await conn.copy_records_to_table("turns", records=[tuple(t.values()) for t in trows], columns=list(trows[0]))
        await conn.copy_records_to_table("candidates", records=[tuple(c.values()) for c in crows],
                                         columns=list(crows[0]))
    elapsed = time.perf_counter() - t0
    await conn.close()
    return len(turns) / elapsed


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--turns", type=int, default=20000)
    ap.add_argument("--candidates", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--naive-turns", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=500, help="StoreSink batch_max")
    args = ap.parse_args()
    name = f"turngate_bench_{uuid.uuid4().hex[:8]}"
    url = f"postgresql://postgres@127.0.0.1:5432/{name}"
    await admin(f'CREATE DATABASE "{name}"')
    try:
        await asyncio.to_thread(upgrade, url)
        sink_rates, naive_rates, copy_rates, p50s, p99s = [], [], [], [], []
        load0 = os.getloadavg()[0]
        for rep in range(args.repeats):
            turns = make_turns(args.turns, args.candidates)
            await truncate(url)
            rate, costs = await run_sink(url, turns, args.batch)
            costs.sort()
            sink_rates.append(rate)
            p50s.append(costs[len(costs) // 2])
            p99s.append(costs[int(len(costs) * 0.99)])
            await truncate(url)
            naive_rates.append(await run_naive(url, make_turns(args.naive_turns, args.candidates)))
            await truncate(url)
            copy_rates.append(await run_copy(url, make_turns(args.turns, args.candidates)))
            print(f"run {rep + 1}: sink {rate:,.0f} turns/s, naive {naive_rates[-1]:,.0f}, "
                  f"COPY {copy_rates[-1]:,.0f}; enqueue p50 {p50s[-1] * 1e6:.1f} us")
        med = statistics.median
        print(f"\n{args.turns} turns x {args.candidates} candidates, median of {args.repeats} runs; "
              f"{os.cpu_count()} cores, load average {load0:.1f} before / {os.getloadavg()[0]:.1f} after "
              "(a shared machine: timings are noisy)")
        print(f"{'writer':<34}{'turns/s':>12}{'vs naive':>10}")
        for label, rates in (("StoreSink (batched, threaded)", sink_rates),
                             ("naive: 1 txn of INSERTs per turn", naive_rates),
                             ("asyncpg COPY, no threading", copy_rates)):
            print(f"{label:<34}{med(rates):>12,.0f}{med(rates) / med(naive_rates):>9.1f}x")
        print(f"StoreSink / COPY: {med(sink_rates) / med(copy_rates):.2f}")
        print(f"enqueue on the request path: p50 {med(p50s) * 1e6:.2f} us, p99 {med(p99s) * 1e6:.2f} us")
    finally:
        await admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


if __name__ == "__main__":
    asyncio.run(main())
