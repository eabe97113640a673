"""`turngate replay --cascade`: what a cascade setting would have sent to the judge, cut and changed,
on `turngate export` lines (hand-checkable turns, and turns written through the store and exported)."""

# ruff: noqa: F811 - the fixtures are imported from tests.test_store_support

from __future__ import annotations

import importlib.util
import io
import json
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import openai
import pytest
from typer.testing import CliRunner

from service.app import create_app
from service.cli import app
from service.critic.registry import load_critic
from service.demo.fake_actor import Reply, assistant, serve_in_thread
from service.gate import replay_cascade as rc
from service.gate.record import CandidateRecord
from service.settings import RouteSettings, Settings
from service.store.sink import StoreSink
from service.store.transfer import export_trajectories
from tests.test_store_support import db_url, make_pg_db, record, shared_pg_db  # noqa: F401 - fixtures

BENCH = Path(__file__).resolve().parents[1] / "bench" / "cascade.py"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def call(name: str, **args) -> dict:
    return {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}]}


def cand(i: int, message: dict, score: float, support: float, **kw) -> dict:
    return {"index": i, "round": 0, "message": message, "verdict": "ok", "score": score,
            "features": {"call_support": support, "is_text": 0.0}, **kw}


def turn(k: int, cands: list[dict], **kw) -> dict:
    return {"turn_id": f"t{k}", "index": k, "chosen_index": 0, "decision": "ranked",
            "created_at": f"2026-11-01T10:00:0{k}+00:00", "candidates": cands, **kw}


PARIS, LONDON = call("get_weather", city="Paris"), call("get_weather", city="London")
CANCEL = call("cancel_reservation", reservation_id="RESA")
USER = {"role": "user", "content": "x"}


def export_line() -> dict:
    """Four turns: a near tie (margin), a pick only 1 of 4 samples makes (agreement), a write all
    samples agree on (write), and a clear read all samples agree on (sure)."""
    turns = [
        turn(0, [cand(0, PARIS, 0.80, 0.5), cand(1, LONDON, 0.78, 0.5)],
             candidate_labels=[{"candidate_idx": 0, "labeler": "judge:m@1", "score": 0.0},
                               {"candidate_idx": 1, "labeler": "judge:m@1", "score": 1.0}]),
        turn(1, [cand(0, PARIS, 0.90, 0.25), cand(1, LONDON, 0.30, 0.75), cand(2, LONDON, 0.30, 0.75),
                 cand(3, LONDON, 0.30, 0.75)]),
        turn(2, [cand(0, CANCEL, 0.90, 1.0), cand(1, CANCEL, 0.90, 1.0)]),
        turn(3, [cand(0, PARIS, 0.90, 1.0, labels={"judge:m@1": 1.0}),
                 cand(1, PARIS, 0.90, 1.0, labels=[{"labeler": "judge:m@1", "score": 1.0}])]),
    ]
    messages = []
    for k in range(4):
        messages += [USER, turns[k]["candidates"][0]["message"]]
    return {"id": "conv", "conversation_id": "conv", "reward": None, "messages": messages, "turns": turns}


def test_each_doubt_is_counted_and_max_share_cuts_in_logged_order():
    turns = rc.load_turns([export_line()])
    [every, half, narrow] = [rc.replay(turns, rc.parse_setting(s)) for s in (
        "margin=0.1,min_agreement=0.5,on_write=true,max_share=1",
        "margin=0.1,min_agreement=0.5,on_write=true,max_share=0.5",
        "margin=0.05,min_agreement=0.25,on_write=false,max_share=1")]
    assert every["by_reason"] == {"margin": 1, "agreement": 1, "write": 1} and every["share"] == 0.75
    # Half of the turns so far, this one included: turn 0 (1 of 1) is cut, turn 1 (1 of 2) goes,
    # turn 2 (2 of 3) is cut, turn 3 is not in doubt.
    assert half["sent"] == 1 and half["by_reason"]["agreement"] == 1 and half["cut"] == {"share": 2, "tokens": 0}
    assert narrow["by_reason"] == {"margin": 1, "agreement": 0, "write": 0}  # 0.02 < 0.05; 0.25 is not < 0.25


