"""The critic network: a BERT cross-encoder (all-MiniLM-L6-v2 by default) with a scalar head.

A small BERT written out here rather than taken from ``transformers``: it loads the base model's
safetensors directly, and its graph follows Hugging Face's BertModel op for op (attention mask
as an additive bias, erf GELU, LayerNorm after the residual add) so that onnxruntime's transformer
optimizer recognises it and fuses Attention / SkipLayerNormalization / FastGelu.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn


@dataclass
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    pooling: str = "mean"  # "mean" over real tokens (all-MiniLM-L6-v2 was trained so) or "cls"

    @classmethod
    def from_file(cls, path: Path) -> BertConfig:
        raw = json.loads(Path(path).read_text())
        return cls(**{k: raw[k] for k in cls.__dataclass_fields__ if k in raw})

    def to_dict(self) -> dict:
        return asdict(self)


class Embeddings(nn.Module):
    position_ids: torch.Tensor  # a buffer (register_buffer below)

    def __init__(self, c: BertConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size, padding_idx=0)
        self.position_embeddings = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.token_type_embeddings = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.dropout = nn.Dropout(c.hidden_dropout_prob)
        # A sliced buffer, as in Hugging Face's BertEmbeddings: the pattern onnxruntime fuses
        # into EmbedLayerNormalization.
        self.register_buffer("position_ids", torch.arange(c.max_position_embeddings).unsqueeze(0),
                             persistent=False)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        positions = self.position_ids[:, : input_ids.size(1)]
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        x = x + self.position_embeddings(positions)
        return self.dropout(self.LayerNorm(x))


class SelfAttention(nn.Module):
    def __init__(self, c: BertConfig) -> None:
        super().__init__()
        self.heads = c.num_attention_heads
        self.head_size = c.hidden_size // c.num_attention_heads
        self.query = nn.Linear(c.hidden_size, c.hidden_size)
        self.key = nn.Linear(c.hidden_size, c.hidden_size)
        self.value = nn.Linear(c.hidden_size, c.hidden_size)
        self.dropout = nn.Dropout(c.attention_probs_dropout_prob)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.size(0), x.size(1), self.heads, self.head_size).permute(0, 2, 1, 3)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        q, k, v = self._split(self.query(x)), self._split(self.key(x)), self._split(self.value(x))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_size) + bias
        probs = self.dropout(torch.softmax(scores, dim=-1))
        ctx = torch.matmul(probs, v).permute(0, 2, 1, 3).contiguous()
        return ctx.view(ctx.size(0), ctx.size(1), self.heads * self.head_size)


class DenseNorm(nn.Module):
    """Projection, dropout, residual add, LayerNorm (BertSelfOutput / BertOutput)."""

    def __init__(self, d_in: int, c: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(d_in, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.dropout = nn.Dropout(c.hidden_dropout_prob)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class _Attention(nn.Module):
    """A holder, so that parameter names are those of Hugging Face's checkpoints (attention.self.*)."""

    def __init__(self, c: BertConfig) -> None:
        super().__init__()
        self.self = SelfAttention(c)
        self.output = DenseNorm(c.hidden_size, c)


class _Intermediate(nn.Module):
    def __init__(self, c: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.intermediate_size)


class Layer(nn.Module):
    def __init__(self, c: BertConfig) -> None:
        super().__init__()
        self.attention = _Attention(c)
        self.intermediate = _Intermediate(c)
        self.output = DenseNorm(c.intermediate_size, c)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        a = self.attention.output(self.attention.self(x, bias), x)
        h = nn.functional.gelu(self.intermediate.dense(a))
        return self.output(h, a)


class CrossEncoder(nn.Module):
    """[CLS] context [SEP] candidate [SEP] -> one logit; sigmoid(logit) is the critic score.

    The head reads the mean of the last layer over real tokens by default: the base model was
    trained with that pooling, so its pooled vector is already a good feature before any
    fine-tuning (its [CLS] vector is not)."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.encoder = nn.ModuleList(Layer(config) for _ in range(config.num_hidden_layers))
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.head = nn.Linear(config.hidden_size, 1)
        self.apply(self._init)

    def _init(self, m: nn.Module) -> None:
        if isinstance(m, nn.Linear | nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def pooled(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               token_type_ids: torch.Tensor) -> torch.Tensor:
        """The [batch, hidden] vector the head reads."""
        # Additive mask bias [batch, 1, 1, seq], as Hugging Face's BertModel builds it.
        bias = attention_mask[:, None, None, :].to(torch.float32)
        bias = (1.0 - bias) * torch.finfo(torch.float32).min
        x = self.embeddings(input_ids, token_type_ids)
        for layer in self.encoder:
            x = layer(x, bias)
        if self.config.pooling == "cls":
            return x[:, 0]
        mask = attention_mask.unsqueeze(-1).to(x.dtype)
        return (x * mask).sum(1) / mask.sum(1).clamp(min=1.0)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.pooled(input_ids, attention_mask, token_type_ids))).squeeze(-1)


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The safetensors format (8-byte header length, JSON header, raw little-endian data), read
    without the safetensors package."""
    dtypes = {"F32": np.float32, "F16": np.float16, "I64": np.int64}
    blob = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + n])
    out = {}
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        start, end = spec["data_offsets"]
        arr = np.frombuffer(blob, dtype=dtypes[spec["dtype"]], count=(end - start) // np.dtype(
            dtypes[spec["dtype"]]).itemsize, offset=8 + n + start).reshape(spec["shape"])
        out[name] = torch.from_numpy(arr.astype(np.float32) if arr.dtype == np.float16 else arr.copy())
    return out


def load_pretrained(folder: Path, layers: int | None = None) -> CrossEncoder:
    """A cross-encoder whose encoder holds the base model's weights (head freshly initialised),
    optionally only its first `layers` layers: a shallower critic costs proportionally less."""
    folder = Path(folder)
    config = BertConfig.from_file(folder / "config.json")
    if layers is not None:
        if not 1 <= layers <= config.num_hidden_layers:
            raise ValueError(f"layers must be 1..{config.num_hidden_layers}, got {layers}")
        config.num_hidden_layers = layers
    model = CrossEncoder(config)
    weights = {k.removeprefix("bert.").replace("encoder.layer.", "encoder."): v
               for k, v in read_safetensors(folder / "model.safetensors").items()}
    own = model.state_dict()
    missing = [k for k in own if not k.startswith("head.") and k not in weights]
    if missing:
        raise ValueError(f"{folder}: base model lacks {missing[:5]}")
    model.load_state_dict({k: weights.get(k, v) for k, v in own.items()})
    return model
