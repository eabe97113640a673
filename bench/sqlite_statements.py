"""The SQLite writer's inserts, a statement a row (executemany, as service.store.sqlite_batch does)
against 32 rows a statement (INSERT ... VALUES (...), (...), ...), alone and beside a busy thread.

    python bench/sqlite_statements.py [--batches 40] [--repeats 4]

sqlite3 lets the GIL go around every step of a statement. Beside a thread that wants the GIL often
(the event loop: a little Python between system calls; here a thread that does some arithmetic and a
pipe round trip, over and over), each step of the writer's may wait for that thread to let it go. The
bench prepares passthrough-sized turns (bench/store_cpu.py's) in batches of 125, then inserts their
turn and candidate rows into a SQLite file both ways, alternately, and prints the writer thread's CPU
a turn, the wall time a turn, and the busy thread's round trips a second meanwhile (its share of
the GIL), medians of the repeats.

Beside this busy thread, a row a statement costs the writer about twice the CPU; in the proxy (bench/
proxy_threads.py, the writer with 32 rows a statement against the writer as it is) the writer thread's
CPU a request did not change, so the writer keeps executemany (docs/store.md, "Stop 35").
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from itertools import chain
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.store_cpu import passthrough_turn
from service.store.migrate import upgrade
from service.store.models import Candidate, Turn
from service.store.sqlite_batch import SqliteBatchWriter, _Table, sqlite_time
from service.store.writer import LinkCache, cached_links, prepare, thread_rows

BATCH = 125  # turns a batch: the writer's at a few hundred turns a second
ROWS = 32  # rows a statement, the other way
CONFLICT = "ON CONFLICT DO NOTHING"


def insert_many(conn: sqlite3.Connection, t: _Table, rows: list[tuple]) -> None:
    """The rows ROWS a statement, the rest in smaller powers of two (few statement texts to compile)."""
    head = t.sql.split(" VALUES ")[0]
    one = f"({', '.join('?' * len(t.columns))})"
    start, n = 0, ROWS
    while n:
        while len(rows) - start >= n:
            conn.execute(f"{head} VALUES {', '.join([one] * n)} {CONFLICT}",
                         list(chain.from_iterable(rows[start:start + n])))
            start += n
        n //= 2


class Busy:
    """A thread that wants the GIL often, as the event loop does; counts its round trips."""

    def __init__(self) -> None:
        self.trips, self._stop = 0, False
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        r, w = os.pipe()
        while not self._stop:
            sum(range(200))
            os.write(w, b"x")
            os.read(r, 1)
            self.trips += 1

    def __enter__(self) -> Busy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop = True
        self._thread.join()


def batches(n: int) -> list:
    cache = LinkCache()
    out = []
    for _ in range(n):
        p = prepare([passthrough_turn(i) for i in range(BATCH)], encode_json=True)
        found, _ = cached_links(p, cache)
        p.turns["created_at"] = list(map(sqlite_time, p.turns["created_at"]))
        thread_rows(p, found)
        out.append(p)
    return out


def run(way: str, prepared: list, busy: bool) -> tuple[float, float, float]:
    """(writer CPU us a turn, wall us a turn, busy thread's round trips a second)."""
    db = f"{tempfile.mkdtemp(prefix='tg-sqlite-stmt-')}/store.db"
    upgrade(f"sqlite:///{db}")
    writer = SqliteBatchWriter(db)
    conn = writer._connect()
    conn.execute("PRAGMA foreign_keys=OFF")  # the bench writes no conversation rows
    tables: dict[str, _Table] = {}
    cpu = wall = 0.0
    helper = Busy() if busy else None
    with helper or contextlib.nullcontext():
        start = time.perf_counter()
        for p in prepared:
            conn.execute("BEGIN IMMEDIATE")
            c0, w0 = time.thread_time(), time.perf_counter()
            for table, columns in ((Turn.__table__, p.turns), (Candidate.__table__, p.candidates)):
                t = tables.get(table.name) or tables.setdefault(
                    table.name, _Table(table, list(columns), CONFLICT))
                rows = t.params(columns)
                if way == "a row":
                    conn.executemany(t.sql, rows)
                else:
                    insert_many(conn, t, rows)
            cpu += time.thread_time() - c0
            wall += time.perf_counter() - w0
            conn.execute("COMMIT")
        elapsed = time.perf_counter() - start
        trips = helper.trips / elapsed if helper else float("nan")
    turns = len(prepared) * BATCH
    assert conn.execute("SELECT count(*) FROM turns").fetchone()[0] == turns, "a way lost rows"
    writer._close()
    return cpu / turns * 1e6, wall / turns * 1e6, trips


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=4)
    args = ap.parse_args()
    ways = ("a row", f"{ROWS} rows")
    print(f"{args.batches} batches of {BATCH} passthrough turns (turn and candidate rows), {args.repeats} "
          f"alternating repeats, {os.cpu_count()} cores; medians")
    print(f"{'statements':<12}{'beside':<14}{'writer cpu us/turn':>20}{'wall us/turn':>14}{'busy trips/s':>14}")
    for busy in (False, True):
        got: dict[str, list[tuple[float, float, float]]] = {w: [] for w in ways}
        for r in range(args.repeats):
            for way in (ways if r % 2 == 0 else ways[::-1]):
                got[way].append(run(way, batches(args.batches), busy))
        for way in ways:
            cpu, wall, trips = (statistics.median(x) for x in zip(*got[way]))
            print(f"{way:<12}{'a busy thread' if busy else 'nothing':<14}{cpu:>20.1f}{wall:>14.1f}"
                  f"{trips if busy else float('nan'):>14.0f}")


if __name__ == "__main__":
    main()
