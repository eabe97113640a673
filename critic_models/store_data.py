"""Logged candidate groups from the store as training items, and the slice of conversations held out.

A logged turn with two or more candidates is one group (critic_models.head_data.Item), each candidate
labelled from `candidate_labels` (a judge's score over a veto over an outcome; none: unlabelled, NaN).
A conversation is held out when a seeded hash of its id falls below the held-out fraction: the rule
depends on the id alone, so every turn of a conversation is on one side, and turns logged after
training fall on the same side as their conversation's first ones. Training never sees the held-out
side; `turngate critic promote` evaluates bundles on it. The bundle records the rule and the
conversations it held out in `held_out.json`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from critic_models.head_data import Item
from service.critic import features
from service.store.labels import LoggedTurn, label_of

SOURCE = "store"
HOLDOUT_FILE = "held_out.json"


@dataclass(frozen=True)
class Holdout:
    fraction: float = 0.2
    seed: int = 0

    def held(self, conversation_id: str) -> bool:
        digest = hashlib.sha256(f"{self.seed}:holdout:{conversation_id}".encode()).hexdigest()
        return int(digest[:12], 16) / 16 ** 12 < self.fraction

    def rule(self) -> dict[str, Any]:
        return {"by": "conversation", "fraction": self.fraction, "seed": self.seed,
                "hash": "sha256('{seed}:holdout:{conversation_id}')[:12] / 16**12 < fraction"}


def item_of(turn: LoggedTurn) -> Item | None:
    """The turn as a training group; None when none of its candidates is labelled."""
    labels = [label_of(x) for x in turn.labels]
    if all(v is None for v in labels):
        return None
    return Item(f"{SOURCE}:{turn.conversation_id}", SOURCE,
                features.kind_of(turn.messages, turn.candidates, turn.tools), turn.messages, turn.tools,
                turn.candidates, labels, "logged")


def split(turns: list[LoggedTurn], holdout: Holdout) -> tuple[list[Item], list[Item], list[str]]:
    """(training items, held-out items, held-out conversation ids)."""
    train: list[Item] = []
    val: list[Item] = []
    held: set[str] = set()
    for t in turns:
        it = item_of(t)
        if it is None:
            continue
        if holdout.held(t.conversation_id):
            val.append(it)
            held.add(t.conversation_id)
        else:
            train.append(it)
    return train, val, sorted(held)


def write_holdout(bundle: Path, holdout: Holdout, held: list[str], info: dict[str, Any]) -> None:
    (bundle / HOLDOUT_FILE).write_text(json.dumps({"rule": holdout.rule(), **info, "conversations": held},
                                                  indent=2) + "\n")


def read_holdout(bundle: Path) -> tuple[Holdout, dict[str, Any]] | None:
    path = bundle / HOLDOUT_FILE
    if not path.is_file():
        return None
    doc = json.loads(path.read_text())
    rule = doc.get("rule") or {}
    return Holdout(float(rule.get("fraction", 0.2)), int(rule.get("seed", 0))), doc
