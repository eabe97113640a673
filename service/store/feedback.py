"""Outcome feedback on a turn or a conversation: lookups and the idempotent insert."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import or_, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import SQLAlchemyError

from service.store.boundary import fit_text
from service.store.models import EXTERNAL_ID_CHARS, Conversation, Feedback, Turn


class UnknownTarget(Exception):
    """No such turn or conversation (after waiting for writers to catch up)."""


class StoreUnavailable(Exception):
    """The database did not answer."""


@dataclass
class FeedbackIn:
    turn_id: str | None
    conversation_id: str | None
    reward: float | None
    label: str | None
    comment: str | None
    source: str
    client_id: str | None
    key_id: str | None


def _public(row: Any) -> dict[str, Any]:
    return {"id": f"fb-{row.id}", "object": "feedback", "turn_id": row.turn_id,
            "conversation_id": row.conversation_id, "reward": row.reward, "label": row.label,
            "source": row.source, "comment": row.comment, "client_id": row.client_id,
            "created_at": int(row.created_at.timestamp()) if row.created_at else None}


def _owned(column, key_id: str | None):
    """Rows of this client key only; anonymous (None) is a key of its own. Written as = / IS NULL,
    not IS NOT DISTINCT FROM, which PostgreSQL cannot look up in an index."""
    return column.is_(None) if key_id is None else column == key_id


async def _turn_conversation(conn, turn_id: str, key_id: str | None) -> str | None:
    # A turn belongs to its conversation's key: threading never crosses keys (service.store.conversations).
    q = (select(Turn.conversation_id).join(Conversation, Conversation.id == Turn.conversation_id)
         .where(Turn.id == turn_id, _owned(Conversation.key_id, key_id)))
    return (await conn.execute(q)).scalar_one_or_none()


async def _conversation(conn, cid: str, key_id: str | None) -> str | None:
    stored = fit_text(cid, EXTERNAL_ID_CHARS)  # stored cut, the same way
    q = (select(Conversation.id)
         .where(or_(Conversation.id == cid, Conversation.external_id == stored), _owned(Conversation.key_id, key_id))
         .order_by(Conversation.last_seen.desc()).limit(1))
    return (await conn.execute(q)).scalar_one_or_none()


async def _existing(conn, fb: FeedbackIn) -> Any:
    q = select(Feedback).where(Feedback.client_id == fb.client_id, _owned(Feedback.key_id, fb.key_id))
    return (await conn.execute(q)).first()


async def record_feedback(sink, fb: FeedbackIn, wait_s: float = 2.0) -> tuple[dict[str, Any], bool]:
    """Stores feedback; returns (the row, whether it already existed under the client's id).

    Everything is scoped by the client key (`fb.key_id`; None = anonymous): the idempotency id,
    the turn and the conversation. Another key's turn or conversation is UnknownTarget, after the
    same wait as an id that does not exist, so a 404 tells nothing about other tenants.

    A turn this replica served but has not written yet (queue or spool) is accepted at once: the
    row references it by id and needs no foreign key. A turn unknown here may sit in another
    replica's queue, so the lookup is retried for `wait_s` (about two flush intervals) before 404.
    No connection is held while waiting: each look is a short transaction of its own.
    """
    engine = sink.engine
    try:
        if fb.client_id:
            async with engine.connect() as conn:
                row = await _existing(conn, fb)
            if row is not None:
                return _public(row), True
        conv = await _resolve(sink, fb, wait_s)
        row = {"turn_id": fb.turn_id, "conversation_id": conv, "reward": fb.reward, "label": fb.label,
               "comment": fb.comment, "source": fb.source, "client_id": fb.client_id, "key_id": fb.key_id,
               "created_at": datetime.now(UTC)}
        async with engine.begin() as conn:
            insert = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
            stmt = insert(Feedback).values(**row).on_conflict_do_nothing().returning(*Feedback.__table__.c)
            created = (await conn.execute(stmt)).first()
            if created is not None:
                return _public(created), False
            return _public(await _existing(conn, fb)), True
    except SQLAlchemyError as e:
        raise StoreUnavailable(str(e)) from e
    except (TimeoutError, OSError) as e:
        raise StoreUnavailable(str(e)) from e


async def _resolve(sink, fb: FeedbackIn, wait_s: float) -> str | None:
    """The conversation id the feedback belongs to (None for a turn not written yet)."""
    deadline = time.monotonic() + wait_s
    flushed = False
    while True:
        found, conv = await _look_up_target(sink, fb)
        if found:
            return conv
        if not flushed and hasattr(sink, "flush"):
            flushed = True
            await sink.flush(timeout_s=wait_s)
            continue
        if time.monotonic() >= deadline:
            raise UnknownTarget(fb.turn_id or fb.conversation_id)
        await asyncio.sleep(0.2)


async def _look_up_target(sink, fb: FeedbackIn) -> tuple[bool, str | None]:
    """(found, its conversation id) at this moment: one short transaction, a fresh snapshot each time."""
    async with sink.engine.connect() as conn:
        if fb.turn_id:
            conv = await _turn_conversation(conn, fb.turn_id, fb.key_id)
        elif fb.conversation_id:
            conv = await _conversation(conn, fb.conversation_id, fb.key_id)
        else:
            conv = None
    if conv is not None:
        return True, conv
    return _pending_here(sink, fb), None


def _pending_here(sink, fb: FeedbackIn) -> bool:
    """Whether the turn was served here under the same key and is still on its way to the database."""
    pending = getattr(sink, "pending_ids", {})
    return bool(fb.turn_id) and fb.turn_id in pending and pending[fb.turn_id] == fb.key_id
