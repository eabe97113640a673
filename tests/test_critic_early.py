"""Encodings started while a turn's other candidates are still out (service/critic/early.py): the
candidates in hand are encoded before the slowest call returns, each distinct one once, and the
scores are the ones the critic gives the whole round at once."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import numpy as np
import pytest

from service.critic.early import EarlyEncoder
from service.critic.onnx_critic import OnnxCritic
from service.demo.fake_actor import Reply, assistant
from service.telemetry import metrics
from tests.test_critic_serving_bundles import CANDIDATES, MESSAGES, build_bundle, direct_scores

pytest.importorskip("torch")  # the fixture bundle is exported from a tiny torch model


@pytest.fixture(scope="module")
def critic(tmp_path_factory):
    c = OnnxCritic.load(build_bundle(tmp_path_factory.mktemp("bundle") / "v1", version="1", seed=1),
                        "CPUExecutionProvider", max_wait_s=0.002)
    yield c
    c.close()


def rows_run() -> float:
    return metrics.CRITIC_BATCH._sum.get()


def test_early_encodings_give_the_scores_of_the_whole_round(critic):
    round_ = [CANDIDATES[0], CANDIDATES[1], dict(CANDIDATES[0]), CANDIDATES[2]]
    together = asyncio.run(critic.assess(MESSAGES, round_))

    async def as_they_come():
        early = critic.early(MESSAGES)
        try:
            early.add(round_[0])
            early.add(round_[2])  # identical to the first: no second encoding
            early.add(round_[1])
            await asyncio.sleep(0.05)
            before = rows_run()
            got = await critic.assess(MESSAGES, round_, early=early)  # only CANDIDATES[2] is left
            return got, rows_run() - before
        finally:
            early.close()

    before = rows_run()
    got, rows_in_assess = asyncio.run(as_they_come())
    assert rows_run() - before == 3  # each distinct candidate encoded once
    assert rows_in_assess == 1
    np.testing.assert_allclose([a.score for a in got], [a.score for a in together], rtol=1e-5, atol=1e-6)
    for a, b in zip(got, together, strict=True):
        assert a.features == pytest.approx(b.features, rel=1e-5)


def test_closing_cancels_encodings_not_yet_run(critic):
    async def abandoned():
        early = critic.early(MESSAGES)
        early.add(CANDIDATES[0])
        early.close()  # the turn ended (failed, client gone) before the encoding ran
        await asyncio.sleep(0.1)
        early.add(CANDIDATES[1])  # a call that came back after the round: ignored

    before = rows_run()
    asyncio.run(abandoned())
    assert rows_run() == before


def test_the_gate_encodes_candidates_while_the_slowest_is_out(gateway, scripted, critic):
    replies = [c["content"] for c in CANDIDATES]
    scripted.fn = lambda body, i: Reply([assistant(replies[i % 3])], delay_s=1.5 if i % 3 == 2 else 0.0)
    expected = direct_scores(critic.bundle.path, MESSAGES, [assistant(t) for t in replies])
    with gateway(critic=critic, candidates=3) as (url, sink):
        before = rows_run()
        answer: list[httpx.Response] = []
        turn = threading.Thread(target=lambda: answer.append(
            httpx.post(url + "/chat/completions", json={"model": "gpt-test", "messages": MESSAGES}, timeout=10)))
        turn.start()
        time.sleep(0.9)  # the two quick candidates are in, the slow one is not
        assert not answer
        assert rows_run() - before == 2
        turn.join()
    assert answer[0].status_code == 200, answer[0].text
    assert rows_run() - before == 3  # the slow one only: the others were not encoded again
    got = {c.message["content"]: c.score for c in sink.records[0].candidates}
    for text, s in zip(replies, expected, strict=True):
        assert got[text] == pytest.approx(s, rel=1e-5)
    assert sink.records[0].latency_critic_ms < 1000  # the critic waited for the last encoding only


def test_a_backlogged_critic_leaves_the_candidates_to_the_whole_round(critic):
    """While turns queue for a run, candidates are not encoded one by one: the round's rows go
    together, its context tokenized once."""
    async def busy_round():
        early = EarlyEncoder(critic.encoder_probs, MESSAGES, None, busy=lambda: True)
        early.add(CANDIDATES[0])
        before = rows_run()
        got = await critic.assess(MESSAGES, CANDIDATES, early=early)
        early.close()
        return got, rows_run() - before

    got, rows = asyncio.run(busy_round())
    assert rows == len(CANDIDATES)  # all of them in assess, none earlier
    alone = asyncio.run(critic.score(MESSAGES, CANDIDATES))
    np.testing.assert_allclose([a.score for a in got], alone, rtol=1e-5, atol=1e-6)
