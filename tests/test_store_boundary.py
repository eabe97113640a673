"""The record boundary fits a batch column by column (fit_columns, the writer's path) exactly as it
fits each row alone (fit_row): for every column of the tables the writer fills, with clean values
(the whole-column checks) and with one hostile value among clean ones (the value-by-value path)."""

from __future__ import annotations

import copy
from datetime import UTC, datetime

import pytest

from service.store.boundary import column_kinds, fit_columns, fit_row
from service.store.models import Candidate, Conversation, Turn
from service.store.writer import columns_of, rows_of

CLEAN = {"text": "plain", "int": 7, "float": 1.5, "json": {"role": "user", "content": "hi"}, "bool": True,
         "time": datetime(2026, 11, 30, 12, 0, 0, 123456, tzinfo=UTC)}
HOSTILE = [None, "", "é ok", "a\x00b", "bad \ud800 text", "x" * 5000, 0, 2**31, -(2**40), 2**70, 50, 1e300,
           float("nan"), float("inf"), True, False, {"k": "v"}, {"k\x00": ["\x00"]}, {1: 2}, [float("nan")],
           ["\ud800"], {"deep": [[[[[]]]]]}, b"raw", CLEAN["time"]]


def _rows(table, column: str | None, value) -> list[dict]:
    kinds = column_kinds(table)
    rows = [{c: copy.deepcopy(CLEAN[k]) for c, k in kinds.items()} for _ in range(3)]
    for i, row in enumerate(rows):
        row.update({c: f"{c}-{i}" for c, k in kinds.items() if k == "text"})
    if column is not None:
        rows[1][column] = value
    return rows


def _same(table, rows: list[dict], encode: bool) -> None:
    expected = [fit_row(table, r, encode) for r in copy.deepcopy(rows)]
    got = rows_of(fit_columns(table, columns_of(copy.deepcopy(rows)), encode))
    assert got == expected


@pytest.mark.parametrize("encode", [False, True])
@pytest.mark.parametrize("table", [Turn.__table__, Candidate.__table__, Conversation.__table__],
                         ids=lambda t: t.name)
def test_columns_fit_as_rows_do(table, encode):
    _same(table, _rows(table, None, None), encode)  # all clean: the whole-column checks pass
    for column, kind in column_kinds(table).items():
        for value in HOSTILE:
            if kind == "time" and not isinstance(value, datetime):
                continue  # fitted to the time of fitting: two calls differ
            _same(table, _rows(table, column, value), encode)


def test_a_hostile_value_is_fitted_and_its_clean_neighbours_kept():
    rows = _rows(Turn.__table__, "route", "r\x00\ud800" + "x" * 300)
    got = fit_columns(Turn.__table__, columns_of(rows), True)["route"]
    assert got[0] == "route-0" and got[2] == "route-2"
    assert "\x00" not in got[1] and len(got[1]) <= 200 and got[1].startswith("r\ufffd\ufffd")
