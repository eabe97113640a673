"""Evaluate a critic bundle with onnxruntime directly, on the held-out split of the data.

Figures (each on the validation tasks / prompts of the split recorded in the bundle, unless
``split="all"``):

- turn AUC: every assistant turn's score against its conversation's outcome;
- write AUC: turns making write calls, where gold actions exist, against "all calls match gold";
- best-of-k: among the trials of one task (tau-bench airline has 4), the trial whose lowest turn
  score is highest, vs a random trial (mean reward) and the oracle (best reward); also up to
  ties: trials within ``TIE_MARGIN`` logits of the top count as one pick among them (their mean
  reward), so that int8 noise, which differs between CPUs, cannot decide the figure;
- ranking sets: mean win probability of the critic's pick vs random pick, first sample, longest
  answer and best possible;
- calibration: predicted score vs observed good-turn rate (the training label: gold match where
  judged, else outcome), in ten bins, also drawn as a PNG.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import tokenizers

from critic_models import data, head_data, head_fit, pick_eval
from service.critic import features, render
from service.critic.bundle import read_bundle
from service.critic.head import Head, sigmoid
from service.critic.onnx_critic import cores, cpu_description, session_options


@dataclass
class Bundle:
    """A bundle as it is served: the encoder's ONNX session, and the feature head where it has one."""

    path: Path
    card: dict[str, Any]
    tokenizer: tokenizers.Tokenizer
    session: ort.InferenceSession
    head: Head | None = None

    @classmethod
    def load(cls, path: Path, providers: list[str] | None = None) -> Bundle:
        path = Path(path)
        card = json.loads((path / "critic.json").read_text())
        if card.get("format") != render.FORMAT_VERSION:
            raise ValueError(f"{path}: input format {card.get('format')}, this code renders {render.FORMAT_VERSION}")
        avail = ort.get_available_providers()
        providers = [p for p in (providers or ("CUDAExecutionProvider", "CPUExecutionProvider")) if p in avail]
        # The service's options: no spinning threads, which on a busy machine cost many times the work.
        sess = ort.InferenceSession(str(path / "model.onnx"), session_options(cores()), providers=providers)
        head = read_bundle(path).head if card.get("bundle_format", 1) != 1 else None
        return cls(path, card, tokenizers.Tokenizer.from_file(str(path / "tokenizer.json")), sess, head)

    def score(self, items: list[tuple[list, list, list | None]], max_batch: int = 32) -> list[np.ndarray]:
        """The served scores in [0, 1] per item (context, candidates, tools): the encoder's, combined
        with the turn features by the head where the bundle has one."""
        probs = self.encoder_scores(items, max_batch)
        if self.head is None:
            return probs
        out = []
        for (messages, candidates, tools), p in zip(items, probs):
            p = np.clip(np.asarray(p, dtype=np.float64), 1e-7, 1 - 1e-7)
            turn = features.compute(messages, candidates, tools, list(np.log(p / (1 - p))))
            out.append(np.asarray(self.head.apply(turn)[0]))
        return out

    def encoder_scores(self, items: list[tuple[list, list, list | None]], max_batch: int = 32) -> list[np.ndarray]:
        """The encoder's scores in [0, 1] per item; items batched together."""
        feeds = [render.encode_batch(self.tokenizer, m, c, t, self.card["max_length"]) for m, c, t in items]
        out: list[np.ndarray] = []
        i = 0
        while i < len(feeds):
            chunk: list[dict[str, np.ndarray]] = []
            n = 0
            while i < len(feeds) and (not chunk or n + len(feeds[i]["input_ids"]) <= max_batch):
                chunk.append(feeds[i])
                n += len(feeds[i]["input_ids"])
                i += 1
            width = max(f["input_ids"].shape[1] for f in chunk)
            feed = {k: np.concatenate([np.pad(f[k], ((0, 0), (0, width - f[k].shape[1]))) for f in chunk])
                    for k in ("input_ids", "attention_mask", "token_type_ids")}
            logits = np.asarray(self.session.run(["logits"], feed)[0], dtype=np.float64).reshape(-1)
            scores = 1.0 / (1.0 + np.exp(-logits))
            at = 0
            for f in chunk:
                out.append(scores[at: at + len(f["input_ids"])])
                at += len(f["input_ids"])
        return out


