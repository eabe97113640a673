"""Read-only queries behind the turn inspector (GET /v1/admin/turns, /turns/{id}, /stats).

Turns are listed newest first with keyset pagination on (created_at, id): a page never skips or
repeats a turn while new ones arrive, and no page costs more than its own rows. The cursor is
opaque to clients (service.store.cursors).

Times: SQLite hands back naive datetimes, stored as UTC; every time leaving here is aware UTC.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, and_, case, exists, func, literal_column, or_, select
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.orm import aliased

from service.store.cursors import as_utc, decode_cursor, encode_cursor
from service.store.models import Candidate, Conversation, Feedback, JSONType, Turn

PREVIEW_CHARS = 200


@dataclass(frozen=True)
class TurnFilter:
    route: str | None = None
    decision: str | None = None
    key_id: str | None = None
    since: datetime | None = None  # aware UTC, inclusive
    until: datetime | None = None  # aware UTC, exclusive


# -- the list --------------------------------------------------------------------------------------
def _where(f: TurnFilter) -> list[Any]:
    conds: list[Any] = []
    if f.route is not None:
        conds.append(Turn.route == f.route)
    if f.decision is not None:
        conds.append(Turn.decision == f.decision)
    if f.key_id is not None:
        conds.append(Conversation.key_id == f.key_id)
    if f.since is not None:
        conds.append(Turn.created_at >= f.since)
    if f.until is not None:
        conds.append(Turn.created_at < f.until)
    return conds


# The last user message of each listed turn, picked in the database: a page of agent turns would
# otherwise carry every turn's whole history (often 100 kB each) out of it for a 200-character preview.
_LAST_USER = {
    "postgresql": "(SELECT m FROM jsonb_array_elements(CASE WHEN jsonb_typeof(turns.request_messages) = 'array' "
                  "THEN turns.request_messages ELSE '[]'::jsonb END) WITH ORDINALITY AS e(m, i) "
                  "WHERE m->>'role' = 'user' ORDER BY i DESC LIMIT 1)",
    "sqlite": "(SELECT value FROM json_each(turns.request_messages) WHERE json_type(turns.request_messages) = 'array' "
              "AND json_extract(value, '$.role') = 'user' ORDER BY key DESC LIMIT 1)",
}


def _last_user_message(dialect: str) -> ColumnElement[Any]:
    return literal_column(_LAST_USER[dialect], JSONType).label("last_user")


async def list_turns(engine: AsyncEngine, f: TurnFilter, limit: int,
                     cursor: str | None = None) -> tuple[list[dict[str, Any]], str | None]:
    """One page of turn summaries, newest first, and the cursor of the next page (None at the end).
    BadCursor when `cursor` is not one of ours."""
    conds = _where(f)
    if cursor is not None:
        at, last_id = decode_cursor(cursor)
        conds.append(or_(Turn.created_at < at, and_(Turn.created_at == at, Turn.id < last_id)))
    chosen = aliased(Candidate)
    n_candidates = select(func.count()).where(Candidate.turn_id == Turn.id).correlate(Turn).scalar_subquery()
    has_feedback = exists().where(Feedback.turn_id == Turn.id).correlate(Turn)
    q = (select(Turn.id, Turn.created_at, Turn.route, Turn.mode, Turn.decision, Turn.chosen_index, Turn.rounds,
                Turn.latency_total_ms, Turn.prompt_tokens, Turn.completion_tokens, Turn.conversation_id,
                _last_user_message(engine.dialect.name), Conversation.key_id, chosen.message.label("chosen_message"),
                chosen.score.label("chosen_score"), n_candidates.label("candidates"),
                has_feedback.label("has_feedback"))
         .join(Conversation, Conversation.id == Turn.conversation_id)
         .outerjoin(chosen, and_(chosen.turn_id == Turn.id, chosen.idx == Turn.chosen_index))
         .where(*conds)
         .order_by(Turn.created_at.desc(), Turn.id.desc())
         .limit(limit + 1))
    async with engine.connect() as conn:
        rows = (await conn.execute(q)).all()
    page = rows[:limit]
    items = [{
        "id": r.id, "created_at": as_utc(r.created_at), "route": r.route, "mode": r.mode,
        "decision": r.decision, "chosen_index": r.chosen_index, "rounds": r.rounds,
        "candidates": int(r.candidates or 0), "chosen_score": finite(r.chosen_score),
        "latency_total_ms": finite(r.latency_total_ms),
        "tokens": {"prompt": r.prompt_tokens, "completion": r.completion_tokens},
        "key_id": r.key_id, "conversation_id": r.conversation_id,
        "last_user_message": preview(message_text(r.last_user)),
        "chosen_reply": preview(message_text(r.chosen_message)) if r.chosen_message is not None else None,
        "has_feedback": bool(r.has_feedback),
    } for r in page]
    more = len(rows) > limit
    return items, encode_cursor(page[-1].created_at, page[-1].id) if more and page else None


# -- one turn --------------------------------------------------------------------------------------
async def get_turn(engine: AsyncEngine, turn_id: str) -> dict[str, Any] | None:
    # Core rows (not ORM objects): read-only, and the columns are named as in the tables.
    async with engine.connect() as conn:
        turn = (await conn.execute(select(*Turn.__table__.c, Conversation.key_id)
                                   .join(Conversation, Conversation.id == Turn.conversation_id)
                                   .where(Turn.id == turn_id))).first()
        if turn is None:
            return None
        cands = (await conn.execute(select(Candidate.__table__).where(Candidate.turn_id == turn_id)
                                    .order_by(Candidate.idx))).all()
        fb = (await conn.execute(select(Feedback.__table__)
                                 .where(or_(Feedback.turn_id == turn_id,
                                            and_(Feedback.turn_id.is_(None),
                                                 Feedback.conversation_id == turn.conversation_id)))
                                 .order_by(Feedback.created_at, Feedback.id))).all()
    return {
        "id": turn.id, "created_at": as_utc(turn.created_at), "route": turn.route, "mode": turn.mode,
        "upstream_model": turn.upstream_model, "decision": turn.decision, "chosen_index": turn.chosen_index,
        "rounds": turn.rounds, "candidates_saved": turn.candidates_saved,
        "critic": {"name": turn.critic_name, "version": turn.critic_version},
        "conversation_id": turn.conversation_id, "conversation_index": turn.idx, "key_id": turn.key_id,
        "request": {"messages": turn.request_messages, "tools": turn.tools, "client_metadata": turn.client_metadata},
        "interventions": list(turn.feedback_texts or []),
        "latency_ms": {"total": finite(turn.latency_total_ms), "upstream": finite(turn.latency_upstream_ms),
                       "critic": finite(turn.latency_critic_ms)},
        "tokens": {"prompt": turn.prompt_tokens, "completion": turn.completion_tokens},
        "error": turn.error, "upstream_errors": list(turn.upstream_errors or []),
        "decided_by": turn.decided_by, "judge_reason": turn.judge_reason, "critics_agreed": turn.critics_agreed,
        "candidates": [_candidate(c, turn.chosen_index) for c in cands],
        "feedback": {"turn": [_feedback(x) for x in fb if x.turn_id == turn_id],
                     "conversation": [_feedback(x) for x in fb if x.turn_id is None]},
    }


def _candidate(c: Any, chosen_index: int | None) -> dict[str, Any]:
    return {"index": c.idx, "round": c.round, "chosen": c.idx == chosen_index, "message": c.message,
            "finish_reason": c.finish_reason, "verdict": c.verdict, "veto_reason": c.veto_reason,
            "veto_detail": c.veto_detail, "score": finite(c.score), "features": finite_map(c.features),
            "contributions": finite_map(c.contributions), "upstream_latency_ms": finite(c.upstream_latency_ms),
            "tokens": {"prompt": c.prompt_tokens, "completion": c.completion_tokens}, "usage": c.usage,
            "upstream_request_id": c.upstream_request_id, "judge_score": finite(c.judge_score),
            "judge_reason": c.judge_reason}


def _feedback(x: Any) -> dict[str, Any]:
    return {"id": f"fb-{x.id}", "turn_id": x.turn_id, "conversation_id": x.conversation_id,
            "reward": finite(x.reward), "label": x.label, "source": x.source, "comment": x.comment,
            "key_id": x.key_id, "created_at": as_utc(x.created_at)}


# -- stats -----------------------------------------------------------------------------------------
def _zero() -> dict[str, Any]:
    return {"turns": 0, "by_decision": {}, "intervened_turns": 0, "intervention_rounds": 0, "candidates": 0,
            "candidates_saved": 0, "tokens": {"prompt": 0, "completion": 0},
            "feedback": {"turns_with_feedback": 0, "rewards": 0, "mean_reward": None, "positive_share": None}}


async def stats(engine: AsyncEngine, route: str | None, since: datetime,
                until: datetime | None = None) -> dict[str, Any]:
    """Totals over the turns created in [since, until), and per route when no route is given.

    Feedback counts the rows given on these turns (conversation-wide feedback has no turn to count
    against); `positive_share` is the share of their rewards >= 0.5."""
    conds = _where(TurnFilter(route=route, since=since, until=until))
    decisions = (select(Turn.route, Turn.decision, func.count(),
                        func.sum(case((Turn.rounds > 1, 1), else_=0)),
                        func.sum(case((Turn.rounds > 1, Turn.rounds - 1), else_=0)),
                        func.sum(Turn.candidates_saved), func.sum(Turn.prompt_tokens), func.sum(Turn.completion_tokens))
                 .where(*conds).group_by(Turn.route, Turn.decision))
    sampled = (select(Turn.route, func.count()).join(Candidate, Candidate.turn_id == Turn.id)
               .where(*conds).group_by(Turn.route))
    feedback = (select(Turn.route, func.count(func.distinct(Feedback.turn_id)), func.count(Feedback.reward),
                       func.sum(Feedback.reward), func.sum(case((Feedback.reward >= 0.5, 1), else_=0)))
                .join(Turn, Turn.id == Feedback.turn_id).where(*conds).group_by(Turn.route))
    async with engine.connect() as conn:
        by_decision = (await conn.execute(decisions)).all()
        by_sampled = (await conn.execute(sampled)).all()
        by_feedback = (await conn.execute(feedback)).all()
    routes: dict[str, dict[str, Any]] = {}
    total = _zero()
    for r, decision, n, intervened, extra_rounds, saved, prompt, completion in by_decision:
        for block in (total, routes.setdefault(r, _zero())):
            block["turns"] += n
            block["by_decision"][decision] = block["by_decision"].get(decision, 0) + n
            block["intervened_turns"] += int(intervened or 0)
            block["intervention_rounds"] += int(extra_rounds or 0)
            block["candidates_saved"] += int(saved or 0)
            block["tokens"]["prompt"] += int(prompt or 0)
            block["tokens"]["completion"] += int(completion or 0)
    for r, n in by_sampled:
        for block in (total, routes.setdefault(r, _zero())):
            block["candidates"] += n
    reward_sums: dict[int, tuple[float, int]] = {}  # id(block) -> (sum of rewards, rewards >= 0.5)
    for r, turns, rewards, reward_sum, positive in by_feedback:
        for block in (total, routes.setdefault(r, _zero())):
            fb = block["feedback"]
            fb["turns_with_feedback"] += turns
            fb["rewards"] += rewards
            got, pos = reward_sums.get(id(block), (0.0, 0))
            reward_sums[id(block)] = (got + float(reward_sum or 0), pos + int(positive or 0))
    for block in (total, *routes.values()):
        fb = block["feedback"]
        if fb["rewards"]:
            got, pos = reward_sums[id(block)]
            fb["mean_reward"], fb["positive_share"] = got / fb["rewards"], pos / fb["rewards"]
    return {"since": since, "until": until, "route": route, "total": total,
            "by_route": None if route is not None else dict(sorted(routes.items()))}


# -- previews --------------------------------------------------------------------------------------
def preview(text: str | None, limit: int = PREVIEW_CHARS) -> str | None:
    if text is None:
        return None
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def message_text(message: Any) -> str | None:
    """A message as one line of text: its content's text parts, then its tool calls as name(arguments)."""
    if not isinstance(message, dict):
        return None
    parts: list[str] = []
    content = message.get("content")
    if isinstance(content, str):
        parts.append(content)
    elif isinstance(content, list):
        parts += [p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)]
    for call in message.get("tool_calls") or []:
        fn = call.get("function") if isinstance(call, dict) else None
        if isinstance(fn, dict):
            args = fn.get("arguments")
            parts.append(f"{fn.get('name')}({args if isinstance(args, str) else json.dumps(args)})")
    return " ".join(parts) if parts else None


def finite(x: float | None) -> float | None:
    """JSON has no NaN or infinity; a stored one is shown as null rather than failing the reply."""
    return x if x is None or math.isfinite(x) else None


def finite_map(d: dict[str, Any] | None) -> dict[str, float | None] | None:
    if not isinstance(d, dict):
        return None
    return {str(k): _number(v) for k, v in d.items()}


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    try:
        return finite(float(v))
    except OverflowError:  # an int too large for a float
        return None
