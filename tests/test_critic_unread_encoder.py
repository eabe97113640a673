"""The encoder is not run on a kind of turn whose head gives it no weight (the shipped head's
turns, all of them since a6cee4009e51): its reading could not move a score, and it is most of the
critic's CPU. The scores are the same to the bit; the explanations leave it out."""

from __future__ import annotations

import asyncio
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import REGISTRY

from service.critic.bundle import BundleError
from service.critic.onnx_critic import OnnxCritic
from service.critic.registry import shipped_bundle

TEXT = ([{"role": "user", "content": "Summarise the refund policy in two lines."}],
        [{"role": "assistant", "content": "Refunds within 30 days.\n- Keep the receipt."},
         {"role": "assistant", "content": "I cannot help with that."}], None)
TOOLS = [{"type": "function", "function": {"name": "get_order", "parameters": {
    "type": "object", "properties": {"id": {"type": "string"}}, "required": ["id"]}}}]
TOOL = ([{"role": "user", "content": "Where is order A12?"}],
        [{"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {
            "name": "get_order", "arguments": json.dumps({"id": "A12"})}}]},
         {"role": "assistant", "content": "Which order?"}], TOOLS)


def _runs() -> float:
    return REGISTRY.get_sample_value("turngate_critic_batch_size_count") or 0.0


def _assess(critic: OnnxCritic, turn) -> tuple[list, float]:
    before = _runs()
    found = asyncio.run(critic.assess(*turn))
    return found, _runs() - before


@pytest.fixture(scope="module")
def shipped():
    path = shipped_bundle()
    if path is None:
        pytest.skip("no shipped critic bundle")
    critic = OnnxCritic.load(path, "cpu")
    yield critic
    critic.close()


@pytest.mark.parametrize("turn", [TEXT, TOOL], ids=["text", "tool"])
def test_turns_score_the_same_without_running_the_encoder(shipped, turn):
    # The shipped head gives the encoder weight 0 on every kind of turn (REPORT.md, a6cee4009e51).
    assert shipped.encoder_unread == {"text", "tool", "agent"}
    skipped, runs = _assess(shipped, turn)
    assert runs == 0 and all("encoder" not in a.features and "encoder" not in a.contributions for a in skipped)
    shipped.encoder_unread = frozenset()  # as before: the encoder read, and weighted 0
    try:
        read, runs_read = _assess(shipped, turn)
    finally:
        shipped.encoder_unread = frozenset({"text", "tool", "agent"})
    assert runs_read == 1 and all(math.isfinite(a.features["encoder"]) for a in read)
    assert [a.score for a in skipped] == [a.score for a in read]
    assert [{k: v for k, v in a.features.items() if k != "encoder"} for a in read] == [a.features for a in skipped]


def shipped_reading_the_encoder(folder: Path, kind: str) -> Path:
    """A copy of the shipped bundle whose `kind` head gives the encoder weight 0.5, so it runs there."""
    source = shipped_bundle()
    if source is None:
        pytest.skip("no shipped critic bundle")
    bundle = Path(shutil.copytree(source, folder))
    head = json.loads((bundle / "head.json").read_text())
    linear = head["heads"][kind]
    linear["weights"][linear["features"].index("encoder")] = 0.5
    (bundle / "head.json").write_text(json.dumps(head))
    return bundle


@pytest.mark.parametrize(("kind", "turn", "unread"), [("text", TEXT, {"tool", "agent"}),
                                                      ("tool", TOOL, {"text"})])
def test_a_head_that_weights_the_encoder_runs_it(tmp_path, kind, turn, unread):
    critic = OnnxCritic.load(shipped_reading_the_encoder(tmp_path / "bundle", kind), "cpu")
    try:
        assert critic.encoder_unread == unread  # agent turns are scored by the tool head
        found, runs = _assess(critic, turn)
        assert runs == 1 and all(math.isfinite(a.features["encoder"]) and "encoder" in a.contributions
                                 for a in found)
    finally:
        critic.close()


# --- the session of a model nothing runs ----------------------------------------------------------

def test_a_head_that_reads_no_encoder_lets_the_session_go_once_the_bundle_is_checked():
    # Checked at load like any bundle (model inputs, a smoke run), then let go: about 95 MB a worker
    # (bench/serve_memory.py). The provider is the one the check ran on, where the encoder would run.
    critic = OnnxCritic.load(shipped_bundle() or pytest.skip("no shipped critic bundle"), "cpu")
    try:
        assert critic.session is None
        assert critic.provider == "CPUExecutionProvider"
        assert critic.info()["threads"]["intra_op"] >= 1
        assert asyncio.run(critic.score(*TOOL)) == asyncio.run(critic.score(*TOOL))  # serves without it
        assert critic.session is None
    finally:
        critic.close()


def test_the_encoder_still_runs_on_demand_after_its_session_was_let_go():
    critic = OnnxCritic.load(shipped_bundle() or pytest.skip("no shipped critic bundle"), "cpu")
    try:
        assert critic.session is None
        scores = critic.run({"input_ids": np.full((2, 8), 1000, dtype=np.int64),
                             "attention_mask": np.ones((2, 8), dtype=np.int64),
                             "token_type_ids": np.zeros((2, 8), dtype=np.int64)})
        assert scores.shape == (2,) and np.all((scores > 0) & (scores < 1))
        assert critic.session is not None  # opened again, and kept from then on
    finally:
        critic.close()
    assert critic.session is None
    with pytest.raises(RuntimeError, match="closed"):
        critic.open_session()


def test_a_broken_model_is_refused_even_where_the_head_would_not_read_it(tmp_path):
    source = shipped_bundle()
    if source is None:
        pytest.skip("no shipped critic bundle")
    bundle = Path(shutil.copytree(source, tmp_path / "bundle"))
    (bundle / "model.onnx").write_bytes(b"not an onnx model")
    with pytest.raises(BundleError, match=r"model\.onnx does not load"):
        OnnxCritic.load(bundle, "cpu")


def test_a_head_that_weights_the_encoder_keeps_its_session(tmp_path):
    critic = OnnxCritic.load(shipped_reading_the_encoder(tmp_path / "bundle", "tool"), "cpu")
    try:
        assert critic.session is not None
    finally:
        critic.close()
