"""The embedded store's CPU per turn: StoreSink on a SQLite file, fed passthrough-sized turns at a
proxy's rate, every thread of the process counted (as bench/overhead.py's `proxy cpu/req` does).

    python bench/store_cpu.py [--turns 3000] [--rate 250] [--repeats 3] [--lag] [--prefill 30000] [--split]

Each repeat runs the same paced loop twice, with the turns enqueued and without (the loop's own
cost), and prints the difference per turn: journal (enqueue), writer (prepare, rows, commits),
spool rotation and fsyncs. It uses only StoreSink's interface, so the same command under another
checkout's PYTHONPATH measures that checkout (old and new run alternately share the machine's load).

--prefill N writes N turns first: inserts into a store that already holds many turns touch more
pages than into a new one (ids that land at random places in an index cost the most there).

--split also prints where the store's CPU went, per turn, by the thread that spent it: on the
loop, StoreSink.enqueue (the record encoded and journaled); on the writer's thread, prepare (threading
keys, rows fitted and encoded), the inserts, and the rest of _write (BEGIN, COMMIT); on worker
threads, the spool's fsyncs and the journal's housekeeping. Each is timed by its own thread's CPU
clock (a wrapper per call, which itself reads as about 1 us a call: read the small parts as upper bounds).

--lag also runs a probe on the loop (a 1 ms sleep, over and over) and prints how late it woke, with
the store and without: the writer thread holding the GIL delays the loop, which a proxy's latency
percentiles show.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import statistics
import tempfile
import time
from collections import Counter

import uvloop

from service.gate.record import CandidateRecord, ConversationHint, TurnRecord, new_turn_id
from service.store import sqlite_batch
from service.store.sink import StoreSink
from service.store.spool import Spool

BURST = 8  # turns enqueued per wake-up: requests finishing together under concurrency 16
SPLIT: Counter[str] = Counter()  # --split: thread CPU seconds by part of the store


def split_by_part() -> None:
    """Wraps the store's parts so that each adds its own thread's CPU time to SPLIT."""
    def timed(owner: object, name: str, part: str) -> None:
        fn = getattr(owner, name)

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            t = time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                SPLIT[part] += time.thread_time() - t
        setattr(owner, name, wrapper)

    timed(StoreSink, "enqueue", "loop: enqueue (encode, journal)")
    timed(sqlite_batch, "prepare", "writer: prepare (thread, fit, encode)")
    timed(sqlite_batch.SqliteBatchWriter, "_insert", "writer: inserts")
    timed(sqlite_batch.SqliteBatchWriter, "_write", "writer: all of _write")
    timed(Spool, "sync", "worker: spool fsyncs")
    timed(StoreSink, "_housekeep", "worker: journal housekeeping")


def passthrough_turn(i: int) -> TurnRecord:
    """What a passthrough route records for a short chat request (about 1.2 KB as a spool line)."""
    reply = CandidateRecord(index=0, round=0, finish_reason="stop", upstream_latency_ms=50.0, prompt_tokens=20,
                            completion_tokens=10,
                            usage={"prompt_tokens": 20, "completion_tokens": 10, "total_tokens": 30},
                            message={"role": "assistant", "content": "The capital of France is Paris. " * 3})
    return TurnRecord(turn_id=new_turn_id(), route="pass", mode="passthrough", upstream_model="fake",
                      request_messages=[{"role": "user", "content": f"What is the capital of France? ({i})"}],
                      decision="passthrough", chosen_index=0, latency_total_ms=55.0, latency_upstream_ms=50.0,
                      prompt_tokens=20, completion_tokens=10, candidates=[reply],
                      conversation=ConversationHint(key_id="bench"))


async def probe(lags: list[float]) -> None:
    """Appends how late (seconds) each 1 ms sleep of the loop woke, until cancelled."""
    while True:
        t = time.perf_counter()
        await asyncio.sleep(0.001)
        lags.append(time.perf_counter() - t - 0.001)


async def paced(n: int, rate: float, record: bool, lags: list[float] | None = None,
                prefill: int = 0) -> tuple[float, int]:
    """Process CPU seconds (all threads) for n turns at `rate`/s, until the last is committed;
    with `lags`, the loop's wake-up lags meanwhile."""
    d = tempfile.mkdtemp(prefix="tg-store-cpu-")
    sink = StoreSink(f"sqlite:///{d}/store.db", f"{d}/spool", auto_migrate=True)
    await sink.start()
    for start in range(0, prefill, 2000):
        for i in range(start, min(prefill, start + 2000)):
            sink.enqueue(passthrough_turn(i))
        await sink.flush(60)
    written0 = sink.written
    warm = [passthrough_turn(i) for i in range(200)]
    for r in warm:
        sink.enqueue(r)
    await sink.flush(30)
    turns = [passthrough_turn(i) for i in range(n)]
    SPLIT.clear()
    prober = asyncio.create_task(probe(lags)) if lags is not None else None
    cpu0 = time.process_time()
    for i in range(0, n, BURST):
        if record:
            for r in turns[i:i + BURST]:
                sink.enqueue(r)
        await asyncio.sleep(BURST / rate)
    if record and not await sink.flush(60):
        raise SystemExit("the store did not write every turn")
    cpu = time.process_time() - cpu0
    if prober is not None:
        prober.cancel()
    written = sink.written - written0 - len(warm)
    await sink.stop()
    return cpu, written


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--turns", type=int, default=3000)
    ap.add_argument("--rate", type=float, default=250.0, help="turns per second (the proxy's req/s)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--lag", action="store_true", help="also measure the loop's wake-up lag")
    ap.add_argument("--prefill", type=int, default=0, help="turns written before the measured ones")
    ap.add_argument("--split", action="store_true", help="also print the store's CPU by part")
    args = ap.parse_args()
    if args.split:
        split_by_part()
    parts: dict[str, list[float]] = {}
    per_turn = []
    lags: dict[bool, list[float]] | None = {True: [], False: []} if args.lag else None
    for i in range(args.repeats):
        with_store, written = await paced(args.turns, args.rate, True, lags[True] if lags else None,
                                          args.prefill)
        for part, seconds in SPLIT.items():
            parts.setdefault(part, []).append(seconds / args.turns * 1000)
        idle, _ = await paced(args.turns, args.rate, False, lags[False] if lags else None)
        per_turn.append((with_store - idle) / args.turns * 1000)
        print(f"run {i + 1}: {written} turns, store {per_turn[-1]:.3f} ms CPU/turn "
              f"(paced loop with store {with_store:.2f} s, without {idle:.2f} s)")
    print(f"store CPU per turn, median of {args.repeats}: {statistics.median(per_turn):.3f} ms")
    for part, ms in parts.items():
        print(f"  {part:<40} {statistics.median(ms):.4f} ms/turn")
    if lags is not None:
        for record, got in lags.items():
            q = statistics.quantiles(got, n=1000)
            print(f"loop wake-up lag {'with' if record else 'without'} the store: p99 {q[989] * 1000:.2f} ms, "
                  f"p99.9 {q[998] * 1000:.2f} ms, max {max(got) * 1000:.2f} ms ({len(got)} wake-ups)")


if __name__ == "__main__":
    uvloop.run(main())
