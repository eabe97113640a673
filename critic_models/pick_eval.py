"""Does rank mode pay? The critic's pick against what is free, with bootstrap intervals.

For each group of candidates (one turn's N samples), every method picks one:
- critic: the highest score (ties to the earlier candidate, as the gate breaks them);
- gate: the structural veto first, then the critic (all vetoed: the first candidate, as the gate);
- first: the actor's first sample, what passthrough returns;
- majority: tool calls: the call most candidates make exactly (ties to the first); text: the
  answer closest to the others (highest mean word overlap);
- longest: the longest reply; random: the mean label of the group; oracle: the best label.

Figures per dataset: the mean label of each pick (tool-call sets: the share of valid picks;
ranking sets: the mean win probability), the benefit rate (first wrong, pick right), the harm
rate (first right, pick wrong) and their ratio, for the critic and the gate. Single-candidate
groups (write calls in agent conversations) give an AUC per source instead. Intervals: 95%,
percentile bootstrap over the split keys (questions, prompts, tasks), never over rows, since the
draws of one question are not independent.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from critic_models import evaluate
from critic_models.head_fit import FeatureGroup
from service.critic.features import FEATURES_BY_KIND, TEXT_FEATURES, TOOL_FEATURES

METHODS = ("critic", "gate", "first", "majority", "longest", "random", "oracle")
_TOOL = {n: i for i, n in enumerate(TOOL_FEATURES)}
_TEXT = {n: i for i, n in enumerate(TEXT_FEATURES)}


@dataclass
class Scored:
    group: FeatureGroup
    scores: np.ndarray  # the critic's, one per candidate
    lengths: np.ndarray  # characters of each reply, for the longest-answer baseline


def picks(s: Scored) -> dict[str, float]:
    """Each method's pick value (the label of the candidate it picks; random: the mean)."""
    g, y = s.group, s.group.labels
    critic = int(np.argmax(s.scores))
    if g.kind != "text":
        ok = g.rows[:, _TOOL["schema_ok"]] > 0.5
        gate = int(np.argmax(np.where(ok, s.scores, -np.inf))) if ok.any() else 0
        majority = int(np.argmax(g.rows[:, _TOOL["call_support"]]))
    else:
        gate = critic
        majority = int(np.argmax(g.rows[:, _TEXT["consensus"]]))
    return {"critic": y[critic], "gate": y[gate], "first": y[0], "majority": y[majority],
            "longest": y[int(np.argmax(s.lengths))], "random": float(np.mean(y)), "oracle": float(np.max(y))}


def _interval(values: np.ndarray, keys: np.ndarray, boots: int, rng: np.random.Generator) -> list[float]:
    uniq, inverse = np.unique(keys, return_inverse=True)
    sums = np.bincount(inverse, weights=values, minlength=len(uniq))
    counts = np.bincount(inverse, minlength=len(uniq))
    draws = rng.integers(0, len(uniq), size=(boots, len(uniq)))
    means = sums[draws].sum(axis=1) / np.maximum(counts[draws].sum(axis=1), 1)
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def _stat(values: np.ndarray, keys: np.ndarray, boots: int, rng: np.random.Generator) -> dict[str, Any]:
    return {"mean": float(values.mean()), "ci95": _interval(values, keys, boots, rng)}


