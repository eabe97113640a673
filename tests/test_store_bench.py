"""bench/store_cpu.py runs end to end, briefly, on the embedded SQLite store and on PostgreSQL, and
prints the store's CPU a turn, by part with --split (the PostgreSQL writer's loop thread there);
bench/sqlite_statements.py compares its two ways of inserting."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("database", ["sqlite", "postgres"])
def test_store_cpu_bench_prints_the_stores_cpu_by_part(database):
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "store_cpu.py"), "--turns", "400", "--rate", "800",
                          "--repeats", "1", "--split", "--database", database],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert re.search(r"^run 1: 400 turns, store -?[\d.]+ ms CPU/turn", out.stdout, re.MULTILINE), out.stdout
    assert "loop: enqueue (encode, journal)" in out.stdout and "writer: prepare" in out.stdout
    if database == "postgres":
        assert "the postgres processes" in out.stdout and "writer: the PostgreSQL loop" in out.stdout, out.stdout
    else:
        assert "writer: inserts" in out.stdout and "postgres" not in out.stdout, out.stdout


def test_sqlite_statements_bench_compares_both_ways_beside_a_busy_thread():
    """Both ways land every row (the bench checks the count) and each prints a CPU figure a turn."""
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "sqlite_statements.py"), "--batches", "2",
                          "--repeats", "1"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    rows = re.findall(r"^(a row|32 rows)\s+(nothing|a busy thread)\s+([\d.]+)\s+([\d.]+)", out.stdout, re.MULTILINE)
    printed = sorted((way, beside) for way, beside, _, _ in rows)
    assert printed == [("32 rows", "a busy thread"), ("32 rows", "nothing"), ("a row", "a busy thread"),
                       ("a row", "nothing")], out.stdout
    assert all(float(cpu) > 0 for _, _, cpu, _ in rows), out.stdout