def test_the_judges_labels_show_how_the_pick_changes_and_the_tokens_follow_the_characters():
    turns = rc.load_turns([export_line()])
    result = rc.replay(turns, rc.parse_setting("max_share=1"))
    picks = result["picks"]
    # Turn 0: the judge prefers London where the encoder picked Paris; turn 3 (trusted) agrees.
    assert picks["judged_labelled"] == 1 and picks["changed"] == 1
    assert (picks["label_before"], picks["label_after"]) == (0.0, 1.0)
    assert picks["trusted_labelled"] == 1 and picks["trusted_agree"] == 1.0
    first = turns[0]
    chars = len(json.dumps([USER], separators=(",", ":"))) + sum(
        len(json.dumps(m, separators=(",", ":"))) for m in (PARIS, LONDON))
    assert first.judge_tokens() == chars // 4 + 2 * rc.REPLY_TOKENS_PER_CANDIDATE
    assert result["judge_tokens"] == sum(t.judge_tokens() for t in turns[:3])
    assert result["judge_tokens_per_1000_turns"] == round(1000 * result["judge_tokens"] / 4)


def test_tokens_per_hour_cut_where_turns_carry_times():
    turns = rc.load_turns([export_line()])
    budget = turns[0].judge_tokens() + 1  # room for the first judged turn only, in the same hour
    result = rc.replay(turns, rc.parse_setting(f"max_share=1,max_tokens_per_hour={budget}"))
    assert result["sent"] == 1 and result["cut"] == {"share": 0, "tokens": 2}


def test_cli_compares_settings_and_refuses_a_bad_one(tmp_path):
    data = tmp_path / "export.jsonl"
    data.write_text(json.dumps(export_line()) + "\n")
    out = tmp_path / "rep"
    two = "on_write=false,max_share=1;margin=0.05,min_agreement=0.25,on_write=false,max_share=1"
    res = CliRunner().invoke(app, ["replay", str(data), "--out", str(out), "--cascade", "max_share=1",
                                   "--cascade", two])
    assert res.exit_code == 0, res.output
    assert "4 turns." in res.output and "pick changed on 1" in res.output
    results = json.loads((out / "cascade.json").read_text())["results"]
    assert [r["sent"] for r in results] == [3, 2, 1]
    bad = CliRunner().invoke(app, ["replay", str(data), "--cascade", "margin=0.1,max_share=2"])
    assert bad.exit_code != 0 and "max_share" in bad.output
    bad = CliRunner().invoke(app, ["replay", str(data), "--cascade", "threshold=0.1"])
    assert bad.exit_code != 0 and "threshold" in bad.output


def test_trajectory_lines_are_lone_turns_where_only_writes_count(tmp_path):
    rows = [{"id": "a", "reward": 1.0, "messages": [USER, {"role": "assistant", "content": "sure?"}, USER, CANCEL]},
            {"id": "b", "reward": 0.0, "messages": [USER, PARIS, USER, {"role": "assistant", "content": "done"}]}]
    data = tmp_path / "traj.jsonl"
    data.write_text("\n".join(map(json.dumps, rows)))
    res = CliRunner().invoke(app, ["replay", str(data), "--out", str(tmp_path / "rep"),
                                   "--cascade", "margin=0.5,min_agreement=1,on_write=true,max_share=1"])
    assert res.exit_code == 0, res.output
    assert "4 turns; 4 lone turns" in res.output
    (result,) = json.loads((tmp_path / "rep" / "cascade.json").read_text())["results"]
    assert result["sent"] == 1 and result["by_reason"] == {"margin": 0, "agreement": 0, "write": 1}


async def test_turns_written_through_the_store_replay_from_its_export(db_url, tmp_path):
    """The export's own format: a ranked turn whose top two replies differ by less than the margin,
    and one whose samples all make the same write call."""
    close = record([USER], PARIS)
    close.candidates = [CandidateRecord(index=i, round=0, message=m, score=s,
                                        features={"call_support": 0.5, "is_text": 0.0})
                        for i, (m, s) in enumerate([(PARIS, 0.81), (LONDON, 0.80)])]
    close.chosen_index = 0
    write = record([USER, PARIS, USER], CANCEL)
    write.candidates = [CandidateRecord(index=i, round=0, message=CANCEL, score=0.9,
                                        features={"call_support": 1.0, "is_text": 0.0}) for i in range(3)]
    write.chosen_index = 0
    sink = StoreSink(db_url, tmp_path / "spool")
    await sink.start()
    for r in (close, write):
        sink.enqueue(r)
    assert await sink.flush()
    await sink.stop()
    buf = io.StringIO()
    export_trajectories(db_url, buf, datetime(1970, 1, 1, tzinfo=UTC), datetime.now(UTC) + timedelta(minutes=1))
    rows = [json.loads(x) for x in buf.getvalue().splitlines()]
    turns = rc.load_turns(rows)
    assert len(turns) == 2 and not any(t.lone for t in turns)
    [both, reads] = [rc.replay(turns, rc.parse_setting(s)) for s in ("max_share=1", "on_write=false,max_share=1")]
    assert both["by_reason"] == {"margin": 1, "agreement": 0, "write": 1}
    assert reads["by_reason"] == {"margin": 1, "agreement": 0, "write": 0}


