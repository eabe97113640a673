"""Keyset pagination cursors for lists ordered newest first on (created_at, id): the turn inspector
and the key list. A cursor is opaque to clients: base64url of the last row's key, which the next
page's query continues after, so a page never skips or repeats a row while new ones arrive."""

from __future__ import annotations

import base64
import binascii
import json
from datetime import UTC, datetime


class BadCursor(ValueError):
    """A cursor this module did not make (or one from another page size of another query)."""


def as_utc(dt: datetime) -> datetime:
    """Aware UTC; a naive time is taken as UTC. OverflowError when the shift leaves datetime's range."""
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)


def encode_cursor(created_at: datetime, row_id: str) -> str:
    raw = json.dumps([as_utc(created_at).isoformat(), row_id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        at, row_id = json.loads(raw)
        if not isinstance(at, str) or not isinstance(row_id, str) or "\x00" in row_id:
            raise BadCursor(cursor)
        row_id.encode()  # a lone surrogate cannot be sent to the database (UnicodeEncodeError)
        return as_utc(datetime.fromisoformat(at)), row_id
    except (binascii.Error, ValueError, TypeError, OverflowError) as e:  # Unicode errors are ValueErrors
        raise BadCursor(cursor) from e
