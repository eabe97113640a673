"""Trajectory JSONL in and out: the shared trajectories survive import -> export unchanged; live
turns export with their candidates, scores and the latest reward; retention prunes old ones."""

# ruff: noqa: F811 - the fixtures are imported from tests.test_store_support

from __future__ import annotations

import io
import json
from datetime import UTC, datetime, timedelta

from sqlalchemy import select
from typer.testing import CliRunner

from service.cli import app
from service.store.engine import make_sync_engine
from service.store.models import Candidate
from service.store.prune import prune
from service.store.sink import StoreSink
from service.store.transfer import export_trajectories, import_trajectories
from tests.test_store_support import db_url, make_pg_db, record, shared_pg_db, store_turns  # noqa: F401 - fixtures
from tests.test_store_writer import TRAJECTORIES, needs_trajectories

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _export(url: str, **kw) -> list[dict]:
    buf = io.StringIO()
    n = export_trajectories(url, buf, kw.pop("since", EPOCH),
                            kw.pop("until", datetime.now(UTC) + timedelta(minutes=1)), **kw)
    lines = [json.loads(x) for x in buf.getvalue().splitlines()]
    assert n == len(lines)
    return lines


@needs_trajectories
def test_shared_trajectories_round_trip_through_the_cli(db_url, tmp_path):
    files = sorted(TRAJECTORIES.glob("*.jsonl"))
    runner = CliRunner()
    res = runner.invoke(app, ["import", *map(str, files), "--url", db_url])
    assert res.exit_code == 0, res.output
    again = runner.invoke(app, ["import", str(files[0]), "--url", db_url])  # idempotent
    assert again.exit_code == 0, again.output
    out = tmp_path / "export.jsonl"
    res = runner.invoke(app, ["export", "--out", str(out), "--url", db_url])
    assert res.exit_code == 0, res.output

    given = {}
    for f in files:
        for line in f.read_text().splitlines():
            d = json.loads(line)
            given[d["id"]] = d
    exported = {d["id"]: d for d in map(json.loads, out.read_text().splitlines())}
    assert exported.keys() == given.keys()
    for key, traj in given.items():
        got = exported[key]
        assert {k: got[k] for k in traj} == traj  # messages, reward, task_id, gold_actions, ...
        assert len(got["turns"]) == sum(m["role"] == "assistant" for m in traj["messages"])


