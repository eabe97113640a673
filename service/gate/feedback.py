"""The critic's feedback to the actor when it intervenes: concrete, from what the gate knows.

Each distinct proposal is listed once, with the structural check it failed or the critic's score
and its objection in the words of the turn (service.critic.reasons): which call the other
samples agree on, which argument value occurs nowhere in the conversation, a write the user has
not confirmed. Where the cascade asked the route's LLM critic about the round, its one-sentence
reason for each candidate is quoted instead. Route-specific rules go in the route's ``guidance``,
appended as written.
"""

from __future__ import annotations

import json
from typing import Any

from service.critic.reasons import explain
from service.gate.selection import Candidate

_MAX_ARGS_CHARS = 200


def describe_action(message: dict) -> str:
    """`the call cancel_reservation({"reservation_id": "X"})`, or `the reply "..."`."""
    calls = message.get("tool_calls") or []
    if calls:
        parts = []
        for call in calls:
            fn = (call.get("function") if isinstance(call, dict) else None) or {}
            args = fn.get("arguments") if isinstance(fn, dict) else None
            args = args if isinstance(args, str) else json.dumps(args, separators=(",", ":"))
            if len(args) > _MAX_ARGS_CHARS:
                args = args[:_MAX_ARGS_CHARS] + "..."
            parts.append(f"{fn.get('name') if isinstance(fn, dict) else fn}({args})")
        return "the call " + ", ".join(parts)
    content = message.get("content")
    text = (content if isinstance(content, str) else "").strip().replace("\n", " ")
    return "the reply " + json.dumps(text[:_MAX_ARGS_CHARS] + ("..." if len(text) > _MAX_ARGS_CHARS else ""))


def build(cands: list[Candidate], messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
          guidance: str = "") -> str:
    objections = explain(messages, [c.record.message for c in cands], tools)
    lines = ["A reviewer checked your proposed next step before it was carried out and rejected it."]
    listed: set[str] = set()
    for c, why in zip(cands, objections):
        action = describe_action(c.record.message)
        if action in listed:  # samples of one turn often repeat each other
            continue
        listed.add(action)
        if not c.ok:
            lines.append(f"- You proposed {action}, which is invalid: {c.record.veto_detail}.")
        elif c.record.judge_score is not None:  # the LLM critic judged the round: its reason, in its words
            reason = (c.record.judge_reason or "").rstrip(".")
            lines.append(f"- You proposed {action}, which scored {c.record.judge_score:.2f}, too low to be safe"
                         + (f": {reason}." if reason else "."))
        elif c.score is not None:
            lines.append(f"- You proposed {action}, which scored {c.score:.2f}, too low to be safe"
                         + (f": {why}." if why else "."))
    lines.append("Reconsider the conversation and the policy, then give a corrected next step.")
    if guidance:
        lines.append(guidance)
    return "\n".join(lines)
