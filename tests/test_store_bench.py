"""bench/store_cpu.py runs end to end, briefly, on the embedded SQLite store and on PostgreSQL, and
prints the store's CPU a turn, by part with --split (the PostgreSQL writer's loop thread there)."""

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
