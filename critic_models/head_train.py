"""`turngate critic train-head`: fit the feature head over an encoder bundle and write a bundle.

1. Every labelled source becomes candidate groups (critic_models.head_data), split by question,
   prompt or task; the encoder bundle's ONNX model gives each candidate its logit once. On the
   training side, the logit is zeroed for the files the encoder itself was trained on (its
   manifest's training_data): there it is an in-sample score, and a head fitted on it learns to
   trust the encoder more than it deserves on new data (measured on the ranking sets: held-out
   pick 0.398 with it, 0.434 without).
2. Heads: "tool" on the tool-call sets, "text" on the ranking sets. Agent turns (a conversation
   with tool calls) are scored by the tool head unless ``agent_head`` is set: on the shared τ-bench
   trajectories a head fitted on them did worse on unseen tasks than the tool head fitted on
   function-calling questions alone (write turns among their sibling trials' calls, 5-fold by
   task: AUC 0.63 against 0.75; critic_models/default/REPORT.md). Trajectories are then evaluated, never fitted.
3. With ``folds``, the recipe is cross-validated on the training side: each group is scored by a
   head fitted on the other folds (by key), and the pick figures of critic_models.pick_eval are
   computed from those scores.
4. The head is fitted on the whole training side and written, beside a copy of the encoder's
   files, as a format-2 bundle; the held-out side is evaluated through the bundle as it will be
   served, and the figures go into ``critic.json`` with the threshold hints on the new scale.

Numpy only: no torch, seconds beyond the encoder pass.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from critic_models import data, head_data, pick_eval
from critic_models.evaluate import Bundle, threshold_hints
from critic_models.head_fit import FeatureGroup, FitConfig, fit, logits
from service.critic import features
from service.critic.head import HEAD_FILE, Head, sigmoid

ENCODER_FILES = ("model.onnx", "tokenizer.json", "NOTICE")


@dataclass
class HeadConfig:
    encoder: str  # bundle folder whose model.onnx and tokenizer.json the head sits on
    data: list[str]
    out: str
    seed: int = 0
    val_fraction: float = 0.2
    draws: int = 10  # sampled groups per tool-call question
    folds: int = 5  # cross-validation of the recipe on the training side (0 = off)
    eval_set_size: int = 4  # N of the held-out tool-call groups, as the target
    fit: FitConfig = field(default_factory=FitConfig)
    agent_head: bool = False  # fit a head of its own for agent turns (else the tool head scores them)
    logits_cache: str | None = None  # JSON file of encoder logits, read and updated (one per encoder)
    without_encoder: bool = False  # the encoder's logit left at 0: its weight is 0 and serving never runs it
    name: str | None = None  # default: the encoder bundle's name


def _fold(key: str, folds: int, seed: int) -> int:
    return int(hashlib.sha256(f"{seed}:{key}".encode()).hexdigest(), 16) % folds


def fit_head(groups: list[FeatureGroup], cfg: FitConfig, agent_head: bool = False,
             meta: dict[str, Any] | None = None) -> Head:
    heads = {}
    for kind, names in features.FEATURES_BY_KIND.items():
        if kind == "agent" and not agent_head:
            continue
        mine = [g for g in groups if g.kind == kind]
        heads[kind] = fit(mine, names, cfg) if mine else fit(
            [FeatureGroup("-", "-", kind, np.zeros((1, len(names))), np.array([0.5]))], names, cfg)
    return Head(heads, features.FEATURES_VERSION, meta or {})


def _read_cache(path: str | None, encoder: Bundle) -> dict[str, float]:
    if not path or not Path(path).is_file():
        return {}
    saved = json.loads(Path(path).read_text())
    return saved["logits"] if saved.get("encoder") == _encoder_id(encoder) else {}


def _encoder_id(encoder: Bundle) -> str | None:
    """The encoder's version: a format-2 bundle names the encoder it sits on."""
    return encoder.card.get("encoder_version") or encoder.card.get("version")


def _encoder_files(encoder: Bundle) -> set[str]:
    return set((encoder.card.get("training_data") or {}).get("files") or {})


def score_groups(head: Head, groups: list[FeatureGroup]) -> list[np.ndarray]:
    return [np.array([sigmoid(x) for x in logits(head.linear(g.kind), g.rows)]) for g in groups]


def scored(groups: list[FeatureGroup], scores: list[np.ndarray]) -> list[pick_eval.Scored]:
    return [pick_eval.Scored(g, s, g.lengths if g.lengths is not None else np.zeros(len(s)))
            for g, s in zip(groups, scores)]


def crossval(groups: list[FeatureGroup], folds: int, seed: int, cfg: FitConfig, agent_head: bool = False
             ) -> list[np.ndarray]:
    """Each group's scores from a head fitted on the other folds (folds by key)."""
    fold = [_fold(g.key, folds, seed) for g in groups]
    out: list[np.ndarray | None] = [None] * len(groups)
    for k in range(folds):
        head = fit_head(fittable([g for g, f in zip(groups, fold) if f != k], agent_head), cfg, agent_head)
        idx = [i for i, f in enumerate(fold) if f == k]
        for i, s in zip(idx, score_groups(head, [groups[i] for i in idx])):
            out[i] = s
    return [s for s in out if s is not None]


