"""Export a training run to a critic bundle: ONNX (legacy exporter, opset 17), onnxruntime's BERT
fusions, then the requested precision; parity-checked against torch before the bundle is written.

Bundle: ``model.onnx`` (inputs ``input_ids``, ``attention_mask``, ``token_type_ids`` int64
[batch, seq]; output ``logits`` float [batch]), ``tokenizer.json``, ``critic.json``, ``NOTICE``.
Precisions: ``fp32``; ``int8`` (dynamic quantization of the weights, for CPU); ``fp16`` (weights
and activations in half precision, inputs/outputs kept as they are, for GPU).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import tokenizers
import torch

from critic_models.evaluate import TIE_MARGIN  # a pick this close to the fp32 top is a tie
from critic_models.train import load_run
from service.critic import render

NAME = "turngate-minilm-critic"
BASE_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
FP32_TOLERANCE = 1e-4
TOP1_AGREEMENT = 0.98
NOTICE = """turngate critic bundle

model.onnx is fine-tuned from sentence-transformers/all-MiniLM-L6-v2
(https://huggingface.co/sentence-transformers/all-MiniLM-L6-v2), Copyright the
sentence-transformers authors, licensed under the Apache License, Version 2.0
(http://www.apache.org/licenses/LICENSE-2.0); tokenizer.json is that model's tokenizer.
The fine-tuned weights are distributed under the same license. Training data: tau-bench and
tau2-bench trajectories (MIT, sierra-research) and reward-bench bon_eval AlpacaEval ranking
sets (Apache-2.0, allenai).
"""


def export_onnx(model: torch.nn.Module, sample: dict[str, np.ndarray], path: Path) -> None:
    names = ["input_ids", "attention_mask", "token_type_ids"]
    axes = {n: {0: "batch", 1: "seq"} for n in names} | {"logits": {0: "batch"}}
    args = tuple(torch.from_numpy(sample[n]) for n in names)
    # The module's own mode is what gets exported: eval, or dropout lands in the graph.
    torch.onnx.export(model.eval(), args, str(path), input_names=names, output_names=["logits"],
                      dynamic_axes=axes, opset_version=17, do_constant_folding=True, dynamo=False)


def optimize(raw: Path, out: Path, heads: int, hidden: int, fp16: bool) -> dict[str, int]:
    """onnxruntime's transformer optimizer; returns the fused operator counts."""
    from onnxruntime.transformers.optimizer import optimize_model

    opt = optimize_model(str(raw), model_type="bert", num_heads=heads, hidden_size=hidden)
    stats = {k: v for k, v in opt.get_fused_operator_statistics().items() if v}
    if fp16:
        opt.convert_float_to_float16(keep_io_types=True)
    opt.save_model_to_file(str(out))
    return stats


def quantize_int8(src: Path, dst: Path) -> None:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # Per-channel scales with reduced range: on the default run's held-out groups, 0.875 top-1
    # agreement with fp32 against 0.65 for the per-tensor default (same 22.8 MB). Fused ops
    # (com.microsoft domain) defeat shape inference; their outputs are float.
    # The head stays float: one output channel means one int8 scale for all its weights, which
    # zeroes the small ones, and it is 384 multiply-adds. The quantizer first rewrites a Gemm as
    # `<name>_MatMul` + `<name>_Add`, so both names are excluded.
    graph = onnx.load(str(src)).graph
    head = [n.name for n in graph.node if "head.weight" in n.input]
    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True, reduce_range=True,
                     nodes_to_exclude=head + [f"{n}_MatMul" for n in head],
                     extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})


def session(path: Path, providers: list[str] | None = None) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    avail = ort.get_available_providers()
    wanted = providers or ("CUDAExecutionProvider", "CPUExecutionProvider")
    return ort.InferenceSession(str(path), opts, providers=[p for p in wanted if p in avail])


def run_logits(sess: ort.InferenceSession, feed: dict[str, np.ndarray]) -> np.ndarray:
    return np.asarray(sess.run(["logits"], feed)[0], dtype=np.float32).reshape(-1)