def auc(scores: list[float], labels: list[bool]) -> float | None:
    """Area under the ROC curve (Mann-Whitney U, ties counted half)."""
    s, y = np.asarray(scores, dtype=float), np.asarray(labels, dtype=bool)
    pos, neg = int(y.sum()), int((~y).sum())
    if not pos or not neg:
        return None
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s))
    sorted_s = s[order]
    i = 0
    while i < len(s):
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i: j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[y].sum() - pos * (pos + 1) / 2) / (pos * neg))


def calibration(scores: list[float], labels: list[bool], bins: int = 10) -> list[dict[str, Any]]:
    s, y = np.asarray(scores), np.asarray(labels, dtype=float)
    idx = np.minimum((s * bins).astype(int), bins - 1)
    return [{"bin": [b / bins, (b + 1) / bins], "n": int((idx == b).sum()),
             "mean_score": float(s[idx == b].mean()) if (idx == b).any() else None,
             "good_rate": float(y[idx == b].mean()) if (idx == b).any() else None} for b in range(bins)]


def threshold_hints(scores: list[float], labels: list[bool]) -> dict[str, Any]:
    """accept: the lowest score above which at least 90% of turns are good (None when no cut
    reaches it); intervene: the cut that best separates bad from good turns (Youden's J) among
    those not above accept, since the gate refuses an intervene threshold above the accept one."""
    s, y = np.asarray(scores), np.asarray(labels, dtype=bool)
    if not y.any() or y.all():
        return {"accept_threshold": None, "intervene_threshold": None}
    cuts = np.unique(np.round(s, 3))
    accept = next((float(c) for c in cuts if (s >= c).sum() >= 10 and y[s >= c].mean() >= 0.9), None)
    allowed = cuts if accept is None else cuts[cuts <= accept]
    j = [((s[y] >= c).mean() - (s[~y] >= c).mean(), c) for c in allowed]
    intervene = float(max(j)[1])
    return {"accept_threshold": accept, "intervene_threshold": intervene,
            "note": "from held-out trajectory turns: accept is the lowest score above which >= 90% of "
                    "turns were good; intervene maximises TPR-FPR for bad turns, at most accept"}


def evaluate(bundle: Bundle, paths: list[Path], split: str = "val", seed: int = 0) -> dict[str, Any]:
    sp = bundle.card.get("split") or {"seed": 0, "val_fraction": 0.2}
    train, val = data.load_groups(paths, sp["seed"], sp["val_fraction"])
    groups = {"val": val, "train": train, "all": train + val}[split]
    scores = bundle.score([(g.context, [e.candidate for e in g.examples], g.tools) for g in groups])
    result: dict[str, Any] = {"split": split, "split_rule": sp, "bundle": {k: bundle.card.get(k) for k in (
        "name", "version", "precision", "max_length")}, "provider": bundle.session.get_providers()[0],
        "machine": cpu_description()}
    return {**result, **figures(groups, scores, seed)}


def figures(groups: list[data.Group], scores: list[np.ndarray], seed: int = 0) -> dict[str, Any]:
    """Every figure of the module docstring, from each group's candidate scores in [0, 1]."""
    turns = [(g, e, float(s[0])) for g, s in zip(groups, scores) for e in g.examples if e.reward is not None]
    ranking = [(g, s) for g, s in zip(groups, scores) if g.examples[0].win_prob is not None]
    per_file: dict[str, Any] = {}
    for source in sorted({g.source for g, _, _ in turns}) + ["all"]:
        sub = [(g, e, s) for g, e, s in turns if source in ("all", g.source)]
        judged = [(e, s) for _, e, s in sub if e.gold_match is not None]
        per_file[source] = {
            "turns": len(sub), "conversations": len({g.row_id for g, _, _ in sub}),
            "turn_auc_vs_outcome": auc([s for *_, s in sub], [(e.reward or 0.0) >= 1 for _, e, _ in sub]),
            "write_turns_judged": len(judged),
            "write_auc_vs_gold": auc([s for _, s in judged], [bool(e.gold_match) for e, _ in judged]),
        }
    labels = [e.target >= 0.5 for _, e, _ in turns]
    return {"trajectories": per_file, "best_of_k": best_of_k(turns, seed), "ranking": ranking_figures(ranking, seed),
            "calibration": calibration([s for *_, s in turns], labels) if turns else [],
            "threshold_hints": threshold_hints([s for *_, s in turns], labels) if turns else {}}


