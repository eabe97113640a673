"""The embedded store's CPU per turn: StoreSink on a SQLite file, fed passthrough-sized turns at a
proxy's rate, every thread of the process counted (as bench/overhead.py's `proxy cpu/req` does).

    python bench/store_cpu.py [--turns 3000] [--rate 250] [--repeats 3] [--lag] [--prefill 30000] [--split]
                              [--database sqlite|postgres] [--flush-interval 0.5]

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

--database postgres writes to a new database on the local PostgreSQL (dropped at the end) and also
prints the CPU of the machine's postgres processes per turn (the database's own work, which is not
the proxy's: in production it runs on another host).

--flush-interval sets how often the sink writes a batch (its default, 0.5 s): a longer one writes
fewer, larger batches, and turns reach the database later.

--lag also runs a probe on the loop (a 1 ms sleep, over and over) and prints how late it woke, with
the store and without: the writer thread holding the GIL delays the loop, which a proxy's latency
percentiles show.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import statistics
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import uvloop

from service.gate.record import CandidateRecord, ConversationHint, TurnRecord, new_turn_id
from service.store import pg_batch, sqlite_batch
from service.store.sink import StoreSink
from service.store.spool import Spool

sys.path.append(str(Path(__file__).resolve().parents[1]))  # after PYTHONPATH: an A/B checkout's own service
from bench import _load

BURST = 8  # turns enqueued per wake-up: requests finishing together under concurrency 16
SPLIT: defaultdict[str, float] = defaultdict(float)  # --split: thread CPU seconds by part of the store
PG_THREADS: list[int] = []  # --split: native ids of the PostgreSQL writer's loop threads


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
    timed(pg_batch, "prepare", "writer: prepare (thread, fit, encode)")
    timed(Spool, "sync", "worker: spool fsyncs")
    timed(StoreSink, "_housekeep", "worker: journal housekeeping")
    serve = pg_batch.LoopThread._serve

    def serve_noted(self, loop):  # the PostgreSQL writer's loop thread, whose CPU is read from /proc
        PG_THREADS.append(threading.get_native_id())
        serve(self, loop)
    pg_batch.LoopThread._serve = serve_noted  # type: ignore[method-assign]


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
                prefill: int = 0, pg_url: str | None = None, flush_interval_s: float = 0.5
                ) -> tuple[float, float, int]:
    """Process CPU seconds (all threads) and the postgres processes' CPU seconds for n turns at
    `rate`/s, until the last is committed; with `lags`, the loop's wake-up lags meanwhile."""
    d = tempfile.mkdtemp(prefix="tg-store-cpu-")
    sink = StoreSink(pg_url or f"sqlite:///{d}/store.db", f"{d}/spool", auto_migrate=True,
                     flush_interval_s=flush_interval_s)
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
    pg_loop = Path(f"/proc/self/task/{PG_THREADS[-1]}/stat") if pg_url and PG_THREADS else None
    loop0 = _load.stat_cpu_seconds(pg_loop) if pg_loop else 0.0
    db0 = _load.postgres_cpu_seconds() if pg_url else 0.0
    cpu0 = time.process_time()
    for i in range(0, n, BURST):
        if record:
            for r in turns[i:i + BURST]:
                sink.enqueue(r)
        await asyncio.sleep(BURST / rate)
    if record and not await sink.flush(60):
        raise SystemExit("the store did not write every turn")
    cpu = time.process_time() - cpu0
    db = _load.postgres_cpu_seconds() - db0 if pg_url else 0.0
    if pg_loop:
        SPLIT["writer: the PostgreSQL loop (transaction, asyncpg)"] += _load.stat_cpu_seconds(pg_loop) - loop0
    if prober is not None:
        prober.cancel()
    written = sink.written - written0 - len(warm)
    await sink.stop()
    return cpu, db, written


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--turns", type=int, default=3000)
    ap.add_argument("--rate", type=float, default=250.0, help="turns per second (the proxy's req/s)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--lag", action="store_true", help="also measure the loop's wake-up lag")
    ap.add_argument("--prefill", type=int, default=0, help="turns written before the measured ones")
    ap.add_argument("--split", action="store_true", help="also print the store's CPU by part")
    ap.add_argument("--database", choices=("sqlite", "postgres"), default="sqlite",
                    help="a SQLite file (the embedded store), or a new database on the local PostgreSQL")
    ap.add_argument("--flush-interval", type=float, default=0.5, help="seconds between the sink's batches")
    args = ap.parse_args()
    pg = _load.PgDatabase() if args.database == "postgres" else None
    try:
        uvloop.run(measure(args, pg.url if pg else None))
    finally:
        if pg:
            pg.drop()


async def measure(args: argparse.Namespace, pg_url: str | None) -> None:
    if args.split:
        split_by_part()
    parts: dict[str, list[float]] = {}
    per_turn, db_per_turn = [], []
    lags: dict[bool, list[float]] | None = {True: [], False: []} if args.lag else None
    for i in range(args.repeats):
        with_store, db, written = await paced(args.turns, args.rate, True, lags[True] if lags else None,
                                              args.prefill, pg_url, args.flush_interval)
        for part, seconds in SPLIT.items():
            parts.setdefault(part, []).append(seconds / args.turns * 1000)
        idle, db_idle, _ = await paced(args.turns, args.rate, False, lags[False] if lags else None,
                                       pg_url=pg_url, flush_interval_s=args.flush_interval)
        per_turn.append((with_store - idle) / args.turns * 1000)
        db_per_turn.append((db - db_idle) / args.turns * 1000)
        print(f"run {i + 1}: {written} turns, store {per_turn[-1]:.3f} ms CPU/turn "
              f"(paced loop with store {with_store:.2f} s, without {idle:.2f} s)"
              + (f", postgres processes {db_per_turn[-1]:.3f} ms/turn" if pg_url else ""))
    print(f"store CPU per turn, median of {args.repeats}: {statistics.median(per_turn):.3f} ms"
          + (f" in this process; the postgres processes {statistics.median(db_per_turn):.3f} ms" if pg_url else ""))
    for part, ms in parts.items():
        print(f"  {part:<40} {statistics.median(ms):.4f} ms/turn")
    if lags is not None:
        for record, got in lags.items():
            q = statistics.quantiles(got, n=1000)
            print(f"loop wake-up lag {'with' if record else 'without'} the store: p99 {q[989] * 1000:.2f} ms, "
                  f"p99.9 {q[998] * 1000:.2f} ms, max {max(got) * 1000:.2f} ms ({len(got)} wake-ups)")


if __name__ == "__main__":
    main()
