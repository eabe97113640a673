"""Whose fault is a failed write: the records in it, or the database (or the way to it)?

The writer splits a batch to find a refusing record only when the error could lie in the records:
the database answered and refused the data (SQLSTATE classes 22 data exception, 23 integrity
constraint, 54 program limit such as nesting depth), or preparing the rows raised (a value error in
our own code). Everything else (connections refused or killed, timeouts, lock waits, deadlocks,
shutdowns, missing tables, permissions, disk full) says nothing about the records: the turns stay
in the journal and are retried, never quarantined.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Iterator

import asyncpg
from sqlalchemy.exc import DBAPIError

RECORD, OUTAGE = "record", "outage"
_RECORD_SQLSTATE_CLASSES = ("22", "23", "54")
_PYTHON_RECORD_ERRORS = (ValueError, TypeError, OverflowError, RecursionError, LookupError, AttributeError)


def blame(error: BaseException) -> str:
    chain = list(_chain(error))
    for e in chain:
        if isinstance(e, (OSError, TimeoutError, asyncio.TimeoutError)):
            return OUTAGE
        if isinstance(e, DBAPIError) and e.connection_invalidated:
            return OUTAGE
        state = getattr(e, "sqlstate", None)
        if isinstance(state, str) and len(state) == 5:
            return RECORD if state[:2] in _RECORD_SQLSTATE_CLASSES else OUTAGE
        if isinstance(e, asyncpg.InterfaceError) and not isinstance(e, ValueError):
            return OUTAGE  # the driver's state (a closed connection), not a value
        if isinstance(e, sqlite3.Error):
            return OUTAGE if isinstance(e, sqlite3.OperationalError) or type(e) is sqlite3.DatabaseError \
                else RECORD  # locked, I/O, no such table, corrupt file vs constraint, data, binding
    if any(isinstance(e, _PYTHON_RECORD_ERRORS) for e in chain):
        return RECORD
    return OUTAGE


def _chain(error: BaseException) -> Iterator[BaseException]:
    """The error, what SQLAlchemy wrapped (`orig`) and the causes, each once."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [error]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo.extend([getattr(e, "orig", None), e.__cause__, e.__context__])