# A score this close to the top (in logits) is a tie: int8 noise is of that order (about 0.0125 in
# score). The export's parity gate and best-of-k share it.
TIE_MARGIN = 0.05


def _logit(p: float) -> float:
    p = min(max(p, 1e-7), 1 - 1e-7)
    return math.log(p / (1 - p))


def best_of_k(turns, seed: int) -> dict[str, Any]:
    trials: dict[str, dict[str, tuple[float, float]]] = {}
    for g, e, s in turns:
        t = trials.setdefault(g.key, {})
        low, reward = t.get(g.row_id, (1.0, e.reward))
        t[g.row_id] = (min(low, s), reward)
    tasks = [list(t.values()) for t in trials.values() if len(t) > 1]
    if not tasks:
        return {"tasks": 0}
    rng = random.Random(seed)
    pick = [max(t, key=lambda x: x[0])[1] for t in tasks]
    tops = [max(_logit(s) for s, _ in t) for t in tasks]
    tied = [np.mean([r for s, r in t if top - _logit(s) <= TIE_MARGIN]) for t, top in zip(tasks, tops)]
    return {"tasks": len(tasks), "trials_per_task": float(np.mean([len(t) for t in tasks])),
            "critic_pick_min_turn_score": float(np.mean(pick)),
            "critic_pick_up_to_ties": float(np.mean(tied)),
            "tasks_with_mixed_outcomes": sum(len({r for _, r in t}) > 1 for t in tasks),
            "random_trial": float(np.mean([np.mean([r for _, r in t]) for t in tasks])),
            "random_trial_one_draw": float(np.mean([rng.choice(t)[1] for t in tasks])),
            "oracle": float(np.mean([max(r for _, r in t) for t in tasks]))}


def ranking_figures(ranking, seed: int) -> dict[str, Any]:
    if not ranking:
        return {"prompts": 0}
    win = [np.array([e.win_prob for e in g.examples]) for g, _ in ranking]
    lengths = [np.array([len(e.candidate["content"]) for e in g.examples]) for g, _ in ranking]

    def pairwise(keys) -> float | None:  # pairs whose win probs differ by > 0.05, ties in the key skipped
        hits = [(w[i] > w[j]) == (k[i] > k[j]) for w, k in zip(win, keys) for i in range(len(w))
                for j in range(i + 1, len(w)) if abs(w[i] - w[j]) > 0.05 and k[i] != k[j]]
        return float(np.mean(hits)) if hits else None

    return {"prompts": len(ranking),
            "critic_pick": float(np.mean([w[int(np.argmax(s))] for (_, s), w in zip(ranking, win)])),
            "random_pick": float(np.mean([w.mean() for w in win])),
            "first_sample": float(np.mean([w[0] for w in win])),
            "longest_answer": float(np.mean([w[int(np.argmax(n))] for w, n in zip(win, lengths)])),
            "best_possible": float(np.mean([w.max() for w in win])),
            "pairwise_accuracy": pairwise([s for _, s in ranking]),
            "length_pairwise_accuracy": pairwise(lengths)}


def format_table(r: dict[str, Any]) -> str:
    def f(x):
        return "-" if x is None else f"{x:.3f}" if isinstance(x, float) else str(x)

    rule = r["split_rule"]
    held = (f"every task/prompt scored by a head fitted on the other folds: seed {rule['seed']}" if "folds" in rule
            else f"held-out tasks/prompts: seed {rule['seed']}, val_fraction {rule['val_fraction']}")
    head = (f"split: {r['split']} ({held}); {r['bundle']['name']} "
            f"{r['bundle']['version']} {r['bundle']['precision']} on {r['provider']}"
            + (f" ({r['machine']})" if r.get("machine") else ""))
    lines = [head, "",
             f"{'trajectories':<36} {'convs':>6} {'turns':>6} {'AUC outcome':>12} {'writes':>7} {'AUC gold':>9}"]
    for name, t in r["trajectories"].items():
        lines.append(f"{name:<36} {t['conversations']:>6} {t['turns']:>6} {f(t['turn_auc_vs_outcome']):>12} "
                     f"{t['write_turns_judged']:>7} {f(t['write_auc_vs_gold']):>9}")
    b = r["best_of_k"]
    if b.get("tasks"):
        lines += ["", (f"best-of-k trial selection ({b['tasks']} tasks, {b['trials_per_task']:.1f} trials "
                       f"each, {b.get('tasks_with_mixed_outcomes', '?')} with mixed outcomes), mean reward: critic "
                       f"(max of min turn score) {f(b['critic_pick_min_turn_score'])}, up to ties "
                       f"{f(b.get('critic_pick_up_to_ties'))}, random trial {f(b['random_trial'])}, "
                       f"oracle {f(b['oracle'])}")]
    k = r["ranking"]
    if k.get("prompts"):
        lines += ["", f"ranking sets ({k['prompts']} prompts), mean win prob of the pick:",
                  *(f"  {name:<16} {f(k[key])}" for name, key in (
                      ("critic", "critic_pick"), ("random", "random_pick"), ("first sample", "first_sample"),
                      ("longest answer", "longest_answer"), ("best possible", "best_possible"))),
                  (f"  pairwise accuracy (pairs differing by > 0.05): {f(k['pairwise_accuracy'])}, "
                   f"longer answer: {f(k.get('length_pairwise_accuracy'))}")]
    if r.get("picks"):
        p = r["picks"]
        lines += ["", (f"picks (tool-call questions drawn {p['draws']} times as groups of {p['set_size']}; "
                       f"ranking sets whole; write calls alone):"), pick_eval.format_table(p)]
    h = r.get("threshold_hints") or {}
    lines += ["", f"threshold hints: accept {f(h.get('accept_threshold'))}, "
                  f"intervene {f(h.get('intervene_threshold'))}"]
    return "\n".join(lines)


