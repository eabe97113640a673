"""Candidate groups for the feature head: every labelled source as the gate would see it.

- Tool-call sets (the format of shared/data/tool-calls, and logged turns exported from the store):
  a question with many replies, each labelled valid or not. The gate sees N samples of one turn,
  so each question gives ``draws`` groups of N replies drawn at random (N cycling through
  ``sizes``); the first of a draw plays the actor's first sample (what passthrough returns).
- Ranking sets (best-of-n): all answers of a prompt, labelled by win probability; text kind.
- Trajectories: each turn making a write call where the task has gold actions, alone (one
  candidate, labelled by the gold match): what one reply looks like in an agent conversation.

Every group carries its split key (question text, prompt, task), so that folds and the held-out
split never put one question on both sides. The encoder's logit for each candidate is computed
once (``EncoderCache``) and reused by every draw that contains it.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from critic_models import data
from critic_models.head_fit import FeatureGroup
from service.critic import features
from service.gate.actions import gold_of, matches_gold, write_calls

Message = dict[str, Any]
# N of the drawn groups, cycled: 4 most often, as the gate's default; 1 as adaptive sampling's first look
DEFAULT_SIZES = (4, 2, 8, 4, 3, 6, 1)


@dataclass
class Item:
    """One context with candidates and labels, before sampling and featurising."""

    key: str
    source: str
    kind: str
    messages: list[Message]
    tools: list[dict[str, Any]] | None
    candidates: list[Message]
    labels: list[float | None]
    category: str | None = None
    sample: bool = False  # draw groups of N from the candidates (tool-call sets)
    pointwise: bool = True  # labels are probabilities of being right (not only a ranking)
    logits: list[float] = field(default_factory=list)  # the encoder's, filled by EncoderCache


def is_tool_call_set(row: dict[str, Any]) -> bool:
    return "candidates" in row and "messages" in row and "instruction" not in row


def _question_key(source: str, row: dict[str, Any]) -> str:
    # BFCL reuses question texts across categories: one text, one side of the split
    text = json.dumps(row.get("messages"), sort_keys=True)
    return f"{source}:" + hashlib.sha256(text.encode()).hexdigest()[:16]


def tool_call_item(row: dict[str, Any], source: str) -> Item:
    labels = [None if c.get("valid") is None else float(bool(c["valid"])) for c in row["candidates"]]
    cands = [c["message"] for c in row["candidates"]]
    return Item(_question_key(source, row), source, features.kind_of(row["messages"], cands, row.get("tools")),
                row["messages"],
                row.get("tools"), cands, labels, row.get("category"), sample=True)


def exported_items(row: dict[str, Any], source: str) -> list[Item]:
    """A logged conversation (`turngate export`): each turn's candidates as one group, its context
    the line's messages before the turn's assistant message. A vetoed candidate is labelled
    invalid; the chosen one carries the conversation's outcome where feedback gave one."""
    out = []
    reward = row.get("reward")
    messages = row.get("messages") or []
    starts = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
    tools = row.get("tools")
    for t in row.get("turns") or []:
        cands = t.get("candidates") or []
        k = t.get("index") or 0
        if len(cands) < 2 or k >= len(starts):
            continue
        labels: list[float | None] = []
        for c in cands:
            if c.get("verdict") == "veto":
                labels.append(0.0)
            elif c.get("index") == t.get("chosen_index") and reward is not None:
                labels.append(float(reward))
            else:
                labels.append(None)
        context, replies = messages[:starts[k]], [c["message"] for c in cands]
        out.append(Item(f"{source}:{row.get('id')}", source, features.kind_of(context, replies, tools),
                        context, tools, replies, labels, "logged"))
    return out


def trajectory_items(row: dict[str, Any], source: str) -> list[Item]:
    """Each turn that makes write calls, alone, where the task has gold actions."""
    gold = gold_of(row)
    if not gold:
        return []
    msgs, out = row["messages"], []
    for i, m in enumerate(msgs):
        writes = write_calls(m) if m.get("role") == "assistant" else []
        if writes:
            match = all(matches_gold(c, gold) for c in writes)
            out.append(Item(_task_key(source, row), source, features.kind_of(msgs[:i], [m], row.get("tools")),
                            msgs[:i], row.get("tools"), [m],
                            [float(match)], "write"))
    return out


def sibling_items(rows: list[dict[str, Any]], source: str) -> list[Item]:
    """Where a task has several trials (τ-bench airline has 4): each write turn with, as the other
    candidates, each other trial's call of the same write tool: the very same call where that
    trial made it, else its first call of the tool. That stands for what the gate sees when it
    samples N replies at that turn: the same actor on the same task, other samples.
    Every candidate is labelled by the task's gold actions; the turn itself is candidate 0."""
    by_task: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        if gold_of(row):
            by_task.setdefault(_task_key(source, row), []).append(row)
    out = []
    for key, trials in by_task.items():
        if len(trials) < 2:
            continue
        for row in trials:
            gold, msgs = gold_of(row), row["messages"]
            for i, m in enumerate(msgs):
                writes = write_calls(m) if m.get("role") == "assistant" else []
                if not writes:
                    continue
                names = {(c.get("function") or {}).get("name") for c in writes}
                others = [_nearest_write(o, m, names) for o in trials if o is not row]
                cands = [m] + [o for o in others if o is not None]
                if len(cands) < 2:
                    continue
                labels: list[float | None] = [float(all(matches_gold(c, gold) for c in write_calls(x)))
                                              for x in cands]
                out.append(Item(key, source, features.kind_of(msgs[:i], cands, row.get("tools")), msgs[:i],
                                row.get("tools"), cands, labels, "write-siblings"))
    return out