async def test_live_turns_export_with_candidates_scores_and_latest_reward(db_url, tmp_path):
    first = record([{"role": "user", "content": "hello"}], "hi there")
    second = record([{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi there"},
                     {"role": "user", "content": "bye"}], "goodbye")
    other = record([{"role": "user", "content": "unrelated"}], "ok")
    other.route = "other-route"
    sink = StoreSink(db_url, tmp_path / "spool")
    await sink.start()
    for r in (first, second, other):
        sink.enqueue(r)
    assert await sink.flush()
    from service.store.feedback import FeedbackIn, record_feedback
    for reward in (0.2, 0.9):  # the latest wins
        # key k1: record()'s
        await record_feedback(sink, FeedbackIn(second.turn_id, None, reward, "solved", None, "api", None, "k1"))
    await sink.stop()

    lines = _export(db_url, route="gpt-test")
    assert len(lines) == 1
    (conv,) = lines
    assert conv["messages"] == second.request_messages + [{"role": "assistant", "content": "goodbye"}]
    assert conv["reward"] == 0.9 and conv["label"] == "solved"
    assert [t["turn_id"] for t in conv["turns"]] == [first.turn_id, second.turn_id]
    assert [c["score"] for c in conv["turns"][1]["candidates"]] == [c.score for c in second.candidates]
    assert conv["turns"][1]["chosen_index"] == 1 and conv["turns"][1]["decision"] == "ranked"
    assert len(_export(db_url)) == 2
    assert _export(db_url, until=datetime.now(UTC) - timedelta(hours=1)) == []


async def test_candidates_keep_the_upstreams_usage_logprobs_and_request_id(db_url, tmp_path):
    turn = record([{"role": "user", "content": "hello"}], "hi there")
    usage = {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120,
             "prompt_tokens_details": {"cached_tokens": 64}, "completion_tokens_details": {"reasoning_tokens": 8}}
    logprobs = {"content": [{"token": "hi", "logprob": -0.01, "bytes": [104, 105], "top_logprobs": []},
                            {"token": " there", "logprob": -0.2, "bytes": None, "top_logprobs": []}], "refusal": None}
    for c in turn.candidates:
        c.usage, c.upstream_request_id = usage, f"req_{c.index}"
    turn.candidates[1].logprobs = logprobs
    await store_turns(db_url, tmp_path, turn)

    engine = make_sync_engine(db_url)
    with engine.connect() as conn:
        rows = conn.execute(select(Candidate.idx, Candidate.usage, Candidate.logprobs, Candidate.upstream_request_id)
                            .where(Candidate.turn_id == turn.turn_id).order_by(Candidate.idx)).all()
    engine.dispose()
    assert [tuple(r) for r in rows] == [(i, usage, logprobs if i == 1 else None, f"req_{i}") for i in range(4)]
    (conv,) = _export(db_url)
    cands = conv["turns"][0]["candidates"]
    assert [c["usage"] for c in cands] == [usage] * 4
    assert [c.get("logprobs") for c in cands] == [None, logprobs, None, None]


async def test_prune_deletes_only_old_conversations(db_url, tmp_path):
    old = [record([{"role": "user", "content": f"old {i}"}], "a") for i in range(7)]
    for r in old:
        r.created_at -= 40 * 86400
    new = record([{"role": "user", "content": "new"}], "b")
    sink = StoreSink(db_url, tmp_path / "spool")
    await sink.start()
    for r in (*old, new):
        sink.enqueue(r)
    assert await sink.flush()
    await sink.stop()
    assert prune(db_url, timedelta(days=30), batch=3) == {"conversations": 7, "turns": 7}
    res = CliRunner().invoke(app, ["db", "prune", "--older-than", "30d", "--url", db_url])
    assert res.exit_code == 0 and "deleted 0 conversations" in res.output
    left = _export(db_url)
    assert [t["turn_id"] for c in left for t in c["turns"]] == [new.turn_id]
    assert len(left[0]["turns"][0]["candidates"]) == 4


@needs_trajectories
async def test_import_api_counts(db_url):
    lines = min(TRAJECTORIES.glob("*.jsonl")).read_text().splitlines()[:3]
    counts = await import_trajectories(db_url, lines)
    assert counts["conversations"] == 3 and counts["rewards"] == 3
    assert counts["turns"] == sum(m["role"] == "assistant" for x in lines for m in json.loads(x)["messages"])


async def test_exported_turns_are_candidate_groups_for_the_critic(db_url, tmp_path):
    """A logged turn's N candidates come back as one group, features included: vetoed ones
    labelled invalid, the chosen one labelled by the conversation's outcome."""
    from critic_models.head_data import exported_items

    tools = [{"type": "function", "function": {"name": "get_order", "parameters": {"type": "object"}}}]
    first = record([{"role": "user", "content": "hello"}], "hi there")
    second = record([{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi there"},
                     {"role": "user", "content": "where is order 7?"}], "let me look")
    second.tools = tools
    second.candidates[3].verdict, second.candidates[3].veto_reason = "veto", "empty"
    second.candidates[0].features = {"call_support": 0.25}
    sink = StoreSink(db_url, tmp_path / "spool")
    await sink.start()
    for r in (first, second):
        sink.enqueue(r)
    assert await sink.flush()
    from service.store.feedback import FeedbackIn, record_feedback
    await record_feedback(sink, FeedbackIn(second.turn_id, None, 1.0, None, None, "api", None, "k1"))
    await sink.stop()

    (line,) = _export(db_url)
    assert line["tools"] == tools
    assert line["turns"][1]["candidates"][0]["features"] == {"call_support": 0.25}
    items = exported_items(line, "export.jsonl")
    assert len(items) == 2
    item = items[1]
    assert item.messages == second.request_messages
    assert item.candidates == [c.message for c in second.candidates] and item.tools == tools
    assert item.labels == [None, 1.0, None, 0.0]


async def test_export_carries_the_judges_labels_and_verdicts_to_the_cascade_replay(db_url, tmp_path):
    """What `turngate critic label` and the LLM critic wrote comes out with the turn, so that
    `turngate replay --cascade` on an export scores picks against the judge's labels."""
    from service.gate import replay_cascade
    from service.store.labels import write_labels

    turn = record([{"role": "user", "content": "weather in Paris?"}], "sunny")
    turn.decided_by, turn.judge_reason, turn.critics_agreed = "llm", "margin", False
    turn.candidates[1].judge_score, turn.candidates[1].judge_reason = 0.9, "answers the question"
    await store_turns(db_url, tmp_path, turn)
    engine = make_sync_engine(db_url)
    try:
        write_labels(engine, [{"turn_id": turn.turn_id, "candidate_idx": 0, "labeler": "judge:m@1", "score": 0.0,
                               "reason": "wrong city"},
                              {"turn_id": turn.turn_id, "candidate_idx": 1, "labeler": "judge:m@1", "score": 1.0,
                               "reason": None},
                              {"turn_id": turn.turn_id, "candidate_idx": 1, "labeler": "outcome", "score": 1.0,
                               "reason": None}])
    finally:
        engine.dispose()

    (line,) = _export(db_url)
    (exported,) = line["turns"]
    assert (exported["decided_by"], exported["judge_reason"], exported["critics_agreed"]) == ("llm", "margin", False)
    cands = exported["candidates"]
    assert cands[0]["labels"] == [{"labeler": "judge:m@1", "score": 0.0, "reason": "wrong city"}]
    assert cands[1]["labels"] == [{"labeler": "judge:m@1", "score": 1.0, "reason": None},
                                  {"labeler": "outcome", "score": 1.0, "reason": None}]
    assert (cands[1]["judge_score"], cands[1]["judge_reason"]) == (0.9, "answers the question")
    assert "labels" not in cands[2] and "judge_score" not in cands[0]
    (logged,) = replay_cascade.exported_turns(line)
    assert logged.labels[:2] == [0.0, 1.0]
