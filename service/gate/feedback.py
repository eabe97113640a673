"""The critic's feedback to the actor when it intervenes: concrete, from what the gate knows."""

from __future__ import annotations

import json

from service.gate.selection import Candidate

_MAX_ARGS_CHARS = 200


def describe_action(message: dict) -> str:
    """`cancel_reservation({"reservation_id": "X"})`, or a quote of the text reply."""
    calls = message.get("tool_calls") or []
    if calls:
        parts = []
        for call in calls:
            fn = call.get("function") or {}
            args = fn.get("arguments")
            args = args if isinstance(args, str) else json.dumps(args, separators=(",", ":"))
            if len(args) > _MAX_ARGS_CHARS:
                args = args[:_MAX_ARGS_CHARS] + "..."
            parts.append(f"{fn.get('name')}({args})")
        return "the call " + ", ".join(parts)
    text = (message.get("content") or "").strip().replace("\n", " ")
    return "the reply " + json.dumps(text[:_MAX_ARGS_CHARS] + ("..." if len(text) > _MAX_ARGS_CHARS else ""))


def build(cands: list[Candidate], guidance: str = "") -> str:
    lines = ["A reviewer checked your proposed next step before it was carried out and rejected it."]
    for c in cands:
        action = describe_action(c.record.message)
        if not c.ok:
            lines.append(f"- The proposed {action} is invalid: {c.record.veto_detail}.")
        elif c.score is not None:
            lines.append(f"- The proposed {action} scored {c.score:.2f} (too low to be safe).")
    lines.append("Reconsider the conversation and the policy, then give a corrected next step. "
                 "Do not take an action the user has not explicitly confirmed.")
    if guidance:
        lines.append(guidance)
    return "\n".join(lines)
