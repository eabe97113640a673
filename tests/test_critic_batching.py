"""The critic's micro-batcher with a real onnxruntime session: concurrent turns share runs, runs
stay within the row and token caps, every turn keeps the scores it would get alone, and identical
candidates are scored once."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from service.critic.batcher import MicroBatcher
from service.critic.onnx_critic import CPU_RUN_TOKENS, OnnxCritic
from service.telemetry import metrics
from tests.test_critic_serving_bundles import CANDIDATES, MESSAGES, build_bundle, direct_scores

pytest.importorskip("torch")  # the fixture bundle is exported from a tiny torch model


@pytest.fixture(scope="module")
def critic(tmp_path_factory):
    c = OnnxCritic.load(build_bundle(tmp_path_factory.mktemp("bundle") / "v1", version="1", seed=1),
                        "CPUExecutionProvider", max_wait_s=0.02)
    yield c
    c.close()


def test_concurrent_turns_share_runs_and_keep_their_own_scores(critic):
    turns = [(MESSAGES + [{"role": "user", "content": "more context " * i}], CANDIDATES[: 1 + i % 3])
             for i in range(12)]
    alone = [asyncio.run(critic.score(m, c)) for m, c in turns]
    runs_before = metrics.CRITIC_BATCH._sum.get(), sum(b.get() for b in metrics.CRITIC_BATCH._buckets)

    async def together():
        return await asyncio.gather(*(critic.score(m, c) for m, c in turns))

    merged = asyncio.run(together())
    rows = metrics.CRITIC_BATCH._sum.get() - runs_before[0]
    runs = sum(b.get() for b in metrics.CRITIC_BATCH._buckets) - runs_before[1]
    for a, b in zip(alone, merged, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)  # padding to a wider batch changes nothing
    assert rows == sum(len(c) for _, c in turns)
    assert runs < len(turns)  # merged into fewer inference runs than turns


def test_a_turn_larger_than_the_batch_cap_is_split(critic):
    c = OnnxCritic.load(critic.bundle.path, max_batch=4)
    many = [{"role": "assistant", "content": f"reply number {i}"} for i in range(11)]
    try:
        scores = asyncio.run(c.score(MESSAGES, many))
    finally:
        c.close()
    np.testing.assert_allclose(scores, direct_scores(critic.bundle.path, MESSAGES, many), rtol=1e-5)


def test_runs_stay_within_the_token_cap_and_keep_each_turns_scores(critic):
    """A CPU critic caps the padded tokens of a run: small turns still merge, a turn over the cap
    is split, and no turn's scores change."""
    seen: list[tuple[int, int]] = []

    def run(feed):
        seen.append(feed["input_ids"].shape)
        return critic.run(feed)

    long_turn = [{"role": "assistant", "content": f"reply number {i} " + "words " * 30} for i in range(9)]
    turns = [(MESSAGES, CANDIDATES[:1]), (MESSAGES, CANDIDATES[:2]), (MESSAGES, CANDIDATES), (MESSAGES, long_turn)]
    feeds = [critic.encode(m, c, None) for m, c in turns]
    cap = 4 * max(f["input_ids"].shape[1] for f in feeds[:3])  # 4 rows of the small turns; fewer of the long one
    pool = ThreadPoolExecutor(1)
    batcher = MicroBatcher(run, pool, 1, pad_ids={"input_ids": 0}, max_tokens=cap, max_wait_s=0.05)

    async def together():
        return await asyncio.gather(*(batcher.submit(f) for f in feeds))

    try:
        merged = asyncio.run(together())
    finally:
        batcher.close()
        pool.shutdown()
    for feed, scores in zip(feeds, merged, strict=True):
        np.testing.assert_allclose(scores, critic.run(feed), rtol=1e-5, atol=1e-6)
    assert all(rows * width <= cap for rows, width in seen)
    assert sum(rows for rows, _ in seen) == sum(len(f["input_ids"]) for f in feeds)
    assert any(rows > 1 and width < feeds[3]["input_ids"].shape[1] for rows, width in seen)  # small turns merged
    long_rows = [rows for rows, width in seen if width == feeds[3]["input_ids"].shape[1]]
    assert sum(long_rows) == 9 and len(long_rows) > 1  # the long turn ran in slices


def test_a_cpu_critic_caps_run_tokens_by_default(critic):
    assert critic.batcher.max_tokens == CPU_RUN_TOKENS
    c = OnnxCritic.load(critic.bundle.path, "CPUExecutionProvider", max_tokens=100_000)
    c.close()
    assert c.batcher.max_tokens == 100_000


def test_identical_candidates_are_scored_once(critic):
    rows_before = metrics.CRITIC_BATCH._sum.get()
    scores = asyncio.run(critic.score(MESSAGES, [CANDIDATES[0], CANDIDATES[2], CANDIDATES[0], dict(CANDIDATES[0])]))
    assert metrics.CRITIC_BATCH._sum.get() - rows_before == 2  # two distinct candidates, two rows
    assert scores[0] == scores[2] == scores[3] != scores[1]
    assert scores == pytest.approx(list(direct_scores(critic.bundle.path, MESSAGES,
                                                      [CANDIDATES[0], CANDIDATES[2]] * 2)[[0, 1, 0, 0]]), rel=1e-5)
