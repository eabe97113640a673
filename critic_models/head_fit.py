"""Fitting the feature head (service.critic.head): numpy only, seconds on a CPU.

The loss has two parts, over standardised features:
- listwise, within each group of candidates whose labels differ: cross-entropy between the
  softmax of the group's logits and the labels normalised to sum to one. This is what the gate
  does with the scores (pick the top of a group), so it is what the head is fitted for;
- pointwise binary cross-entropy on every labelled candidate of a group that allows it, weighted
  by ``pointwise``: it keeps the score a probability, so that thresholds (accept, intervene) mean
  something for one candidate. Ranking sets do not allow it: a win probability against one fixed
  reference answer mostly says how hard the prompt is, and fitted across prompts it teaches the
  head that long answers are bad (critic_models/data.py has the measurement), the opposite of
  what holds within a prompt.
Plus L2 on the weights. Full-batch gradient descent with Adam, deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from service.critic.head import Linear


@dataclass
class FeatureGroup:
    """The candidates of one turn (or one sampled subset of a question's replies) as features."""

    key: str  # split key: question, prompt or task
    source: str  # file name
    kind: str  # "tool" or "text"
    rows: np.ndarray  # [n, features]
    labels: np.ndarray  # [n], in 0..1; nan = not labelled
    category: str | None = None  # the source's own category (BFCL's simple, parallel, ...)
    draw: int = 0  # which sampled subset of the question's replies (tool-call sets)
    lengths: np.ndarray | None = None  # characters of each reply (the longest-answer baseline)
    pointwise: bool = True  # False: the labels only rank within the group (win probabilities)
    replies: list[dict[str, Any]] | None = None  # the candidates' messages (what the cascade's rule reads)


@dataclass
class FitConfig:
    pointwise: float = 0.5
    l2: float = 1e-3
    steps: int = 400
    lr: float = 0.05


def _stack(groups: list[FeatureGroup]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rows = np.vstack([g.rows for g in groups]).astype(np.float64)
    labels = np.concatenate([g.labels for g in groups]).astype(np.float64)
    owner = np.concatenate([np.full(len(g.labels), i) for i, g in enumerate(groups)])
    return rows, labels, owner


def fit(groups: list[FeatureGroup], names: tuple[str, ...], cfg: FitConfig | None = None) -> Linear:
    cfg = cfg or FitConfig()
    x, y, owner = _stack(groups)
    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale[scale < 1e-6] = 1.0  # a constant feature: weight stays ~0, scale must stay positive
    z = (x - mean) / scale
    labelled = ~np.isnan(y)
    y0 = np.where(labelled, y, 0.0)
    point = labelled & np.concatenate([np.full(len(g.labels), g.pointwise) for g in groups])
    # Listwise targets: groups with at least two labelled candidates whose labels differ.
    n_groups = len(groups)
    lo = np.full(n_groups, np.inf)
    hi = np.full(n_groups, -np.inf)
    np.minimum.at(lo, owner[labelled], y[labelled])
    np.maximum.at(hi, owner[labelled], y[labelled])
    ranked = (hi - lo > 1e-9)[owner] & labelled
    total = np.zeros(n_groups)
    np.add.at(total, owner[ranked], y0[ranked])
    target = np.where(ranked, y0 / np.maximum(total[owner], 1e-12), 0.0)
    n_ranked = max(1, int((hi - lo > 1e-9).sum()))
    n_point = max(1, int(point.sum()))

    w = np.zeros(z.shape[1])
    b = 0.0
    m, v = np.zeros(z.shape[1] + 1), np.zeros(z.shape[1] + 1)
    for step in range(1, cfg.steps + 1):
        logit = z @ w + b
        # softmax within each group over the ranked candidates
        top = np.full(n_groups, -np.inf)
        np.maximum.at(top, owner[ranked], logit[ranked])
        e = np.where(ranked, np.exp(logit - np.where(ranked, top[owner], 0.0)), 0.0)
        denom = np.zeros(n_groups)
        np.add.at(denom, owner, e)
        p = np.where(ranked, e / np.maximum(denom[owner], 1e-300), 0.0)
        grad_logit = (p - target) / n_ranked
        prob = 1.0 / (1.0 + np.exp(-logit))
        grad_logit = grad_logit + cfg.pointwise * np.where(point, prob - y0, 0.0) / n_point
        grad = np.append(z.T @ grad_logit + cfg.l2 * w, grad_logit.sum())
        m = 0.9 * m + 0.1 * grad
        v = 0.999 * v + 0.001 * grad * grad
        step_ = cfg.lr * (m / (1 - 0.9 ** step)) / (np.sqrt(v / (1 - 0.999 ** step)) + 1e-8)
        w -= step_[:-1]
        b -= step_[-1]
    return Linear(tuple(names), tuple(map(float, mean)), tuple(map(float, scale)), tuple(map(float, w)), float(b))


def logits(lin: Linear, rows: np.ndarray) -> np.ndarray:
    z = (rows - np.asarray(lin.mean)) / np.asarray(lin.scale)
    return z @ np.asarray(lin.weights) + lin.bias
