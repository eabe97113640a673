"""The frozen-encoder mode of training: the base model's pooled vector of every sequence is
computed once, and a linear head is fitted on it, full batch (minutes on 2 CPU cores for all the
shared data). ``crossval`` reuses the same vectors to cross-validate the head recipe in k folds.
"""

from __future__ import annotations

import copy
import random
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm import tqdm

from critic_models import data
from critic_models.model import CrossEncoder
from critic_models.sequences import Encoded, collate, loss_fn, ordered_pairs

if TYPE_CHECKING:
    from critic_models.train import TrainConfig


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
        return torch.tensor([r for i, k in enumerate(fold) if (k == f) == inside
                             for r in range(starts[i], starts[i + 1])])

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
