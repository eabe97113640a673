"""The shipped default critic bundle (critic_models/default): it validates against the bundle
contract, fits the size budget, carries held-out figures, gives encoder probabilities that do not
depend on what else is in the batch, and its feature head prefers the call the candidates agree
on over an invented one. (Its encoder alone does not reliably rank good over bad candidates, see
its REPORT.md, so no test claims that.)"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tokenizers

from service.critic import render

DEFAULT = Path(__file__).resolve().parents[1] / "critic_models" / "default"
TRIP = [{"role": "system", "content": "# Airline Agent Policy\\nConfirm before any booking change."},
        {"role": "user", "content": "Hi, I want to cancel my reservation ABC123, user id mia_li_3668."}]
CANDIDATES = [
    {"role": "assistant", "content": None, "tool_calls": [{"id": "1", "type": "function", "function": {
        "name": "get_reservation_details", "arguments": '{"reservation_id": "ABC123"}'}}]},
    {"role": "assistant", "content": "Sure. Could you tell me the reason for the cancellation?"},
    {"role": "assistant", "content": "ok"},
]


@pytest.fixture(scope="module")
def card() -> dict:
    return json.loads((DEFAULT / "critic.json").read_text())


@pytest.fixture(scope="module")
def session() -> ort.InferenceSession:
    return ort.InferenceSession(str(DEFAULT / "model.onnx"), providers=["CPUExecutionProvider"])


def _scores(session, feed) -> np.ndarray:
    logits = np.asarray(session.run(["logits"], feed)[0], dtype=np.float64).reshape(-1)
    return 1 / (1 + np.exp(-logits))


def test_bundle_files_manifest_and_size(card):
    for name in ("model.onnx", "tokenizer.json", "critic.json", "NOTICE", "REPORT.md"):
        assert (DEFAULT / name).is_file(), name
    assert (DEFAULT / "model.onnx").stat().st_size <= 25 * 1024 * 1024
    assert card["format"] == render.FORMAT_VERSION
    assert card["precision"] == "int8" and 8 <= card["max_length"] <= 512
    assert len(card["training_data"]["sha256"]) == 64
    assert card["evaluation"]["split"] == "val"  # figures are held-out figures
    assert card["bundle_format"] == 2 and (DEFAULT / "head.json").is_file()
    picks = card["evaluation"]["picks"]["sets"]["bfcl-train.jsonl"]  # held-out tool-call questions
    assert picks["candidates_per_group"] == 4.0 and picks["critic"]["mean"] > picks["first"]["mean"]
    assert {"Attention", "SkipLayerNormalization"} <= set(card["export"]["fused_operators"])
    assert "Apache" in (DEFAULT / "NOTICE").read_text()


def test_bundle_passes_the_serving_validation(card, session):
    bundle_mod = pytest.importorskip("service.critic.bundle")
    bundle = bundle_mod.read_bundle(DEFAULT)
    bundle_mod.check_model_io(bundle, session.get_inputs(), session.get_outputs())


def test_scores_are_probabilities_and_independent_of_batch_padding(card, session):
    tok = tokenizers.Tokenizer.from_file(str(DEFAULT / "tokenizer.json"))
    together = _scores(session, render.encode_batch(tok, TRIP, CANDIDATES, None, card["max_length"]))
    alone = np.concatenate([_scores(session, render.encode_batch(tok, TRIP, [c], None, card["max_length"]))
                            for c in CANDIDATES])
    assert together.shape == (3,) and ((together > 0) & (together < 1)).all()
    # int8 activations are quantized per batch, so a score moves a little with its batch mates
    # and padding (0.0024 here); the value to two decimals must not.
    assert np.abs(together - alone).max() < 0.01


async def test_the_head_prefers_the_agreed_grounded_call():
    from service.critic.onnx_critic import OnnxCritic

    def cancel(rid: str) -> dict:
        return {"role": "assistant", "content": None, "tool_calls": [{"id": "1", "type": "function", "function": {
            "name": "cancel_reservation", "arguments": json.dumps({"reservation_id": rid})}}]}

    tools = [{"type": "function", "function": {"name": "cancel_reservation", "parameters": {
        "type": "object", "properties": {"reservation_id": {"type": "string"}}, "required": ["reservation_id"]}}}]
    critic = OnnxCritic.load(DEFAULT, "CPUExecutionProvider")
    try:
        found = await critic.assess(TRIP, [cancel("ABC123")] * 3 + [cancel("QQ9876")], tools)
    finally:
        critic.close()
    assert found[3].score < min(a.score for a in found[:3])
    assert found[3].contributions["call_support"] < found[0].contributions["call_support"]
