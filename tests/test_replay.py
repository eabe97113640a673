"""`turngate replay`: per-threshold flags against outcomes and gold actions."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from service.cli import app
from service.gate import replay
from tests.conftest import TableCritic


def conv(cid, reward, replies, gold):
    messages = [{"role": "user", "content": "help"}]
    for r in replies:
        messages += [r, {"role": "user", "content": "ok"}]
    return {"id": cid, "reward": reward, "messages": messages, "gold_actions": gold}


def call(name, args):
    return {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}]}


GOLD = [{"name": "cancel_reservation", "arguments": {"reservation_id": "RESA"}}]
ROWS = [
    conv("solved", 1.0, [{"role": "assistant", "content": "Sure, confirm?"}, call("cancel_reservation",
                                                                                   {"reservation_id": "RESA"})], GOLD),
    conv("failed", 0.0, [{"role": "assistant", "content": "Sure, confirm?"}, call("cancel_reservation",
                                                                                   {"reservation_id": "RESB"})], GOLD),
]


async def test_flags_follow_scores_outcomes_and_gold():
    critic = TableCritic({"RESB": 0.1, "RESA": 0.9, "confirm": 0.6})
    turns = await replay.score_turns(ROWS, critic)
    assert len(turns) == 4
    rows = {r["threshold"]: r for r in replay.report(turns, [0.05, 0.5, 0.7, 0.95])}
    assert rows[0.05]["turns_flagged"] == 0
    # At 0.5 only the wrong cancellation is flagged: half the failed turns, none of the solved ones.
    assert rows[0.5]["flag_rate_failed"] == 0.5 and rows[0.5]["flag_rate_solved"] == 0.0
    assert rows[0.5]["write_precision"] == 1.0 and rows[0.5]["write_recall"] == 1.0
    assert rows[0.7]["turns_flagged"] == 3 and rows[0.7]["conversations_flagged_solved"] == 1.0
    assert rows[0.95]["write_precision"] == 0.5  # both writes flagged, one of them is right


def test_cli_writes_report_and_curve(tmp_path):
    data = tmp_path / "t.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in ROWS))
    result = CliRunner().invoke(app, ["replay", str(data), "--out", str(tmp_path / "rep"),
                                      "--thresholds", "0.3,0.6"])
    assert result.exit_code == 0, result.output
    assert "4 assistant turns in 2 conversations" in result.output
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert [r["threshold"] for r in report["rows"]] == [0.3, 0.6]
    assert (tmp_path / "rep" / "curve.png").stat().st_size > 1000


async def test_conversations_without_an_outcome_are_left_out_of_the_outcome_rates():
    """What `turngate export` writes before any feedback: `reward: null`. Not a failure."""
    unlabelled = conv("pending", None, [call("cancel_reservation", {"reservation_id": "RESA"})], GOLD)
    del unlabelled["reward"]
    done = {"role": "assistant", "content": "Done: RESA is cancelled."}
    rows = [*ROWS, conv("pending-null", None, [done], GOLD), unlabelled]
    critic = TableCritic({"RESB": 0.1, "RESA": 0.9, "confirm": 0.6})
    turns = await replay.score_turns(rows, critic)
    rows_at = {r["threshold"]: r for r in replay.report(turns, [0.5, 0.7])}
    # The same rates as without the two unlabelled conversations (their turns score 0.9: never flagged).
    assert rows_at[0.5]["flag_rate_failed"] == 0.5 and rows_at[0.5]["flag_rate_solved"] == 0.0
    assert rows_at[0.7]["conversations_flagged_failed"] == 1.0
    assert rows_at[0.7]["conversations_flagged_solved"] == 1.0
    assert rows_at[0.7]["turns_flagged"] == 3  # all turns still count where outcomes do not matter
    assert rows_at[0.5]["write_recall"] == 1.0 and rows_at[0.5]["write_precision"] == 1.0
    head = replay.format_table(replay.report(turns, [0.5]), turns).splitlines()[0]
    assert "2 conversations (2 turns) without an outcome, left out of the outcome rates" in head


def test_cli_says_how_many_it_left_out(tmp_path):
    data = tmp_path / "t.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in [*ROWS, conv("new", None, [call("x", {})], GOLD)]))
    result = CliRunner().invoke(app, ["replay", str(data), "--out", str(tmp_path / "rep"), "--thresholds", "0.5"])
    assert result.exit_code == 0, result.output
    assert "1 conversation (1 turn) without an outcome, left out of the outcome rates" in result.output
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert report["unlabelled"] == {"conversations": 1, "turns": 1}