def fittable(groups: list[FeatureGroup], agent_head: bool) -> list[FeatureGroup]:
    """What the heads are fitted on: trajectory write turns only for an agent head of their own;
    otherwise they are evaluated, never fitted (see the module docstring)."""
    return [g for g in groups if agent_head or g.category not in ("write", "write-siblings")]


def train_head(cfg: HeadConfig, extra: tuple[list[head_data.Item], list[head_data.Item]] | None = None
               ) -> dict[str, Any]:
    """`extra`: (training, held-out) items split by the caller (logged turns from the store, held out
    by conversation: critic_models.store_data), added to the files' own split."""
    started = time.monotonic()
    encoder = Bundle.load(Path(cfg.encoder))
    files = data.data_files([Path(p) for p in cfg.data])
    items = head_data.load_items(files)
    train, val = head_data.split(items, cfg.seed, cfg.val_fraction)
    if extra is not None:
        train, val = train + extra[0], val + extra[1]
        items = train + val
    cache = _read_cache(cfg.logits_cache, encoder)
    head_data.fill_logits(items, None if cfg.without_encoder else encoder.encoder_scores, cache)
    if cfg.logits_cache and not cfg.without_encoder:
        Path(cfg.logits_cache).write_text(json.dumps({"encoder": _encoder_id(encoder), "logits": cache}))
    seen = _encoder_files(encoder)
    for it in train:
        if it.source in seen:
            it.logits = [0.0] * len(it.candidates)
    train_groups = head_data.groups(train, cfg.draws, cfg.seed)
    report: dict[str, Any] = {"config": {**asdict(cfg), "fit": asdict(cfg.fit)}, "data": data.digest(files),
                              "train_items": len(train), "val_items": len(val), "train_groups": len(train_groups)}
    if cfg.folds:
        cv = crossval(train_groups, cfg.folds, cfg.seed, cfg.fit, cfg.agent_head)
        report["crossval"] = pick_eval.figures(scored(train_groups, cv), seed=cfg.seed)
    fitted = fittable(train_groups, cfg.agent_head)
    head = fit_head(fitted, cfg.fit, cfg.agent_head, {"training": {
        "groups": len(fitted), "fit": asdict(cfg.fit), "agent_head": cfg.agent_head,
        "without_encoder": cfg.without_encoder,
        "encoder_logit_zeroed_for": sorted(seen & {it.source for it in train}),
        "data_sha256": report["data"]["sha256"]}})
    out = write_bundle(encoder, head, Path(cfg.out), cfg)
    held = head_data.groups(val, cfg.draws, cfg.seed + 1, sizes=(cfg.eval_set_size,))
    val_scores = score_groups(head, held)
    report["held_out"] = pick_eval.figures(scored(held, val_scores), seed=cfg.seed)
    hints = _hints(held, val_scores)
    card = json.loads((out / "critic.json").read_text())
    card["threshold_hints"] = hints
    card["evaluation_head"] = {"split": "val", "split_rule": card["split"], **report["held_out"]}
    if "crossval" in report:
        card["crossval_head"] = report["crossval"]
    (out / "critic.json").write_text(json.dumps(card, indent=2) + "\n")
    report["minutes"] = round((time.monotonic() - started) / 60, 2)
    (out / "train_head.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def _hints(groups: list[FeatureGroup], scores: list[np.ndarray]) -> dict[str, Any]:
    """Threshold hints on the head's scale, from held-out labelled candidates of tool and agent turns."""
    s = [float(x) for g, sc in zip(groups, scores) if g.kind != "text" for x, y in zip(sc, g.labels)
         if not np.isnan(y)]
    y = [bool(v >= 0.5) for g in groups if g.kind != "text" for v in g.labels if not np.isnan(v)]
    hints: dict[str, Any] = threshold_hints(s, y) if s else {"accept_threshold": None, "intervene_threshold": None}
    hints["note"] = ("from held-out tool and agent candidates scored by the head: accept is the lowest score above "
                     "which >= 90% were valid; intervene maximises TPR-FPR, at most accept")
    return hints


def write_bundle(encoder: Bundle, head: Head, out: Path, cfg: HeadConfig) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    for name in ENCODER_FILES:
        src = encoder.path / name
        if src.is_file() and src.resolve() != (out / name).resolve():
            shutil.copyfile(src, out / name)
    head.save(out)
    digest = hashlib.sha256((out / "model.onnx").read_bytes() + (out / HEAD_FILE).read_bytes()).hexdigest()[:12]
    card = {k: v for k, v in encoder.card.items() if k not in (
        "evaluation", "crossval", "threshold_hints", "evaluation_head", "crossval_head")}
    card.update({"name": cfg.name or encoder.card.get("name"), "version": digest, "bundle_format": 2,
                 "encoder_version": _encoder_id(encoder),
                 "head": {"file": HEAD_FILE, "features_version": features.FEATURES_VERSION,
                          "split": {"seed": cfg.seed, "val_fraction": cfg.val_fraction,
                                    "by": "source file + question text / prompt id / task_id"}}})
    card["split"] = card["head"]["split"]
    (out / "critic.json").write_text(json.dumps(card, indent=2) + "\n")
    return out