TOOLS = [{"type": "function", "function": {"name": n, "parameters": {
    "type": "object", "properties": {k: {"type": "string"}}, "required": [k]}}}
    for n, k in (("get_weather", "city"), ("cancel_reservation", "reservation_id"))]


def test_a_served_run_exported_from_the_store_replays(actor, scripted, tmp_path):
    """Turns served by the gate with the shipped critic (its features logged), exported by
    `turngate export`: four samples making the same write call are in doubt only for on_write;
    four making the same read are sure (the same reply four times: no margin, full agreement)."""
    _, actor_url = actor

    def reply(body, i):
        ask = body["messages"][-1]["content"]
        return Reply([assistant(None, [("cancel_reservation", {"reservation_id": "RESA"})] if "cancel" in ask
                                else [("get_weather", {"city": "Paris"})])])

    scripted.fn = reply
    url = f"sqlite:///{tmp_path}/store.db"
    route = RouteSettings(alias="gpt-test", upstream_base_url=actor_url, candidates=4, mode="rank",
                          attempt_timeout_s=10, deadline_s=20)
    sink = StoreSink(url, tmp_path / "spool", flush_interval_s=0.05)
    with serve_in_thread(create_app(Settings(routes=[route], database_url=url), critic=load_critic(Settings()),
                                    sink=sink)) as base:
        client = openai.OpenAI(base_url=base + "/v1", api_key="sk-test", max_retries=0)
        ids = []
        for ask in ("weather in Paris?", "cancel RESA please"):
            raw = client.chat.completions.with_raw_response.create(
                model="gpt-test", messages=[{"role": "user", "content": ask}], tools=TOOLS)
            ids.append(raw.headers["x-turngate-turn-id"])
        deadline = time.monotonic() + 10
        while any(i in sink.pending_ids for i in ids) and time.monotonic() < deadline:
            time.sleep(0.05)
    out = tmp_path / "export.jsonl"
    assert CliRunner().invoke(app, ["export", "--out", str(out), "--url", url]).exit_code == 0
    turns = rc.load_turns([json.loads(x) for x in out.read_text().splitlines()])
    assert len(turns) == 2 and all(len(t.replies) == 4 and t.scores is not None for t in turns)
    assert all(a == 1.0 for t in turns for a in t.agreement)  # the critic's logged call_support
    res = CliRunner().invoke(app, ["replay", str(out), "--out", str(tmp_path / "rep"),
                                   "--cascade", "max_share=1;on_write=false,max_share=1"])
    assert res.exit_code == 0, res.output
    writes, none = json.loads((tmp_path / "rep" / "cascade.json").read_text())["results"]
    assert writes["sent"] == 1 and writes["by_reason"]["write"] == 1 and none["sent"] == 0
    (cancel,) = [t for t in turns if "cancel_reservation" in json.dumps(t.replies)]
    assert writes["judge_tokens"] == cancel.judge_tokens() > 4 * rc.REPLY_TOKENS_PER_CANDIDATE


def _bench():
    spec = importlib.util.spec_from_file_location("bench_cascade", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not (SHARED / "tool-calls").is_dir(), reason="needs ../shared/data")
def test_bench_prints_the_grid_on_a_slice(tmp_path, capsys):
    _bench().main(["--limit", "2", "--draws", "2", "--margins", "0.1", "--agreements", "0.5",
                   "--logits-cache", str(tmp_path / "logits.json")])
    out = capsys.readouterr().out
    assert "judge: the data's own labels (a perfect judge" in out
    rows = [line for line in out.splitlines() if line.startswith("| 0.1 | 0.5 |")]
    assert len(rows) == 4  # on_write off and on, on BFCL and on the tau-bench sibling writes
    assert "bfcl-train.jsonl" in out and "share a write-only cascade sends" in out
    assert (tmp_path / "logits.json").is_file()
