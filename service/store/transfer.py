"""Trajectory JSONL in and out of the store (the format of shared/data/trajectories).

import: one conversation per line, one turn per assistant message (its request = the messages
before it, its one candidate = the message, decision "imported"); the reward becomes a feedback row
with source "import"; every other field (source, task_id, gold_actions, ...) is kept on the
conversation so that export gives it back. Re-importing a file changes nothing (ids are derived).

export: conversations whose last turn falls in [since, until), streamed through a server-side
cursor a partition at a time, so memory stays flat however many turns the store holds. A line's
messages = the last turn's request messages + the reply turngate chose (+ any messages an import
had after the last assistant message); reward/label = the latest feedback on the conversation or
any of its turns; `turns` lists each turn's decision, candidates, scores, the LLM critic's verdicts
and the candidates' training labels (`turngate replay --cascade` reads them).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from typing import IO, Any

from sqlalchemy import or_, select
from sqlalchemy.dialects import postgresql, sqlite

from service.gate.record import CandidateRecord, ConversationHint, TurnRecord
from service.store.boundary import fit_json, fit_row
from service.store.conversations import conversation_id_for_external
from service.store.engine import make_async_engine, make_sync_engine
from service.store.models import Candidate, CandidateLabel, Conversation, Feedback, Turn
from service.store.writer import LinkCache, prepare, utc, write_batch

_OWN = ("id", "messages", "reward")  # fields that live in the store's own columns


def _turn_id(conversation_id: str, k: int) -> str:
    return "turn-" + hashlib.sha256(f"{conversation_id}\x1f{k}".encode()).hexdigest()[:32]


def trajectory_records(traj: dict[str, Any], now: float) -> tuple[str, list[TurnRecord], list[dict]]:
    """(conversation id, one record per assistant message, the messages after the last one)."""
    conv = conversation_id_for_external(str(traj["id"]), None)
    msgs = traj.get("messages") or []
    records: list[TurnRecord] = []
    last = -1
    for i, m in enumerate(msgs):
        if m.get("role") != "assistant":
            continue
        k = len(records)
        records.append(TurnRecord(
            turn_id=_turn_id(conv, k), route="import", mode="import",
            upstream_model=str(traj.get("agent_model") or "")[:200] or None, request_messages=msgs[:i],
            decision="imported", chosen_index=0, candidates=[CandidateRecord(index=0, round=0, message=m)],
            conversation=ConversationHint(header_id=str(traj["id"])), created_at=now + k * 1e-3))
        last = i
    return conv, records, msgs[last + 1:]


def _insert(conn, table):
    return (postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert)(table)


async def import_trajectories(url: str, lines: Iterable[str], chunk: int = 20) -> dict[str, int]:
    engine = make_async_engine(url, command_timeout_s=300)
    cache, counts = LinkCache(), {"conversations": 0, "turns": 0, "rewards": 0}
    try:
        batch: list[dict] = []
        for line in lines:
            if line.strip():
                batch.append(json.loads(line))
            if len(batch) >= chunk:
                await _import_chunk(engine, batch, cache, counts)
                batch = []
        if batch:
            await _import_chunk(engine, batch, cache, counts)
    finally:
        await engine.dispose()
    return counts


async def _import_chunk(engine, trajs: list[dict], cache: LinkCache, counts: dict[str, int]) -> None:
    now = time.time()
    convs, records, rewards = [], [], []
    for traj in trajs:
        conv, recs, tail = trajectory_records(traj, now)
        attrs = {"trajectory": {k: v for k, v in traj.items() if k not in _OWN}, "tail_messages": tail}
        convs.append(fit_row(Conversation.__table__, {
            "id": conv, "first_seen": utc(now), "last_seen": utc(now), "route": "import", "key_id": None,
            "external_id": str(traj["id"]), "attributes": attrs}))
        records.extend(recs)
        if traj.get("reward") is not None:
            rewards.append({"conversation_id": conv, "reward": float(traj["reward"]), "source": "import",
                            "client_id": f"import:{conv}", "created_at": utc(now)})
    prepared = prepare(records, engine.dialect.name == "postgresql")
    async with engine.begin() as conn:
        stmt = _insert(conn, Conversation)
        await conn.execute(stmt.on_conflict_do_update(index_elements=["id"],
                                                      set_={"attributes": stmt.excluded.attributes}), convs)
        if records:
            await write_batch(conn, prepared, cache)
        if rewards:
            await conn.execute(_insert(conn, Feedback).on_conflict_do_nothing(), rewards)
    counts["conversations"] += len(convs)
    counts["turns"] += len(records)
    counts["rewards"] += len(rewards)


# -- export --------------------------------------------------------------------------------------
_TURN_COLS = (Turn.id, Turn.conversation_id, Turn.idx, Turn.route, Turn.mode, Turn.upstream_model,
              Turn.decision, Turn.chosen_index, Turn.critic_name, Turn.critic_version, Turn.rounds,
              Turn.latency_total_ms, Turn.latency_upstream_ms, Turn.latency_critic_ms, Turn.error,
              Turn.feedback_texts, Turn.created_at, Turn.decided_by, Turn.judge_reason, Turn.critics_agreed)


def export_trajectories(url: str, out: IO[str], since: datetime, until: datetime, route: str | None = None,
                        partition: int = 200) -> int:
    """Writes one JSON line per conversation; returns how many."""
    engine = make_sync_engine(url)
    n = 0
    try:
        with engine.connect() as stream, engine.connect() as conn:
            q = select(Conversation).where(Conversation.last_seen >= since, Conversation.last_seen < until)
            if route:
                q = q.where(Conversation.route == route)
            result = stream.execution_options(stream_results=True, yield_per=partition).execute(
                q.order_by(Conversation.id))
            for part in result.partitions():
                for line in _lines(conn, part):
                    # fit_json: rows written before the record boundary may hold lone surrogates.
                    out.write(json.dumps(fit_json(line), ensure_ascii=False) + "\n")
                    n += 1
    finally:
        engine.dispose()
    return n


def _lines(conn, conversations) -> Iterator[dict[str, Any]]:
    ids = [c.id for c in conversations]
    turns: dict[str, list] = defaultdict(list)
    for t in conn.execute(select(*_TURN_COLS).where(Turn.conversation_id.in_(ids))
                          .order_by(Turn.conversation_id, Turn.idx, Turn.created_at)):
        turns[t.conversation_id].append(t)
    last_ids = [ts[-1].id for ts in turns.values()]
    requests, tools = {}, {}
    for tid, msgs, declared in conn.execute(select(Turn.id, Turn.request_messages, Turn.tools)
                                            .where(Turn.id.in_(last_ids))).tuples():
        requests[tid], tools[tid] = msgs, declared
    cands: dict[str, list] = defaultdict(list)
    for c in conn.execute(select(Candidate).join(Turn, Turn.id == Candidate.turn_id)
                          .where(Turn.conversation_id.in_(ids)).order_by(Candidate.turn_id, Candidate.idx)):
        cands[c.turn_id].append(c)
    labels: dict[tuple[str, int], list] = defaultdict(list)
    for lab in conn.execute(select(CandidateLabel.turn_id, CandidateLabel.candidate_idx, CandidateLabel.labeler,
                                   CandidateLabel.score, CandidateLabel.reason)
                            .where(CandidateLabel.turn_id.in_(select(Turn.id).where(Turn.conversation_id.in_(ids))))
                            .order_by(CandidateLabel.turn_id, CandidateLabel.candidate_idx, CandidateLabel.labeler)):
        labels[(lab.turn_id, lab.candidate_idx)].append({"labeler": lab.labeler, "score": lab.score,
                                                         "reason": lab.reason})
    outcome: dict[str, dict] = {}
    turn_conv = {t.id: cid for cid, ts in turns.items() for t in ts}
    fb_q = (select(Feedback).where(or_(Feedback.conversation_id.in_(ids),
                                       Feedback.turn_id.in_(select(Turn.id).where(Turn.conversation_id.in_(ids)))))
            .order_by(Feedback.created_at, Feedback.id))
    for f in conn.execute(fb_q):
        cid = f.conversation_id or turn_conv.get(f.turn_id)
        if cid is None:  # feedback on a turn outside these conversations (the query keeps none such)
            continue
        o = outcome.setdefault(cid, {"reward": None, "label": None})
        if f.reward is not None:
            o["reward"] = f.reward  # ordered by time: the latest wins
        if f.label is not None:
            o["label"] = f.label
    for c in conversations:
        yield _line(c, turns.get(c.id, []), requests, tools, cands, labels, outcome.get(c.id, {}))


def _line(conv, turns: list, requests: dict, tools: dict, cands: dict, labels: dict,
          outcome: dict) -> dict[str, Any]:
    attrs = conv.attributes or {}
    messages: list = []
    if turns:
        last = turns[-1]
        messages = list(requests.get(last.id) or [])
        chosen = next((c for c in cands.get(last.id, []) if c.idx == last.chosen_index), None)
        if chosen is not None:
            messages.append(chosen.message)
    messages.extend(attrs.get("tail_messages") or [])
    line: dict[str, Any] = {
        "id": conv.external_id or conv.id, "source": "turngate", "domain": None,
        "agent_model": turns[-1].upstream_model if turns else None, "task_id": None, "trial": None,
        **(attrs.get("trajectory") or {}),
        "reward": outcome.get("reward"), "label": outcome.get("label"), "messages": messages,
        "conversation_id": conv.id, "route": conv.route,
        "first_seen": _iso(conv.first_seen), "last_seen": _iso(conv.last_seen),
    }
    line.setdefault("gold_actions", [])
    if turns and tools.get(turns[-1].id):
        line["tools"] = tools[turns[-1].id]  # as the last turn declared them: a trainer's candidate groups need them
    line["turns"] = [{
        "turn_id": t.id, "index": t.idx, "route": t.route, "mode": t.mode, "decision": t.decision,
        "chosen_index": t.chosen_index, "critic": {"name": t.critic_name, "version": t.critic_version},
        "rounds": t.rounds, "feedback": t.feedback_texts or [], "error": t.error,
        "latency_ms": {"total": t.latency_total_ms, "upstream": t.latency_upstream_ms,
                       "critic": t.latency_critic_ms},
        "created_at": _iso(t.created_at),
        # which critic chose; where the cascade asked the LLM critic, why and whether it agreed
        "decided_by": t.decided_by, "judge_reason": t.judge_reason, "critics_agreed": t.critics_agreed,
        "candidates": [{"index": c.idx, "round": c.round, "message": c.message, "finish_reason": c.finish_reason,
                        "verdict": c.verdict, "veto_reason": c.veto_reason, "score": c.score,
                        "features": c.features,
                        # where there are any: the upstream's usage, the logprobs a route keeps, the LLM
                        # critic's verdict, and the training labels (teacher judge, veto, outcome)
                        **{k: v for k, v in (("usage", c.usage), ("logprobs", c.logprobs),
                                             ("judge_score", c.judge_score), ("judge_reason", c.judge_reason),
                                             ("labels", labels.get((t.id, c.idx))))
                           if v is not None}}
                       for c in cands.get(t.id, [])],
    } for t in turns]
    return line


def _iso(dt: datetime | None) -> str | None:
    if dt is None:
        return None
    if dt.tzinfo is None:  # SQLite hands back naive datetimes; they are stored as UTC
        dt = dt.replace(tzinfo=UTC)
    return dt.isoformat()
