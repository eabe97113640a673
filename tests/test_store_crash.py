"""Turns answered 200 survive the process being killed: a real turngate process (the app, its
store and spool, on PostgreSQL) under load from a client is sent SIGKILL mid-load and restarted;
every turn that was answered 200 is then in the database exactly once. The scenario is the fault
suite's own (bench/faults.py), asserted."""

# ruff: noqa: F811 - the fixtures are imported from tests.test_store_support

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from tests.test_store_support import make_pg_db  # noqa: F401 - fixture

FAULTS = Path(__file__).resolve().parents[1] / "bench" / "faults.py"


def load_faults():
    spec = importlib.util.spec_from_file_location("bench_faults", FAULTS)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("fault", ["sigkill", "sigterm"])
async def test_every_turn_answered_200_is_stored_once_after_a_kill_and_restart(make_pg_db, tmp_path, fault):
    faults = load_faults()
    harness = faults.Harness(make_pg_db(), tmp_path)
    try:
        row = await faults.run_fault(harness, fault, seconds=3.0, concurrency=8)
    finally:
        harness.close()
    answered = set(row.answered)
    # The kill fell mid-load: turns had been answered (and were still queued for the writer).
    assert row.answered_before_fault >= 10, row
    assert len(answered) > row.answered_before_fault  # and the restarted process served more
    assert row.stored == len(answered), f"{len(answered) - row.stored} answered turns lost ({row.note})"
    assert row.dups == 0
    assert "spool segment" not in row.note  # the journal was retired once everything was written
