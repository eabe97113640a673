"""The critic's threads: a process's share of the cores under `turngate serve --workers N`, or what
the operator set (service/critic/threads.py)."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from service.critic import threads
from service.critic.threads import CriticThreads, plan
from tests.test_metrics_serve import scripted_actor, served_turngate

ADMIN_KEY = "tg-admin-7f3c9a1e5b2d8046"


def test_one_process_takes_every_core() -> None:
    assert plan(8) == CriticThreads(intra_op=8, runs=1, tokenizer=2)
    assert plan(1) == CriticThreads(intra_op=1, runs=1, tokenizer=1)


def test_workers_split_the_cores() -> None:
    assert plan(8, workers=2) == CriticThreads(intra_op=4, runs=1, tokenizer=2)
    assert plan(2, workers=2) == CriticThreads(intra_op=1, runs=1, tokenizer=1)
    assert plan(2, workers=4) == CriticThreads(intra_op=1, runs=1, tokenizer=1)  # never 0


def test_the_operators_threads_are_kept() -> None:
    assert plan(8, workers=4, intra_op=3, tokenizer=5) == CriticThreads(intra_op=3, runs=1, tokenizer=5)
    # One thread a run on a 4-core share: four batches run side by side.
    assert plan(4, intra_op=1) == CriticThreads(intra_op=1, runs=4, tokenizer=2)


def test_serve_workers_reads_what_serve_exports() -> None:
    assert threads.serve_workers({}) == 1
    assert threads.serve_workers({threads.WORKERS_ENV: "3"}) == 3
    assert threads.serve_workers({threads.WORKERS_ENV: "zero"}) == 1
    assert threads.serve_workers({threads.WORKERS_ENV: "0"}) == 1


def _critic_threads(url: str) -> dict:
    resp = httpx.get(url + "/v1/admin/critic", headers={"authorization": f"Bearer {ADMIN_KEY}"}, timeout=10)
    resp.raise_for_status()
    return resp.json()["critic"]["threads"]


@pytest.mark.parametrize("workers", [1, 2])
def test_serve_workers_share_the_cores(workers: int, tmp_path: Path) -> None:
    """Each worker of `turngate serve --workers N` runs the shipped critic on cores // N threads."""
    share = max(1, threads.cores() // workers)
    with scripted_actor() as actor, served_turngate(actor, tmp_path, workers=workers,
                                                    env={"TURNGATE_ADMIN_KEY": ADMIN_KEY}) as url:
        seen = [_critic_threads(url) for _ in range(4 * workers)]  # a request lands on any worker
    assert all(t == {"intra_op": share, "runs": 1, "tokenizer": min(2, share)} for t in seen), seen


def test_serve_keeps_the_operators_threads(tmp_path: Path) -> None:
    with scripted_actor() as actor, served_turngate(actor, tmp_path, workers=2, env={
            "TURNGATE_ADMIN_KEY": ADMIN_KEY, "TURNGATE_CRITIC_THREADS": "3",
            "TURNGATE_CRITIC_TOKENIZER_THREADS": "1"}) as url:
        assert _critic_threads(url) == {"intra_op": 3, "runs": 1, "tokenizer": 1}
