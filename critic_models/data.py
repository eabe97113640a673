"""Training and evaluation examples from trajectory JSONL and best-of-N ranking sets.

Labels (one rule, documented in docs/critic.md):

- Trajectory turns: every assistant turn that answers a user (it has a user message before it)
  gets the conversation's reward (0 or 1), weight ``OUTCOME_WEIGHT``: a failed conversation has
  many fine turns, so this label is noisy. Where the task has gold actions and the turn makes a
  *write* call (the rule of ``service.gate.actions``: any tool not named get_/find_/list_/
  search_/calculate/think/transfer_to_human), the label is sharpened: 1 if every write call of the
  turn matches a gold action by name and arguments, 0 otherwise, weight 1.
- Ranking sets: the instruction is the context, each sampled answer a candidate, the target its
  ``win_prob_vs_reference``; the candidates of one instruction form a group for the pairwise
  (Bradley-Terry) loss, and that is all they teach (pointwise weight ``RANKING_BCE_WEIGHT`` = 0).
  A win probability against one fixed reference answer mostly measures how hard the prompt is,
  so a pointwise loss across prompts taught the head prompt difficulty: prompts that need long
  answers are hard, and the head learned that long answers are bad, the opposite of what holds
  within a prompt (measured with ``turngate critic train --folds 5``, docs/critic.md).

Gold actions: in the tau2 files the row's ``gold_actions`` belong to another task than its
conversation (only ~8% of their argument values occur in the conversation), while
``action_checks`` (each gold action of the conversation's own task and whether the agent made it)
match it (83-93%). ``gold_of`` therefore takes the actions of ``action_checks`` when a row has
them, else ``gold_actions``.

Splits are by task (trajectories: source file + task_id, so all trials of a task fall on one side)
and by prompt (ranking sets), never by row: per file the keys are ordered by a seeded hash and the
first ``val_fraction`` of them are held out. Same seed, same split, on any machine. Cross-validation
deals the same order into ``k`` folds (``fold_of``).
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from service.gate.actions import gold_of, matches_gold, write_calls

OUTCOME_WEIGHT = 0.5
RANKING_BCE_WEIGHT = 0.0  # ranking sets teach through pairs only (see above)
Message = dict[str, Any]


@dataclass
class Example:
    candidate: Message
    target: float  # in [0, 1]
    weight: float
    write: bool = False
    gold_match: bool | None = None  # write turns with gold actions only
    reward: float | None = None  # trajectory turns: the conversation's outcome
    win_prob: float | None = None  # ranking sets


@dataclass
class Group:
    """Candidates for one context; the pairwise loss compares candidates within a group only."""

    key: str  # the split key: task or prompt
    source: str  # file name
    row_id: str
    context: list[Message]
    tools: list[dict] | None
    examples: list[Example] = field(default_factory=list)
    trial: int | None = None


def data_files(paths: list[Path]) -> list[Path]:
    """JSONL files named directly or found under the given folders, sorted."""
    out: list[Path] = []
    for p in map(Path, paths):
        out += sorted(p.rglob("*.jsonl")) if p.is_dir() else [p]
    return sorted(set(out))


def digest(files: list[Path]) -> dict[str, Any]:
    per = {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in files}
    whole = hashlib.sha256("".join(f"{k}:{v}\n" for k, v in sorted(per.items())).encode()).hexdigest()
    return {"sha256": whole, "files": per}


def _rows(path: Path) -> list[dict[str, Any]]:
    with path.open() as fh:
        return [json.loads(line) for line in fh if line.strip()]


def is_ranking_set(row: dict[str, Any]) -> bool:
    return "candidates" in row and "instruction" in row


def _hash_order(keys: list[str], seed: int) -> list[str]:
    return sorted(set(keys), key=lambda k: hashlib.sha256(f"{seed}:{k}".encode()).hexdigest())


def split_keys(keys: list[str], seed: int, val_fraction: float) -> set[str]:
    """The held-out keys: the first val_fraction of the keys ordered by a seeded hash."""
    uniq = _hash_order(keys, seed)
    return set(uniq[: round(len(uniq) * val_fraction)])


def fold_of(groups: list[Group], folds: int, seed: int) -> list[int]:
    """Each group's cross-validation fold: per file, the keys in seeded-hash order dealt into
    ``folds`` contiguous blocks, so all trials of a task / answers of a prompt share a fold."""
    fold: dict[str, int] = {}
    for source in sorted({g.source for g in groups}):
        keys = _hash_order([g.key for g in groups if g.source == source], seed)
        fold.update({k: i * folds // len(keys) for i, k in enumerate(keys)})
    return [fold[g.key] for g in groups]


def turn_groups(row: dict[str, Any], source: str) -> list[Group]:
    """One group per assistant turn that answers a user, labelled by the rule above."""
    msgs, gold = row["messages"], gold_of(row)
    reward = float(row.get("reward") or 0.0)
    out, seen_user = [], False
    for i, m in enumerate(msgs):
        if m.get("role") == "user":
            seen_user = True
        if m.get("role") != "assistant" or not seen_user:
            continue
        writes = write_calls(m)
        match = all(matches_gold(c, gold) for c in writes) if writes and gold else None
        target, weight = (float(match), 1.0) if match is not None else (reward, OUTCOME_WEIGHT)
        ex = Example(m, target, weight, bool(writes), match, reward=reward)
        out.append(Group(f"{source}:{row.get('task_id', row['id'])}", source, row["id"], msgs[:i],
                         row.get("tools"), [ex], row.get("trial")))
    return out


def ranking_group(row: dict[str, Any], source: str) -> Group:
    g = Group(f"{source}:{row['id']}", source, row["id"], [{"role": "user", "content": row["instruction"]}], None)
    for c in row["candidates"]:
        p = float(c["win_prob_vs_reference"])
        g.examples.append(Example({"role": "assistant", "content": c["text"]}, p, RANKING_BCE_WEIGHT, win_prob=p))
    return g


def load_groups(paths: list[Path], seed: int = 0, val_fraction: float = 0.2) -> tuple[list[Group], list[Group]]:
    """(train, validation) groups of every file, split by task / prompt."""
    train: list[Group] = []
    val: list[Group] = []
    for f in data_files(paths):
        rows = _rows(f)
        ranked = [ranking_group(r, f.name) if is_ranking_set(r) else None for r in rows]
        groups = [[g] if g else turn_groups(r, f.name) for g, r in zip(ranked, rows)]
        flat = [g for gs in groups for g in gs]
        held = split_keys([g.key for g in flat], seed, val_fraction)
        for g in flat:
            (val if g.key in held else train).append(g)
    return train, val


def subsample(groups: list[Group], seed: int, turns_per_conversation: int | None,
              candidates_per_prompt: int | None) -> list[Group]:
    """Fewer training rows for a CPU budget: at most ``turns_per_conversation`` turns of each
    conversation (the gold-judged write turns first, they carry the sharp labels), and at most
    ``candidates_per_prompt`` answers per ranking set (the best and the worst kept, the rest drawn)."""
    rng = random.Random(seed)
    by_row: dict[str, list[Group]] = {}
    for g in groups:
        by_row.setdefault(g.row_id, []).append(g)
    out = []
    for gs in by_row.values():
        if len(gs) == 1 and len(gs[0].examples) > 1:
            g = gs[0]
            n = candidates_per_prompt or len(g.examples)
            if n >= len(g.examples):  # all kept, in their order (the first-sample baseline needs it)
                out.append(g)
                continue
            order = sorted(g.examples, key=lambda e: e.target)
            keep = [order[-1], order[0]][:n] + rng.sample(order[1:-1], max(0, min(n - 2, len(order) - 2)))
            out.append(Group(g.key, g.source, g.row_id, g.context, g.tools, keep, g.trial))
            continue
        if turns_per_conversation is None or len(gs) <= turns_per_conversation:
            out += gs
            continue
        sharp = [g for g in gs if g.examples[0].gold_match is not None]
        rest = [g for g in gs if g.examples[0].gold_match is None]
        rng.shuffle(sharp)
        rng.shuffle(rest)
        out += (sharp + rest)[:turns_per_conversation]
    return out
