"""Candidate labels in the store: structural vetoes and outcomes written by `turngate critic label`
(idempotent; an outcome follows the latest reward), the precedence training reads them with, and the
judge reply parse that keeps garbage from ever becoming a label."""

# ruff: noqa: F811 - the fixtures are imported from tests.test_store_support
from __future__ import annotations

import asyncio
import time
from datetime import timedelta

import pytest
from sqlalchemy import insert
from typer.testing import CliRunner

from service.cli import app as cli_app
from service.critic.llm_critic import JudgeError, read_answer, request_body
from service.store.engine import make_async_engine, make_sync_engine
from service.store.labels import Window, label_of, labelled_turns, write_labels
from service.store.models import Feedback
from service.store.prune import prune
from service.store.writer import LinkCache, prepare, utc, write_batch
from tests.test_store_support import db_url, make_pg_db, record, shared_pg_db  # noqa: F401 - fixtures


def store(url: str, records) -> None:
    async def go() -> None:
        engine = make_async_engine(url)
        try:
            async with engine.begin() as conn:
                await write_batch(conn, prepare(records, engine.dialect.name == "postgresql"), LinkCache())
        finally:
            await engine.dispose()

    asyncio.run(go())


def feedback(url: str, rows: list[dict], later_s: float = 0.0) -> None:
    """Feedback rows, one second apart in the given order (`later_s` after now)."""
    engine = make_sync_engine(url)
    try:
        with engine.begin() as conn:
            for i, row in enumerate(rows):
                conn.execute(insert(Feedback), {"turn_id": None, "conversation_id": None, "source": "test",
                                                "client_id": f"fb-{time.time_ns()}-{i}",
                                                "created_at": utc(time.time() + later_s + i), **row})
    finally:
        engine.dispose()


def labels(url: str) -> dict[tuple[str, int, str], float]:
    engine = make_sync_engine(url)
    try:
        return {(t.turn_id, k, lab): y for t in labelled_turns(engine, Window())
                for k, ls in zip(t.indices, t.labels) for lab, y in ls.items()}
    finally:
        engine.dispose()


def label_cli(url: str):
    return CliRunner().invoke(cli_app, ["critic", "label", "--database-url", url])


def test_vetoes_and_outcomes_become_labels_and_rerunning_changes_nothing(db_url):
    vetoed = record([{"role": "user", "content": "cancel ABC"}], "done", header="conv-a")
    vetoed.candidates[2].verdict, vetoed.candidates[2].veto_reason = "veto", "unknown_tool"
    rewarded = record([{"role": "user", "content": "book XYZ"}], "booked", header="conv-b")
    store(db_url, [vetoed, rewarded])
    engine = make_sync_engine(db_url)
    with engine.connect() as conn:
        convs = dict(conn.exec_driver_sql("SELECT id, conversation_id FROM turns").all())
    engine.dispose()
    conv_a, conv_b = convs[vetoed.turn_id], convs[rewarded.turn_id]
    # conversation a: two rewards, the later wins; turn b: its own reward beats its conversation's
    feedback(db_url, [{"conversation_id": conv_a, "reward": 0.2}, {"conversation_id": conv_a, "reward": 0.8},
                      {"conversation_id": conv_b, "reward": 0.9}, {"turn_id": rewarded.turn_id, "reward": 0.3}])

    result = label_cli(db_url)
    assert result.exit_code == 0, result.output
    assert "structural labels: 1 vetoes, 2 outcomes" in result.output
    found = labels(db_url)
    assert found == {(vetoed.turn_id, 2, "veto"): 0.0, (vetoed.turn_id, 1, "outcome"): 0.8,
                     (rewarded.turn_id, 1, "outcome"): 0.3}
    assert label_cli(db_url).exit_code == 0 and labels(db_url) == found  # a rerun adds nothing

    feedback(db_url, [{"turn_id": rewarded.turn_id, "reward": 1.0}], later_s=60)  # newer: the outcome follows
    label_cli(db_url)
    assert labels(db_url)[(rewarded.turn_id, 1, "outcome")] == 1.0


