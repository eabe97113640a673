"""Training sequences as tensors, and the loss both training modes minimise.

A group's candidates are encoded with the serving rendering (``render.encode_batch``) and kept
unpadded; ``collate`` pads a list of groups into one batch whose rows of a group are contiguous,
which ``ordered_pairs`` and ``loss_fn`` rely on.
"""

from __future__ import annotations

from dataclasses import dataclass

import tokenizers
import torch

from critic_models import data
from service.critic import render

PAIR_MARGIN = 0.05  # targets closer than this make no pair


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
