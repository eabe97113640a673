"""The cascade's rule: when the encoder's pick goes to the LLM critic."""

from __future__ import annotations

from service.gate.cascade import doubt, writes
from service.settings import CascadeSettings

CFG = CascadeSettings(margin=0.1, min_agreement=0.5, on_write=True)


def call(name: str) -> dict:
    return {"role": "assistant", "tool_calls": [{"id": "c", "type": "function",
                                                 "function": {"name": name, "arguments": "{}"}}]}


def test_a_clear_pick_that_most_candidates_share_and_that_reads_is_sure():
    assert doubt([0.9, 0.5, 0.4], 0, agreement=0.75, top_writes=False, cfg=CFG) is None


def test_each_doubt_is_named():
    assert doubt([0.9, 0.85], 0, agreement=1.0, top_writes=False, cfg=CFG) == "margin"
    assert doubt([0.9, 0.2], 0, agreement=0.25, top_writes=False, cfg=CFG) == "agreement"
    assert doubt([0.9, 0.2], 0, agreement=1.0, top_writes=True, cfg=CFG) == "write"
    assert doubt([0.9, 0.2], 0, agreement=1.0, top_writes=True, cfg=CFG.model_copy(update={"on_write": False})) is None


def test_a_lone_candidate_has_no_margin():
    assert doubt([0.3], 0, agreement=None, top_writes=False, cfg=CFG) is None


def test_writes_reads_the_tool_names_and_survives_malformed_calls():
    assert writes(call("cancel_reservation")) and not writes(call("get_user_details"))
    assert not writes({"role": "assistant", "content": "hi"})
    assert not writes({"role": "assistant", "tool_calls": ["x", {"function": "cancel"}, {"function": {"name": 3}}]})


def test_the_margin_is_to_another_reply_when_the_replies_are_given():
    """Samples making the very same call score the same: that is agreement, not a close call."""
    same, other = call("get_user_details"), call("get_order")
    assert doubt([0.9, 0.9, 0.5], 0, agreement=0.67, top_writes=False, cfg=CFG) == "margin"  # scores alone
    assert doubt([0.9, 0.9, 0.5], 0, agreement=0.67, top_writes=False, cfg=CFG, replies=[same, same, other]) is None
    assert doubt([0.9, 0.9, 0.85], 0, agreement=0.67, top_writes=False, cfg=CFG,
                 replies=[same, same, other]) == "margin"
    assert doubt([0.9, 0.9], 0, agreement=1.0, top_writes=False, cfg=CFG, replies=[same, same]) is None