def test_a_judge_label_outranks_a_veto_and_an_outcome(db_url):
    turn = record([{"role": "user", "content": "hi"}], "hello", n=3, header="conv-c")
    turn.candidates[2].verdict = "veto"
    store(db_url, [turn])
    engine = make_sync_engine(db_url)
    try:
        write_labels(engine, [{"turn_id": turn.turn_id, "candidate_idx": 2, "labeler": "veto", "score": 0.0},
                              {"turn_id": turn.turn_id, "candidate_idx": 1, "labeler": "outcome", "score": 1.0},
                              {"turn_id": turn.turn_id, "candidate_idx": 1, "labeler": "judge:m@1", "score": 0.2,
                               "reason": "it guesses"},
                              {"turn_id": turn.turn_id, "candidate_idx": 1, "labeler": "judge:m@2", "score": 0.4}])
        # written twice: the unique constraint keeps the first
        write_labels(engine, [{"turn_id": turn.turn_id, "candidate_idx": 1, "labeler": "judge:m@1", "score": 0.9}])
        (got,) = labelled_turns(engine, Window())
        assert [label_of(x) for x in got.labels] == [None, pytest.approx(0.3), 0.0]
        (only_v1,) = labelled_turns(engine, Window(), ["judge:m@1", "veto"])
        assert [label_of(x) for x in only_v1.labels] == [None, 0.2, 0.0]
        assert labelled_turns(engine, Window(), ["judge:other"]) == []
        prune(db_url, timedelta(0))  # retention takes a conversation's labels with its turns
        with engine.connect() as conn:
            assert conn.exec_driver_sql("SELECT count(*) FROM candidate_labels").scalar() == 0
    finally:
        engine.dispose()


def test_the_judge_request_holds_the_context_the_tools_and_every_candidate():
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    body = request_body("m", [{"role": "user", "content": "q"}], [{"role": "assistant", "content": "a"},
                                                                 {"role": "assistant", "content": "b"}],
                      tools, rubric="Prefer short answers.")
    assert body["response_format"]["json_schema"]["strict"] is True
    assert body["messages"][0]["content"].endswith("Prefer short answers.")
    case = body["messages"][1]["content"]  # the serving LLM critic's prompt: tools, conversation, candidates
    assert '"name":"f"' in case.replace(" ", "") and "q" in case
    assert "### Candidate 0\na" in case and "### Candidate 1\nb" in case


@pytest.mark.parametrize("content", [
    "I like the first one.",
    '{"scores": []}',
    '{"candidates": [{"index": 0, "score": 0.5, "reason": "x"}]}',  # one of two
    '{"candidates": [{"index": 0, "score": 0.5, "reason": "x"}, {"index": 0, "score": 1, "reason": "y"}]}',
    '{"candidates": [{"index": 0, "score": 1.5, "reason": "x"}, {"index": 1, "score": 1, "reason": "y"}]}',
    '{"candidates": [{"index": 0, "score": true, "reason": "x"}, {"index": 1, "score": 1, "reason": "y"}]}',
    '{"candidates": [{"index": 0, "score": 0, "reason": "x"}, {"index": 2, "score": 1, "reason": "y"}]}',
    '{"candidates": [{"index": 0, "score": NaN, "reason": "x"}, {"index": 1, "score": 1, "reason": "y"}]}',
])
def test_a_garbage_judgement_is_refused(content):
    with pytest.raises(JudgeError):
        read_answer(content, 2)


def test_a_fenced_judgement_is_read_in_index_order():
    got = read_answer('```json\n{"candidates": [{"index": 1, "score": 0, "reason": "no"}, '
                        '{"index": 0, "score": 1, "reason": "yes"}]}\n```', 2)
    assert [(j.score, j.reason) for j in got] == [(1.0, "yes"), (0.0, "no")]


async def test_the_pacer_spaces_requests_at_the_rate():
    from critic_models.teacher import Pacer

    pacer = Pacer(20.0)
    started = time.monotonic()
    await asyncio.gather(*(pacer.wait() for _ in range(6)))
    assert 0.25 - 0.02 <= time.monotonic() - started < 1.0  # five gaps of 50 ms after the first
