"""How far cheap text statistics get on the ranking sets: a reference point for the critic.

On the AlpacaEval best-of-N sets (../shared/data/best-of-n), the critic's pick is compared with
a random pick, the longest answer and the best possible. This asks what a ranker that *sees*
every answer whole, but only through a few text statistics (length and structure), reaches with
the same protocol as ``turngate critic train --folds 5``: the same folds (``data.fold_of``, seed
0), a Bradley-Terry fit on the pairs of the other folds whose win probabilities differ by more
than 0.05, the pick scored on the held-out fold's prompts. Printed beside the default critic's own
cross-validated figure (read from its ``critic.json``), and beside the longest answer as the critic
sees it: the answer's tokens in the bundle's own input, which the rendering cuts at ``max_length``.

    python bench/ranking_ceiling.py [--data ../shared/data/best-of-n] [--folds 5] [--view-lengths 512]

Numpy and the tokenizer (no torch); seconds.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np
import tokenizers

from critic_models import data, evaluate
from service.critic import render

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / ".." / "shared" / "data" / "best-of-n"
PAIR_MARGIN = 0.05  # as the trainer (critic_models/sequences.py), which imports torch

LIST_LINE = re.compile(r"^\s*(\d+[.)]|[-*\u2022])\s", re.MULTILINE)
REFUSAL = re.compile(r"as an ai|i'm sorry|i cannot|i apologi[sz]e", re.IGNORECASE)

FEATURES = {  # name -> statistic of one answer's text
    "log_chars": lambda t: np.log1p(len(t)),
    "list_lines": lambda t: len(LIST_LINE.findall(t)) / (1 + t.count("\n")),
    "paragraphs": lambda t: t.count("\n\n") / (1 + len(t) / 500),
    "ends_sentence": lambda t: float(t.rstrip()[-1:] in '.!?)"*:`'),
    "refusal": lambda t: float(bool(REFUSAL.search(t))),
    "bold": lambda t: t.count("**") / (1 + len(t) / 500),
    "heading": lambda t: float("#" in t),
    "distinct_words": lambda t: len(set(t.split())) / (1 + len(t.split())),
}


def statistics(groups: list[data.Group]) -> list[np.ndarray]:
    return [np.array([[f(e.candidate["content"]) for f in FEATURES.values()] for e in g.examples]) for g in groups]


def pair_differences(xs: list[np.ndarray], wins: list[np.ndarray]) -> np.ndarray:
    """x_winner - x_loser for every pair of one prompt's answers that differ by > PAIR_MARGIN."""
    rows = [x[i] - x[j] for x, w in zip(xs, wins) for i in range(len(w)) for j in range(len(w))
            if w[i] - w[j] > PAIR_MARGIN]
    return np.array(rows)


def fit_bradley_terry(d: np.ndarray, l2: float = 1e-3, steps: int = 50) -> np.ndarray:
    """Logistic regression without intercept on the pair differences (Newton's method)."""
    scale = d.std(0) + 1e-9
    z = d / scale
    w = np.zeros(z.shape[1])
    for _ in range(steps):
        p = 1 / (1 + np.exp(-z @ w))
        grad = z.T @ (p - 1) / len(z) + l2 * w
        hess = (z * (p * (1 - p))[:, None]).T @ z / len(z) + l2 * np.eye(len(w))
        w -= np.linalg.solve(hess, grad)
    return w / scale


def visible_longest(groups: list[data.Group], wins: list[np.ndarray], bundle: Path,
                    max_length: int | None = None) -> tuple[int, float, float]:
    """The longest answer as the critic sees it: its tokens in the bundle's input (the rendering
    cuts what does not fit ``max_length``); ties score the mean of the tied answers. Also the
    share of answers the cut shortens. ``max_length`` asks what a longer input would show."""
    max_length = max_length or json.loads((bundle / "critic.json").read_text())["max_length"]
    tok = tokenizers.Tokenizer.from_file(str(bundle / "tokenizer.json"))
    picks, cut = [], []
    for g, w in zip(groups, wins):
        answers = [e.candidate for e in g.examples]
        seen = render.encode_batch(tok, g.context, answers, g.tools, max_length)["token_type_ids"].sum(1) - 1
        whole = [len(e.ids) for e in tok.encode_batch([render.render_candidate(a) for a in answers],
                                                      add_special_tokens=False)]
        picks.append(float(w[seen == seen.max()].mean()))
        cut += [s < n for s, n in zip(seen, whole)]
    return max_length, float(np.mean(picks)), float(np.mean(cut))


def crossval_pick(xs, wins, fold, folds: int, columns: list[int]) -> float:
    picks = []
    for k in range(folds):
        train = [i for i, f in enumerate(fold) if f != k]
        w = fit_bradley_terry(pair_differences([xs[i][:, columns] for i in train], [wins[i] for i in train]))
        picks += [wins[i][int(np.argmax(xs[i][:, columns] @ w))] for i, f in enumerate(fold) if f == k]
    return float(np.mean(picks))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bundle", type=Path, default=ROOT / "critic_models" / "default")
    ap.add_argument("--view-lengths", default="", help="extra input lengths for the critic's-view row, e.g. 512")
    args = ap.parse_args(argv)

    train, val = data.load_groups([args.data], seed=args.seed)
    groups = [g for g in train + val if len(g.examples) > 1]
    fold = data.fold_of(groups, args.folds, args.seed)
    xs = statistics(groups)
    wins = [np.array([e.win_prob for e in g.examples]) for g in groups]
    names = list(FEATURES)

    # The evaluator's own baselines (the critic's column is unused here).
    base = evaluate.ranking_figures([(g, np.zeros(len(g.examples))) for g in groups], args.seed)
    rows = [("random pick", base["random_pick"]), ("longest answer", base["longest_answer"])]
    rows.append(("fitted: log_chars", crossval_pick(xs, wins, fold, args.folds, [0])))
    rows += [(f"fitted: log_chars + {n}", crossval_pick(xs, wins, fold, args.folds, [0, i]))
             for i, n in enumerate(names) if i]
    rows.append(("fitted: all statistics", crossval_pick(xs, wins, fold, args.folds, list(range(len(names))))))
    manifest = args.bundle / "critic.json"
    if manifest.exists():
        for view in [None] + [int(v) for v in args.view_lengths.split(",") if v]:
            max_length, pick, cut = visible_longest(groups, wins, args.bundle, view)
            rows.append((f"longest within the critic's view ({max_length} tokens, {cut:.0%} of answers cut)", pick))
        cv = json.loads(manifest.read_text()).get("crossval", {}).get("ranking", {})
        if cv.get("critic_pick") is not None:
            rows.append((f"critic {args.bundle.name} (its --folds figure)", cv["critic_pick"]))
    rows.append(("best possible", base["best_possible"]))

    print(f"{len(groups)} prompts, {args.folds}-fold cross-validation, seed {args.seed}")
    print("| ranker | mean win prob of the pick |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value:.3f} |")


if __name__ == "__main__":
    main()