def plot_calibration(cal: list[dict[str, Any]], path: Path, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    pts = [(c["mean_score"], c["good_rate"], c["n"]) for c in cal if c["n"]]
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1, label="perfectly calibrated")
    if pts:
        x, y, _ = zip(*pts)
        ax.plot(x, y, marker="o", label="critic")
        for xi, yi, ni in pts:
            ax.annotate(str(ni), (xi, yi), textcoords="offset points", xytext=(4, -10), fontsize=7)
    ax.set(xlabel="predicted score (bin mean)", ylabel="observed good-turn rate", xlim=(0, 1), ylim=(0, 1),
           title=title)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def pick_figures(bundle: Bundle, files: list[Path], split: str = "val", draws: int = 10, set_size: int = 4,
                 seed: int = 0) -> dict[str, Any]:
    """critic_models.pick_eval's figures on the bundle's split of every labelled source: tool-call
    questions drawn ``draws`` times as groups of ``set_size`` replies, ranking sets whole, write
    calls alone."""
    sp = bundle.card.get("split") or {"seed": 0, "val_fraction": 0.2}
    train, val = head_data.split(head_data.load_items(files), sp.get("seed", 0), sp.get("val_fraction", 0.2))
    items = {"val": val, "train": train, "all": train + val}[split]
    head_data.fill_logits(items, bundle.encoder_scores)
    groups = head_data.groups(items, draws, seed + 1, sizes=(set_size,))
    scored = []
    for g in groups:
        if bundle.head is not None:
            scores = np.array([sigmoid(x) for x in head_fit.logits(bundle.head.linear(g.kind), g.rows)])
        else:  # a format-1 bundle: the encoder alone
            at = features.FEATURES_BY_KIND[g.kind].index("encoder")
            scores = 1.0 / (1.0 + np.exp(-g.rows[:, at]))
        scored.append(pick_eval.Scored(g, scores, g.lengths if g.lengths is not None else np.zeros(len(scores))))
    return {"split": split, "draws": draws, "set_size": set_size, **pick_eval.figures(scored, seed=seed)}


def run(bundle_path: Path, paths: list[Path], out: Path, split: str = "val", record: bool = False,
        draws: int = 10, set_size: int = 4) -> dict[str, Any]:
    bundle = Bundle.load(bundle_path)
    files = data.data_files(paths)
    result = evaluate(bundle, files, split)
    result["picks"] = pick_figures(bundle, files, split, draws, set_size)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    plot_calibration(result["calibration"], out / "calibration.png", f"critic calibration ({split} turns)")
    pick_eval.write(result["picks"], out)
    if record:
        card = bundle.card
        card["evaluation"] = {k: result[k] for k in ("split", "split_rule", "machine", "provider", "trajectories",
                                                     "best_of_k", "ranking", "picks")}
        if bundle.head is None:  # a head's hints come from train-head, on its own score scale
            card["threshold_hints"] = result["threshold_hints"]
        (Path(bundle_path) / "critic.json").write_text(json.dumps(card, indent=2) + "\n")
    return result
