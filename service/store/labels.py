"""Candidate labels in the store (`candidate_labels`): what the offline labeller reads and writes, and
the labelled candidate groups training and promotion read.

Labellers: "judge:<model>@<rubric_version>" (a teacher judge, `turngate critic label`), "veto" (the
gate's structural veto: score 0) and "outcome" (the chosen candidate of a turn or conversation that
feedback gave a reward: score = the reward). One row per (turn, candidate, labeller): writing a label
twice is a no-op, so an interrupted job reruns safely; an outcome follows the latest reward.

Reads are whole lists, not streams: this is the offline side, and a labelled slice is read once per
training run.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, and_, exists, func, or_, select
from sqlalchemy.dialects import postgresql, sqlite

from service.store.models import Candidate, CandidateLabel, Feedback, Turn
from service.store.writer import utc

VETO, OUTCOME, JUDGE_PREFIX = "veto", "outcome", "judge:"
CHUNK = 500  # rows per INSERT


def judge_labeler(model: str, rubric_version: str) -> str:
    return f"{JUDGE_PREFIX}{model}@{rubric_version}"[:200]


@dataclass
class LoggedTurn:
    """A logged turn with two or more candidates: what a judge sees, and what training groups."""

    turn_id: str
    conversation_id: str
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None
    indices: list[int]  # the candidates' idx, in order
    candidates: list[dict[str, Any]]  # their messages
    chosen_index: int | None = None
    labels: list[dict[str, float]] = field(default_factory=list)  # per candidate: labeller -> score


@dataclass(frozen=True)
class Window:
    """Which logged turns: created in [since, until), on one route alias or all."""

    since: datetime | None = None
    until: datetime | None = None
    route: str | None = None

    def where(self) -> list[Any]:
        cond: list[Any] = []
        if self.since is not None:
            cond.append(Turn.created_at >= self.since)
        if self.until is not None:
            cond.append(Turn.created_at < self.until)
        if self.route:
            cond.append(Turn.route == self.route)
        return cond


def _groups_of_two_or_more():
    return (select(Candidate.turn_id).group_by(Candidate.turn_id).having(func.count() >= 2)).scalar_subquery()


def _load(conn, turn_ids: Sequence[str]) -> list[LoggedTurn]:
    if not turn_ids:
        return []
    rows = conn.execute(select(Turn.id, Turn.conversation_id, Turn.request_messages, Turn.tools, Turn.chosen_index)
                        .where(Turn.id.in_(turn_ids))).all()
    by_id = {r.id: LoggedTurn(r.id, r.conversation_id, list(r.request_messages or []), r.tools, [], [],
                              r.chosen_index) for r in rows}
    for c in conn.execute(select(Candidate.turn_id, Candidate.idx, Candidate.message)
                          .where(Candidate.turn_id.in_(turn_ids)).order_by(Candidate.turn_id, Candidate.idx)):
        t = by_id[c.turn_id]
        t.indices.append(c.idx)
        t.candidates.append(c.message)
    return [by_id[t] for t in turn_ids if t in by_id]


def pending_turns(engine: Engine, labeler: str, window: Window, limit: int | None = None) -> list[LoggedTurn]:
    """Turns of the window with 2+ candidates that `labeler` has not labelled yet, oldest first."""
    done = exists().where(CandidateLabel.turn_id == Turn.id, CandidateLabel.labeler == labeler)
    q = (select(Turn.id).where(Turn.id.in_(_groups_of_two_or_more()), ~done, *window.where())
         .order_by(Turn.created_at, Turn.id))
    if limit:
        q = q.limit(limit)
    with engine.connect() as conn:
        ids = list(conn.execute(q).scalars())
        out: list[LoggedTurn] = []
        for i in range(0, len(ids), CHUNK):
            out += _load(conn, ids[i:i + CHUNK])
        return out


def _insert(conn, table):
    return (postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert)(table)


def write_labels(engine: Engine, rows: Iterable[dict[str, Any]], *, replace: bool = False) -> int:
    """Inserts label rows (turn_id, candidate_idx, labeler, score, reason); an existing label is kept,
    or, with `replace`, takes the new score and reason. Returns the rows sent."""
    rows = [{**r, "score": min(1.0, max(0.0, float(r["score"]))), "created_at": r.get("created_at") or utc(time.time())}
            for r in rows]
    with engine.begin() as conn:
        for i in range(0, len(rows), CHUNK):
            stmt = _insert(conn, CandidateLabel)
            keys = ["turn_id", "candidate_idx", "labeler"]
            stmt = (stmt.on_conflict_do_update(index_elements=keys, set_={"score": stmt.excluded.score,
                                                                          "reason": stmt.excluded.reason})
                    if replace else stmt.on_conflict_do_nothing(index_elements=keys))
            conn.execute(stmt, rows[i:i + CHUNK])
    return len(rows)


def structural_labels(engine: Engine, window: Window) -> dict[str, int]:
    """Vetoed candidates as "veto" labels (score 0), and each rewarded turn's chosen candidate as an
    "outcome" label (a turn's own reward, else its conversation's; the latest wins)."""
    with engine.connect() as conn:
        vetoes = [{"turn_id": r.turn_id, "candidate_idx": r.idx, "labeler": VETO, "score": 0.0,
                   "reason": ":".join(x for x in (r.veto_reason, r.veto_detail) if x)[:1000] or None}
                  for r in conn.execute(select(Candidate.turn_id, Candidate.idx, Candidate.veto_reason,
                                               Candidate.veto_detail).join(Turn, Turn.id == Candidate.turn_id)
                                        .where(Candidate.verdict == "veto", *window.where()))]
        turns = conn.execute(select(Turn.id, Turn.conversation_id, Turn.chosen_index)
                             .where(Turn.chosen_index.is_not(None), *window.where())).all()
        rewards: dict[str, float] = {}
        by_conversation: dict[str, float] = {}
        turn_ids = {t.id for t in turns}
        conv_ids = {t.conversation_id for t in turns}
        fb = select(Feedback.turn_id, Feedback.conversation_id, Feedback.reward).where(
            Feedback.reward.is_not(None)).order_by(Feedback.created_at, Feedback.id)
        for f in conn.execute(fb):
            if f.turn_id and f.turn_id in turn_ids:
                rewards[f.turn_id] = f.reward  # ordered by time: the latest wins
            elif not f.turn_id and f.conversation_id in conv_ids:
                by_conversation[f.conversation_id] = f.reward
    outcomes = []
    for t in turns:
        reward = rewards.get(t.id, by_conversation.get(t.conversation_id))
        if reward is not None:
            outcomes.append({"turn_id": t.id, "candidate_idx": t.chosen_index, "labeler": OUTCOME,
                             "score": reward, "reason": None})
    write_labels(engine, vetoes)
    write_labels(engine, outcomes, replace=True)
    return {"veto": len(vetoes), "outcome": len(outcomes)}


def labelled_turns(engine: Engine, window: Window, labelers: Sequence[str] = ()) -> list[LoggedTurn]:
    """Turns of the window with 2+ candidates and at least one label (from a labeller whose name starts
    with one of `labelers`, when given), each candidate's labels attached."""
    cond = [CandidateLabel.turn_id == Turn.id]
    if labelers:
        cond.append(or_(*[CandidateLabel.labeler.startswith(p, autoescape=True) for p in labelers]))
    q = (select(Turn.id).where(Turn.id.in_(_groups_of_two_or_more()), exists().where(and_(*cond)), *window.where())
         .order_by(Turn.created_at, Turn.id))
    with engine.connect() as conn:
        ids = list(conn.execute(q).scalars())
        out: list[LoggedTurn] = []
        for i in range(0, len(ids), CHUNK):
            part = _load(conn, ids[i:i + CHUNK])
            found: dict[tuple[str, int], dict[str, float]] = defaultdict(dict)
            lq = select(CandidateLabel.turn_id, CandidateLabel.candidate_idx, CandidateLabel.labeler,
                        CandidateLabel.score).where(CandidateLabel.turn_id.in_([t.turn_id for t in part]))
            for lab in conn.execute(lq):
                if not labelers or any(lab.labeler.startswith(p) for p in labelers):
                    found[(lab.turn_id, lab.candidate_idx)][lab.labeler] = lab.score
            for t in part:
                t.labels = [dict(found.get((t.turn_id, k), {})) for k in t.indices]
            out += part
        return out


def label_of(labels: dict[str, float]) -> float | None:
    """One candidate's training label: a judge's (the mean where several judged it) over a veto over an
    outcome; None: unlabelled."""
    judged = [v for k, v in labels.items() if k.startswith(JUDGE_PREFIX)]
    if judged:
        return sum(judged) / len(judged)
    if VETO in labels:
        return labels[VETO]
    return labels.get(OUTCOME)
