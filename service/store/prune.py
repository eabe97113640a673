"""Retention: delete whole conversations whose last turn is older than a cutoff, in batches (one
short transaction each, so the writer is never blocked for long)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import delete, or_, select

from service.store.engine import make_sync_engine
from service.store.models import Candidate, CandidateLabel, Conversation, ConversationLink, Feedback, Turn


def prune(url: str, older_than: timedelta, batch: int = 1000) -> dict[str, int]:
    cutoff = datetime.now(UTC) - older_than
    engine = make_sync_engine(url)
    counts = {"conversations": 0, "turns": 0}
    try:
        while True:
            with engine.begin() as conn:
                ids = list(conn.execute(select(Conversation.id).where(Conversation.last_seen < cutoff)
                                        .limit(batch)).scalars())
                if not ids:
                    return counts
                turn_ids = select(Turn.id).where(Turn.conversation_id.in_(ids))
                conn.execute(delete(Feedback).where(or_(Feedback.conversation_id.in_(ids),
                                                        Feedback.turn_id.in_(turn_ids))))
                conn.execute(delete(CandidateLabel).where(CandidateLabel.turn_id.in_(turn_ids)))
                conn.execute(delete(Candidate).where(Candidate.turn_id.in_(turn_ids)))
                counts["turns"] += conn.execute(delete(Turn).where(Turn.conversation_id.in_(ids))).rowcount
                conn.execute(delete(ConversationLink).where(ConversationLink.conversation_id.in_(ids)))
                counts["conversations"] += conn.execute(delete(Conversation).where(Conversation.id.in_(ids))).rowcount
    finally:
        engine.dispose()


def parse_age(text: str) -> timedelta:
    """'30d', '12h', '90m', '45s' or '2w'."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
    text = text.strip().lower()
    if not text or text[-1] not in units or not text[:-1].replace(".", "", 1).isdigit():
        raise ValueError(f"expected an age like 30d, 12h, 90m, got {text!r}")
    return timedelta(seconds=float(text[:-1]) * units[text[-1]])