def _nearest_write(row: dict[str, Any], like: Message, names: set) -> Message | None:
    same = [m for m in row["messages"] if m.get("role") == "assistant" and any(
        (c.get("function") or {}).get("name") in names for c in write_calls(m))]
    want = features.signature(features.parse_calls(like))
    return next((m for m in same if features.signature(features.parse_calls(m)) == want), same[0] if same else None)


def _task_key(source: str, row: dict[str, Any]) -> str:
    return f"{source}:{row.get('task_id', row['id'])}"


def ranking_item(row: dict[str, Any], source: str) -> Item:
    return Item(f"{source}:{row['id']}", source, "text", [{"role": "user", "content": row["instruction"]}], None,
                [{"role": "assistant", "content": c["text"]} for c in row["candidates"]],
                [float(c["win_prob_vs_reference"]) for c in row["candidates"]], "ranking", pointwise=False)


def load_items(paths: list[Path]) -> list[Item]:
    items: list[Item] = []
    for f in data.data_files(paths):
        trajectories = []
        for line in f.open():
            if not line.strip():
                continue
            row = json.loads(line)
            if data.is_ranking_set(row):
                items.append(ranking_item(row, f.name))
            elif "turns" in row:
                items += exported_items(row, f.name)
            elif is_tool_call_set(row):
                items.append(tool_call_item(row, f.name))
            else:
                items += trajectory_items(row, f.name)
                trajectories.append(row)
        items += sibling_items(trajectories, f.name)
    return items


def split(items: list[Item], seed: int, val_fraction: float) -> tuple[list[Item], list[Item]]:
    """(train, held-out) by key, per source file, as critic_models.data splits its groups."""
    held: set[str] = set()
    for source in sorted({i.source for i in items}):
        held |= data.split_keys([i.key for i in items if i.source == source], seed, val_fraction)
    return [i for i in items if i.key not in held], [i for i in items if i.key in held]


Scorer = Callable[[list[tuple[list[Message], list[Message], list[dict[str, Any]] | None]]], list[np.ndarray]]


def fill_logits(items: list[Item], scorer: Scorer | None, cache: dict[str, float] | None = None) -> None:
    """The encoder's logit for every candidate: one pass over the distinct candidates of each item
    (function-calling models often reply identically), 0 without an encoder. ``cache`` (context
    and candidate digest -> logit, for one encoder) is read and filled, so that a rerun with other
    features or head settings skips the encoder pass."""
    if scorer is None:
        for it in items:
            it.logits = [0.0] * len(it.candidates)
        return
    cache = {} if cache is None else cache
    keys = [[_digest(it, c) for c in it.candidates] for it in items]
    todo = []
    for it, ks in zip(items, keys):
        missing = list({k: i for i, k in reversed(list(enumerate(ks))) if k not in cache}.values())
        if missing:
            todo.append((it, ks, missing))
    probs = scorer([(it.messages, [it.candidates[i] for i in f], it.tools) for it, _, f in todo])
    for (_, ks, f), p in zip(todo, probs):
        p = np.clip(np.asarray(p, dtype=np.float64), 1e-7, 1 - 1e-7)
        cache.update({ks[i]: float(x) for i, x in zip(f, np.log(p / (1 - p)))})
    for it, ks in zip(items, keys):
        it.logits = [cache[k] for k in ks]


def _digest(it: Item, candidate: Message) -> str:
    text = json.dumps([it.messages, it.tools, candidate], sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def groups(items: list[Item], draws: int, seed: int, sizes: tuple[int, ...] = DEFAULT_SIZES
           ) -> list[FeatureGroup]:
    """Featurised groups; tool-call sets give ``draws`` sampled groups each."""
    rng = random.Random(seed)
    out = []
    for it in items:
        picks = [list(range(len(it.candidates)))]
        if it.sample:
            picks = []
            for d in range(draws):
                k = min(sizes[d % len(sizes)], len(it.candidates))
                picks.append(rng.sample(range(len(it.candidates)), k))
        for d, idx in enumerate(picks):
            turn = features.compute(it.messages, [it.candidates[i] for i in idx], it.tools,
                                    [it.logits[i] for i in idx])
            labels = np.array([math.nan if it.labels[i] is None else it.labels[i] for i in idx])
            lengths = np.array([_chars(it.candidates[i]) for i in idx], dtype=np.float64)
            out.append(FeatureGroup(it.key, it.source, turn.kind, np.asarray(turn.rows, dtype=np.float64),
                                    labels, it.category, d, lengths, it.pointwise,
                                    [it.candidates[i] for i in idx]))
    return out


def _chars(message: Message) -> int:
    """A reply's length: its text, or its calls as sent."""
    calls = message.get("tool_calls")
    if calls:
        return len(json.dumps(calls, separators=(",", ":")))
    return len(features.content_text(message))
