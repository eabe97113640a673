"""The feature head end to end: fitted by `turngate critic train-head` on a handful of questions,
written as a format-2 bundle, served by onnxruntime with explanations, evaluated against the free
baselines, and used by the gate (records and intervention feedback)."""

from __future__ import annotations

import asyncio
import json
import math
import random
from pathlib import Path

import httpx
import openai
import pytest
from typer.testing import CliRunner

from service.cli import app as cli_app
from service.critic.bundle import read_bundle
from service.critic.onnx_critic import OnnxCritic
from service.demo.fake_actor import Reply
from tests.conftest import TableCritic
from tests.test_critic_serving_bundles import build_bundle

pytest.importorskip("torch")  # the tiny encoder bundle is exported from a torch model

TOOLS = [{"type": "function", "function": {"name": "cancel_reservation", "parameters": {
    "type": "object", "properties": {"reservation_id": {"type": "string"}}, "required": ["reservation_id"],
    "additionalProperties": False}}}]


def _call(rid: str) -> dict:
    return {"role": "assistant", "content": None, "tool_calls": [{"id": "call_0", "type": "function", "function": {
        "name": "cancel_reservation", "arguments": json.dumps({"reservation_id": rid})}}]}


def _tool_call_sets(n: int, rng: random.Random) -> list[dict]:
    """Questions in the tool-calls format: the right call from most models; a made-up id, a
    schema-breaking call and a text reply from a few. The first reply is wrong half the time."""
    rows = []
    for i in range(n):
        rid = f"R{i:04d}X"
        right = {"message": _call(rid), "valid": True}
        wrong = [{"message": _call(f"Q{rng.randrange(10**4):04d}Z"), "valid": False},
                 {"message": {**_call(rid), "tool_calls": [{"id": "c", "type": "function", "function": {
                     "name": "cancel_reservation", "arguments": json.dumps({"reservation_id": rid, "x": 1})}}]},
                  "valid": False},
                 {"message": {"role": "assistant", "content": "Done, it is cancelled."}, "valid": False}]
        cands = [right] * 5 + wrong
        rng.shuffle(cands)
        rows.append({"id": f"toy-{i}", "category": "simple", "tools": TOOLS,
                     "messages": [{"role": "user", "content": f"Please cancel reservation {rid}."}],
                     "candidates": cands})
    return rows


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("head")
    encoder = build_bundle(root / "encoder", version="enc1", seed=3)
    data = root / "data"
    data.mkdir()
    with (data / "toy-tool-calls.jsonl").open("w") as fh:
        for row in _tool_call_sets(60, random.Random(0)):
            fh.write(json.dumps(row) + "\n")
    out = root / "bundle"
    result = CliRunner().invoke(cli_app, ["critic", "train-head", "--encoder", str(encoder), "--data", str(data),
                                          "--out", str(out), "--draws", "4", "--folds", "3", "--steps", "300"])
    assert result.exit_code == 0, result.output
    return {"encoder": encoder, "data": data, "bundle": out, "output": Path(result.output)}


def test_train_head_writes_a_format_2_bundle_over_the_same_encoder(trained):
    bundle = read_bundle(trained["bundle"])
    card = bundle.manifest
    assert bundle.head is not None and card["bundle_format"] == 2 and card["encoder_version"] == "enc1"
    assert card["version"] != "enc1"  # scores differ from the encoder's: so does the version
    assert (trained["bundle"] / "model.onnx").read_bytes() == (trained["encoder"] / "model.onnx").read_bytes()
    held = card["evaluation_head"]["sets"]["toy-tool-calls.jsonl"]
    # On held-out questions the head picks the right call more often than the actor's first reply.
    assert held["critic"]["mean"] > held["first"]["mean"] + 0.2
    assert held["critic"]["mean"] >= held["majority"]["mean"]
    assert held["critic_vs_first"]["harm"]["mean"] == 0.0
    assert "crossval_head" in card and card["threshold_hints"]["intervene_threshold"] is not None


async def test_the_served_bundle_explains_each_score(trained):
    critic = OnnxCritic.load(trained["bundle"], "CPUExecutionProvider")
    try:
        msgs = [{"role": "user", "content": "Please cancel reservation R0001X."}]
        cands = [_call("R0001X"), _call("R0001X"), _call("ZZZZ99")]
        found = await critic.assess(msgs, cands, TOOLS)
    finally:
        critic.close()
    assert found[0].score > found[2].score
    head = read_bundle(trained["bundle"]).head.heads["tool"]
    for a in found:
        logit = head.bias + sum(a.contributions.values())
        assert a.score == pytest.approx(1 / (1 + math.exp(-logit)), abs=1e-6)
        assert set(a.features) == set(head.features)
    assert found[2].features["call_support"] == pytest.approx(1 / 3)


