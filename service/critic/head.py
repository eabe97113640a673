"""The feature head: a logistic model over the turn features, one per kind of turn.

A bundle's ``head.json`` holds, per kind of turn (service.critic.features.kind_of: "tool", a
request that declares tools; "agent", a turn inside an agent's loop; "text"), the feature names,
their standardisation (mean, scale), one weight each and a bias:

    logit = bias + sum_i weight_i * (x_i - mean_i) / scale_i,   score = sigmoid(logit)

Linear on purpose: each term is the feature's contribution to the logit, so every score comes
with its explanation, and the file is small enough to read.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.critic import features

HEAD_FILE = "head.json"
HEAD_FORMAT = 1


class HeadError(ValueError):
    """head.json does not describe a head this turngate can serve."""


@dataclass(frozen=True)
class Linear:
    features: tuple[str, ...]
    mean: tuple[float, ...]
    scale: tuple[float, ...]
    weights: tuple[float, ...]
    bias: float

    def contributions(self, row: list[float]) -> list[float]:
        return [w * (x - m) / s for x, m, s, w in zip(row, self.mean, self.scale, self.weights)]

    def to_dict(self) -> dict[str, Any]:
        return {"features": list(self.features), "mean": list(self.mean), "scale": list(self.scale),
                "weights": list(self.weights), "bias": self.bias}


@dataclass(frozen=True)
class Head:
    heads: dict[str, Linear]
    features_version: int
    meta: dict[str, Any]

    def apply(self, turn: features.TurnFeatures) -> tuple[list[float], list[list[float]]]:
        """(scores in 0..1, per-candidate contributions in logits, in ``turn.names`` order)."""
        lin = self.linear(turn.kind)
        contribs = [lin.contributions(row) for row in turn.rows]
        return [sigmoid(lin.bias + sum(c)) for c in contribs], contribs

    def linear(self, kind: str) -> Linear:
        """The head for a kind; agent turns fall back to the tool head where there is no agent one."""
        return self.heads.get(kind) or self.heads["tool"]

    def to_dict(self) -> dict[str, Any]:
        return {"format": HEAD_FORMAT, "features_version": self.features_version,
                "heads": {k: v.to_dict() for k, v in sorted(self.heads.items())}, **self.meta}

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / HEAD_FILE
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return path


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def expected_features(kind: str) -> tuple[str, ...]:
    return features.FEATURES_BY_KIND[kind]


def parse(data: Any, where: str = HEAD_FILE) -> Head:
    """A head from head.json's content; HeadError naming what is wrong."""
    if not isinstance(data, dict):
        raise HeadError(f"{where}: expected a JSON object")
    if data.get("format") != HEAD_FORMAT:
        raise HeadError(f"{where}: head format {data.get('format')!r}, this turngate reads {HEAD_FORMAT}")
    if data.get("features_version") != features.FEATURES_VERSION:
        raise HeadError(f"{where}: fitted on turn features version {data.get('features_version')!r}, this "
                        f"turngate computes version {features.FEATURES_VERSION}: refit the head")
    raw = data.get("heads")
    if not isinstance(raw, dict) or not {"tool", "text"} <= set(raw) <= set(features.FEATURES_BY_KIND):
        raise HeadError(f"{where}: 'heads' must hold 'tool' and 'text', and may hold 'agent'")
    heads = {}
    for kind, h in raw.items():
        names = tuple(h.get("features") or ()) if isinstance(h, dict) else ()
        if names != expected_features(kind):
            raise HeadError(f"{where}: head {kind!r} has features {list(names)}, expected "
                            f"{list(expected_features(kind))}")
        try:
            vecs = [tuple(float(v) for v in h[k]) for k in ("mean", "scale", "weights")]
            bias = float(h["bias"])
        except (KeyError, TypeError, ValueError) as e:
            raise HeadError(f"{where}: head {kind!r} lacks numeric mean/scale/weights/bias ({e})") from e
        if any(len(v) != len(names) for v in vecs) or not all(
                math.isfinite(x) for v in vecs for x in v) or not math.isfinite(bias):
            raise HeadError(f"{where}: head {kind!r}: mean/scale/weights must be finite, one per feature")
        if any(s <= 0 for s in vecs[1]):
            raise HeadError(f"{where}: head {kind!r}: every scale must be positive")
        mean, scale, weights = vecs
        heads[kind] = Linear(names, mean, scale, weights, bias)
    meta = {k: v for k, v in data.items() if k not in ("format", "features_version", "heads")}
    return Head(heads, data["features_version"], meta)


def load(folder: str | Path) -> Head | None:
    """The head in a bundle folder, None when it has none (a format-1 bundle: encoder only)."""
    path = Path(folder) / HEAD_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HeadError(f"{path}: not valid JSON: {e}") from e
    return parse(data, str(path))
