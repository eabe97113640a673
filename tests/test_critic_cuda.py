"""The critic under CUDA (IO binding, the GPU's kernels) scores as it does on the CPU. Runs where
onnxruntime has the CUDA provider and a GPU answers (the `gpu` extra on a GPU machine); skipped
elsewhere, CI included."""

from __future__ import annotations

import asyncio

import numpy as np
import onnxruntime as ort
import pytest

from service.critic.onnx_critic import CPU, CUDA, OnnxCritic
from service.critic.registry import shipped_bundle
from tests.test_critic_serving_bundles import CANDIDATES, MESSAGES, TOOLS

pytestmark = pytest.mark.skipif(CUDA not in ort.get_available_providers(), reason="onnxruntime without CUDA")

TURNS = [(MESSAGES, CANDIDATES, TOOLS), (MESSAGES, CANDIDATES[:2], None),
         (MESSAGES[1:], [{"role": "assistant", "content": "Cancelled: ABC123, refund in 5 days. " * 20}], None)]


@pytest.fixture(scope="module")
def critics():
    path = shipped_bundle()
    if path is None:
        pytest.skip("no shipped critic")
    gpu, cpu = OnnxCritic.load(path, "cuda"), OnnxCritic.load(path, "cpu")
    for critic in (gpu, cpu):
        critic.encoder_unread = frozenset()  # the encoder on every turn, text ones included: it is what is compared
    yield gpu, cpu
    gpu.close()
    cpu.close()


def test_named_cuda_runs_the_shipped_critic_there_and_scores_as_the_cpu(critics):
    gpu, cpu = critics
    if gpu.provider != CUDA:
        pytest.skip("onnxruntime has CUDA, but no GPU answered")
    assert cpu.provider == CPU
    for messages, candidates, tools in TURNS:
        here = asyncio.run(gpu.assess(messages, candidates, tools))
        there = asyncio.run(cpu.assess(messages, candidates, tools))
        # int8 kernels differ between the providers (as between CPU instruction sets): logits agree
        # to a few hundredths, and the head's scores closer still.
        assert np.allclose([a.features["encoder"] for a in here], [a.features["encoder"] for a in there], atol=0.05)
        assert np.allclose([a.score for a in here], [a.score for a in there], atol=0.01)


def test_turns_merged_on_the_gpu_score_as_alone(critics):
    gpu, _ = critics
    if gpu.provider != CUDA:
        pytest.skip("onnxruntime has CUDA, but no GPU answered")

    async def both() -> tuple[list[list[float]], list[list[float]]]:
        alone = [await gpu.score(*t) for t in TURNS]
        merged = await asyncio.gather(*(gpu.score(*t) for t in TURNS * 4))
        return alone, list(merged)
    alone, merged = asyncio.run(both())
    # int8's dynamic quantization takes its scales over the whole run: a merged run moves a score in
    # the third decimal (0.004 on the CPU), no more.
    for i, scores in enumerate(merged):
        assert np.allclose(scores, alone[i % len(TURNS)], atol=0.01)