def set_figures(scored: list[Scored], boots: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Pick figures of groups with at least two labelled candidates."""
    rng = np.random.default_rng(seed)
    rows = [picks(s) for s in scored]
    keys = np.array([s.group.key for s in scored])
    out: dict[str, Any] = {"groups": len(rows), "keys": len(set(keys.tolist())),
                           "candidates_per_group": float(np.mean([len(s.scores) for s in scored]))}
    for m in METHODS:
        out[m] = _stat(np.array([r[m] for r in rows]), keys, boots, rng)
    binary = all(set(np.unique(s.group.labels)) <= {0.0, 1.0} for s in scored)
    if binary:
        for m in ("critic", "gate", "majority"):
            benefit = np.array([(r["first"] < 0.5) & (r[m] >= 0.5) for r in rows], dtype=float)
            harm = np.array([(r["first"] >= 0.5) & (r[m] < 0.5) for r in rows], dtype=float)
            out[f"{m}_vs_first"] = {"benefit": _stat(benefit, keys, boots, rng), "harm": _stat(harm, keys, boots, rng),
                                    "ratio": float(benefit.sum() / harm.sum()) if harm.sum() else None}
    return out


def auc_figures(scored: list[Scored], boots: int = 1000, seed: int = 0) -> dict[str, Any]:
    """AUC of the first candidate's score against its label, per source, with intervals: single
    replies, or a write turn scored among its siblings (candidate 0 is the turn itself)."""
    rng = np.random.default_rng(seed)
    out: dict[str, Any] = {}
    for source in sorted({s.group.source for s in scored}):
        sub = [s for s in scored if s.group.source == source]
        score = np.array([float(s.scores[0]) for s in sub])
        label = np.array([bool(s.group.labels[0] >= 0.5) for s in sub])
        keys = np.array([s.group.key for s in sub])
        uniq = np.unique(keys)
        boot = []
        for _ in range(boots):
            take = np.concatenate([np.flatnonzero(keys == k) for k in rng.choice(uniq, len(uniq))])
            a = evaluate.auc(score[take].tolist(), label[take].tolist())
            if a is not None:
                boot.append(a)
        names = FEATURES_BY_KIND[sub[0].group.kind]
        same = [s.group.rows.shape[1] == len(names) for s in sub]  # tool and agent share the features
        by_feature = {n: evaluate.auc([float(s.group.rows[0, j]) for s, k in zip(sub, same) if k],
                                      [y for y, k in zip(label.tolist(), same) if k])
                      for j, n in enumerate(names)}
        out[source] = {"turns": len(sub), "tasks": len(uniq), "positives": int(label.sum()),
                       "feature_auc": by_feature,  # each feature alone, as a ranker (0.5: none)
                       "auc": evaluate.auc(score.tolist(), label.tolist()),
                       "ci95": [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))] if boot else None}
    return out


def figures(scored: list[Scored], boots: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Per source file: set figures (groups of 2+), or AUCs (single candidates)."""
    sets = [s for s in scored if len(s.scores) > 1 and not np.isnan(s.group.labels).any()]
    singles = [s for s in scored if len(s.scores) == 1 and not np.isnan(s.group.labels).any()]
    siblings = [s for s in sets if s.group.category == "write-siblings"]
    out: dict[str, Any] = {"sets": {}, "single": auc_figures(singles, boots, seed) if singles else {},
                           "siblings": auc_figures(siblings, boots, seed) if siblings else {}}
    for source in sorted({s.group.source for s in sets}):
        sub = [s for s in sets if s.group.source == source]
        out["sets"][source] = set_figures(sub, boots, seed)
        cats = sorted({s.group.category for s in sub if s.group.category})
        if len(cats) > 1:
            out["sets"][source]["by_category"] = {
                c: {m: v["mean"] for m, v in set_figures([s for s in sub if s.group.category == c], 1, seed).items()
                    if isinstance(v, dict) and "mean" in v} for c in cats}
    return out


def format_table(fig: dict[str, Any]) -> str:
    def ci(v: dict[str, Any]) -> str:
        return f"{v['mean']:.3f} [{v['ci95'][0]:.3f}, {v['ci95'][1]:.3f}]"

    lines = []
    for source, f in fig["sets"].items():
        lines += ["", (f"{source}: {f['groups']} groups of {f['candidates_per_group']:.1f} candidates "
                       f"from {f['keys']} questions/prompts; mean label of the pick, 95% CI")]
        lines += [f"  {m:<9} {ci(f[m])}" for m in METHODS]
        for m in ("critic", "gate", "majority"):
            bh = f.get(f"{m}_vs_first")
            if bh:
                ratio = "-" if bh["ratio"] is None else f"{bh['ratio']:.1f}:1"
                lines.append(f"  {m} vs first: benefit {ci(bh['benefit'])}, harm {ci(bh['harm'])}, ratio {ratio}")
        for cat, v in (f.get("by_category") or {}).items():
            lines.append(f"    {cat:<18} " + " ".join(f"{m} {v[m]:.3f}" for m in ("critic", "gate", "first",
                                                                                   "majority", "oracle")))
    for part, title in (("single", "one reply scored alone (trajectories: write calls against gold actions)"),
                        ("siblings", "write calls among the same turn's calls in the task's other trials")):
        if not fig.get(part):
            continue
        lines += ["", f"{title}: AUC, 95% CI over tasks / questions"]
        for source, f in fig[part].items():
            c = f["ci95"]
            auc_s = "-" if f["auc"] is None else f"{f['auc']:.3f}"
            lines.append(f"  {source:<36} {auc_s} " + (f"[{c[0]:.3f}, {c[1]:.3f}]" if c else "")
                         + f"  ({f['turns']} replies, {f['positives']} right, {f['tasks']} tasks/questions)")
            alone = {n: a for n, a in (f.get("feature_auc") or {}).items() if a is not None and abs(a - 0.5) > 0.02}
            if alone:
                lines.append("    each feature alone: " + ", ".join(f"{n} {a:.2f}" for n, a in alone.items()))
    return "\n".join(lines).lstrip("\n")


def plot(fig: dict[str, Any], path: Path) -> bool:
    """One panel per set source: each method's mean pick with its interval."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    sources = list(fig["sets"])
    if not sources:
        return False
    panels, ax = plt.subplots(1, len(sources), figsize=(4.2 * len(sources), 3.6), squeeze=False)
    for a, source in zip(ax[0], sources):
        f = fig["sets"][source]
        means = [f[m]["mean"] for m in METHODS]
        err = np.array([[f[m]["mean"] - f[m]["ci95"][0], f[m]["ci95"][1] - f[m]["mean"]] for m in METHODS]).T
        a.bar(METHODS, means, yerr=err, capsize=3, color=["C3", "C1"] + ["C0"] * (len(METHODS) - 2))
        a.set_title(source, fontsize=9)
        a.tick_params(axis="x", rotation=45, labelsize=8)
        a.set_ylabel("mean label of the pick")
    panels.tight_layout()
    panels.savefig(path, dpi=110)
    plt.close(panels)
    return True


def write(fig: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "picks.json").write_text(json.dumps(fig, indent=2) + "\n")
    plot(fig, out / "picks.png")