async def test_a_head_fitted_without_the_encoder_is_served_without_running_it(trained, tmp_path):
    out = tmp_path / "noenc"
    result = CliRunner().invoke(cli_app, ["critic", "train-head", "--encoder", str(trained["encoder"]), "--data",
                                          str(trained["data"]), "--out", str(out), "--draws", "4", "--folds", "0",
                                          "--steps", "300", "--no-encoder"])
    assert result.exit_code == 0, result.output
    bundle = read_bundle(out)
    assert bundle.head is not None and bundle.manifest["encoder_version"] == "enc1"
    for linear in bundle.head.heads.values():
        assert linear.weights[linear.features.index("encoder")] == 0.0
    held = bundle.manifest["evaluation_head"]["sets"]["toy-tool-calls.jsonl"]
    assert held["critic"]["mean"] > held["first"]["mean"] + 0.2  # the features alone still pick the right call
    critic = OnnxCritic.load(out, "CPUExecutionProvider")
    try:
        assert critic.encoder_unread == {"text", "tool", "agent"}
        found = await critic.assess([{"role": "user", "content": "Please cancel reservation R0001X."}],
                                    [_call("R0001X"), _call("R0001X"), _call("ZZZZ99")], TOOLS)
    finally:
        critic.close()
    assert found[0].score > found[2].score and all("encoder" not in a.features for a in found)


def test_eval_reports_the_pick_against_the_free_baselines(trained, tmp_path):
    out = tmp_path / "eval"
    result = CliRunner().invoke(cli_app, ["critic", "eval", str(trained["bundle"]), "--data", str(trained["data"]),
                                          "--out", str(out), "--draws", "3"])
    assert result.exit_code == 0, result.output
    for method in ("critic", "gate", "first", "majority", "longest", "random", "oracle"):
        assert f"  {method:<9} " in result.output
    picks = json.loads((out / "picks.json").read_text())
    figures = picks["sets"]["toy-tool-calls.jsonl"]
    assert figures["candidates_per_group"] == 4.0
    lo, hi = figures["critic"]["ci95"]
    assert lo <= figures["critic"]["mean"] <= hi
    assert (out / "picks.png").stat().st_size > 1000


def test_the_gate_records_features_and_names_the_disagreement_when_it_intervenes(gateway, scripted):
    replies = [_call("R0001X"), _call("R0001X"), _call("R0001X"), _call("ZZZZ99")]
    seen: list[dict] = []

    def actor(body, i):
        seen.append(body)
        return Reply([replies[i % 4]])

    scripted.fn = actor
    critic = TableCritic({}, default=0.1)  # every candidate too low: the gate intervenes once
    with gateway(critic=critic, policy={"intervene_threshold": 0.5, "max_interventions": 1}) as (url, sink):
        client = openai.OpenAI(base_url=url, api_key="sk-test", max_retries=0)
        client.chat.completions.create(model="gpt-test", tools=TOOLS, messages=[
            {"role": "user", "content": "Please cancel reservation R0001X."}])
    feedback = seen[-1]["messages"][-1]["content"]
    assert "3 of 4 candidates call cancel_reservation with reservation_id 'R0001X'" in feedback
    assert "'ZZZZ99' appears nowhere in the conversation" in feedback
    assert feedback.count("cancel_reservation({\"reservation_id\": \"R0001X\"})") == 1  # listed once
    record = sink.records[0]
    assert record.feedback == [feedback]


def test_the_score_api_returns_explanations(gateway, trained):
    critic = OnnxCritic.load(trained["bundle"], "CPUExecutionProvider")
    try:
        with gateway(critic=critic) as (url, _):
            r = httpx.post(url + "/critic/score", headers={"authorization": "Bearer k"}, json={
                "messages": [{"role": "user", "content": "Please cancel reservation R0001X."}],
                "candidates": [_call("R0001X"), _call("R0001X"), _call("ZZZZ99")], "tools": TOOLS})
    finally:
        critic.close()
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["explanations"]) == 3
    odd = body["explanations"][2]
    assert odd["features"]["call_support"] == pytest.approx(1 / 3)
    assert odd["contributions"] and "nowhere in the conversation" in odd["reason"]
    assert body["explanations"][0]["reason"] is None
    assert body["scores"][0] > body["scores"][2]


def test_a_gate_turn_records_each_candidates_features(gateway, scripted, trained):
    scripted.fn = lambda body, i: Reply([_call("R0001X" if i % 4 else "ZZZZ99")])
    critic = OnnxCritic.load(trained["bundle"], "CPUExecutionProvider")
    try:
        with gateway(critic=critic) as (url, sink):
            client = openai.OpenAI(base_url=url, api_key="sk-test", max_retries=0)
            reply = client.chat.completions.create(model="gpt-test", tools=TOOLS, messages=[
                {"role": "user", "content": "Please cancel reservation R0001X."}])
    finally:
        critic.close()
    assert json.loads(reply.choices[0].message.tool_calls[0].function.arguments) == {"reservation_id": "R0001X"}
    cands = sink.records[0].candidates
    assert all(c.features and c.contributions for c in cands)
    assert sorted(c.features["call_support"] for c in cands) == [0.25, 0.75, 0.75, 0.75]


def test_assessments_run_off_the_event_loop():
    """The critic's feature work happens in its tokenizer pool, never on the loop."""
    import threading

    from service.critic import features

    seen = []
    original = features.compute

    def spy(*a, **kw):
        seen.append(threading.current_thread().name)
        return original(*a, **kw)

    async def go(bundle):
        critic = OnnxCritic.load(bundle, "CPUExecutionProvider")
        try:
            features.compute = spy
            await critic.assess([{"role": "user", "content": "hi"}], [{"role": "assistant", "content": "yo"}])
        finally:
            features.compute = original
            critic.close()

    asyncio.run(go(build_bundle(Path(__import__("tempfile").mkdtemp()) / "b", version="x")))
    assert seen and all(name.startswith("critic-tok") for name in seen)
