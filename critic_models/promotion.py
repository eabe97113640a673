"""`turngate critic promote`: is a new bundle at least as good as the active one on logged turns that
its training did not see?

Both bundles score the held-out turns as they would be served (critic_models.evaluate.Bundle: the
encoder, and the feature head where there is one). Against the labels (service.store.labels.label_of):
- pick: over turns with two or more labelled candidates, the mean label of the candidate the bundle
  ranks highest among them (what the gate would return, as far as the labels can tell);
- pairwise: over pairs of labelled candidates of one turn whose labels differ, the share the bundle
  orders as the labels do (a tie counts half).
The new bundle is worse when its pick is lower, or equal with a lower pairwise accuracy.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from critic_models.evaluate import Bundle
from service.store.labels import LoggedTurn, label_of

EPS = 1e-9


@dataclass
class Quality:
    name: str | None
    version: str | None
    turns: int  # turns with two or more labelled candidates
    pairs: int  # pairs of labelled candidates whose labels differ
    pick: float | None  # mean label of the bundle's pick
    pairwise: float | None  # share of the pairs ordered as the labels

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def evaluable(turns: list[LoggedTurn]) -> list[LoggedTurn]:
    """Turns with at least two labelled candidates."""
    return [t for t in turns if sum(label_of(x) is not None for x in t.labels) >= 2]


def quality(bundle: Path, turns: list[LoggedTurn]) -> Quality:
    b = Bundle.load(bundle, ["CPUExecutionProvider"])
    scores = b.score([(t.messages, t.candidates, t.tools) for t in turns]) if turns else []
    picks: list[float] = []
    right = 0.0
    pairs = 0
    for t, s in zip(turns, scores):
        labelled = [(float(sc), y) for sc, lab in zip(np.asarray(s, dtype=np.float64), t.labels)
                    if (y := label_of(lab)) is not None]
        if len(labelled) < 2:
            continue
        picks.append(labelled[int(np.argmax([sc for sc, _ in labelled]))][1])  # ties: the earlier, as the gate
        for i, (si, yi) in enumerate(labelled):
            for sj, yj in labelled[i + 1:]:
                if abs(yi - yj) <= EPS:
                    continue
                pairs += 1
                right += 0.5 if abs(si - sj) <= EPS else float((si > sj) == (yi > yj))
    return Quality(b.card.get("name"), b.card.get("version"), len(picks), pairs,
                   float(np.mean(picks)) if picks else None, right / pairs if pairs else None)


def worse(new: Quality, active: Quality) -> str | None:
    """Why `new` is worse than `active` on the same turns, or None when it is not."""
    if new.pick is None or active.pick is None:
        return None
    if new.pick < active.pick - EPS:
        return f"its pick's mean label is {new.pick:.3f} against the active critic's {active.pick:.3f}"
    if abs(new.pick - active.pick) <= EPS and new.pairwise is not None and active.pairwise is not None \
            and new.pairwise < active.pairwise - EPS:
        return (f"its pick ties the active critic's ({new.pick:.3f}) and its pairwise accuracy is "
                f"{new.pairwise:.3f} against {active.pairwise:.3f}")
    return None


def table(new: Quality, active: Quality) -> str:
    def f(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f}"

    rows = [("", "active", "new"), ("critic", f"{active.name} {active.version}", f"{new.name} {new.version}"),
            ("held-out turns", str(active.turns), str(new.turns)), ("label pairs", str(active.pairs), str(new.pairs)),
            ("pick (mean label)", f(active.pick), f(new.pick)),
            ("pairwise accuracy", f(active.pairwise), f(new.pairwise))]
    width = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join(f"{r[0]:<{width[0]}}  {r[1]:<{width[1]}}  {r[2]}" for r in rows)