def parity(model: torch.nn.Module, fp32: Path, variant: Path | None, groups: list[dict[str, Any]],
           tok: tokenizers.Tokenizer, max_length: int) -> dict[str, Any]:
    """fp32 ONNX vs torch: the largest |logit difference|; the variant vs fp32: the share of
    groups where both pick the same top candidate (exactly, and up to fp32 ties of TIE_MARGIN)."""
    s32 = session(fp32, ["CPUExecutionProvider"])
    sv = session(variant) if variant else None
    worst, same, tied, n = 0.0, 0, 0, 0
    for g in groups:
        feed = render.encode_batch(tok, g["messages"], g["candidates"], g.get("tools"), max_length)
        with torch.no_grad():
            ref = model(*(torch.from_numpy(feed[k]) for k in ("input_ids", "attention_mask", "token_type_ids")))
        a = run_logits(s32, feed)
        worst = max(worst, float(np.abs(a - ref.numpy()).max()))
        if sv is not None and len(g["candidates"]) > 1:
            pick = int(np.argmax(run_logits(sv, feed)))
            same += int(pick == np.argmax(a))
            tied += int(a.max() - a[pick] <= TIE_MARGIN)
            n += 1
    return {"groups": len(groups), "fp32_vs_torch_max_abs_diff": worst, "variant_groups": n,
            "top1_agreement_vs_fp32": (same / n) if n else None,
            "top1_agreement_vs_fp32_up_to_ties": (tied / n) if n else None, "tie_margin_logits": TIE_MARGIN}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def export_bundle(run: Path, out: Path, precision: str = "int8", name: str = NAME,
                  version: str | None = None, check: bool = True) -> dict[str, Any]:
    if precision not in ("fp32", "int8", "fp16"):
        raise ValueError(f"unknown precision {precision!r}")
    run, out = Path(run), Path(out)
    model, meta = load_run(run)
    cfg = meta["config"]
    max_length = cfg["max_length"]
    tok = tokenizers.Tokenizer.from_file(str(run / "tokenizer.json"))
    groups = [json.loads(line) for line in (run / "parity.jsonl").open() if line.strip()]
    sample = render.encode_batch(tok, groups[0]["messages"], groups[0]["candidates"], groups[0].get("tools"),
                                 max_length) if groups else render.encode_batch(
        tok, [{"role": "user", "content": "hi"}], [{"role": "assistant", "content": "hello"}] * 2, None, max_length)
    bert = model.config
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        export_onnx(model, sample, tmp / "raw.onnx")
        fused = optimize(tmp / "raw.onnx", tmp / "fp32.onnx", bert.num_attention_heads, bert.hidden_size, False)
        variant = None
        if precision == "int8":
            quantize_int8(tmp / "fp32.onnx", variant := tmp / "int8.onnx")
        elif precision == "fp16":
            optimize(tmp / "raw.onnx", variant := tmp / "fp16.onnx", bert.num_attention_heads, bert.hidden_size, True)
        checks = parity(model, tmp / "fp32.onnx", variant, groups, tok, max_length) if check else {}
        if check:
            if checks["fp32_vs_torch_max_abs_diff"] > FP32_TOLERANCE:
                raise RuntimeError(f"fp32 ONNX differs from torch by {checks['fp32_vs_torch_max_abs_diff']:.2e}")
            agree = checks["top1_agreement_vs_fp32_up_to_ties"]
            if agree is not None and agree < TOP1_AGREEMENT:
                raise RuntimeError(f"{precision} picks the fp32 top candidate (or one within {TIE_MARGIN} "
                                   f"logits of it) on only {agree:.1%} of groups")
        out.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(variant or tmp / "fp32.onnx", out / "model.onnx")
    tok.save(str(out / "tokenizer.json"))
    (out / "NOTICE").write_text(NOTICE)
    card = {
        "name": name,
        "version": version or sha256(out / "model.onnx")[:12],
        "base_model": meta.get("base_model", BASE_MODEL),
        "format": render.FORMAT_VERSION,
        "max_length": max_length,
        "precision": precision,
        "threshold_hints": {"accept_threshold": None, "intervene_threshold": None,
                            "note": "set by `turngate critic eval --record` from held-out turns"},
        "training_data": meta["data"],
        "split": meta["split"],
        "training": {k: meta[k] for k in ("steps", "planned_steps", "stopped_early", "minutes", "device",
                                          "train_sequences", "loss_first", "loss_last")},
        "export": {"fused_operators": fused, "parity": checks, "size_bytes": (out / "model.onnx").stat().st_size},
        "evaluation": None,
        "crossval": meta.get("crossval"),  # the recipe's k-fold figures, when trained with --folds
    }
    if card["format"] != meta["format"]:
        raise RuntimeError(f"run was trained on input format {meta['format']}, render is {render.FORMAT_VERSION}")
    (out / "critic.json").write_text(json.dumps(card, indent=2) + "\n")
    return card
