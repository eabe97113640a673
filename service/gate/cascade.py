"""When the encoder critic is unsure, so that the route's LLM critic should judge the turn.

One rule, shared by the gate (service/gate/pipeline.py) and `turngate replay` (what a cascade
setting would have cost and changed on logged traffic): the top two scores are close, few of the
candidates make the top pick's calls, or the top pick writes. The budget (share of turns, tokens
an hour) is applied after this rule, by the gate.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from service.critic.features import content_text, parse_calls, signature
from service.gate.actions import is_write
from service.settings import CascadeSettings

Doubt = Literal["margin", "agreement", "write"]


def writes(message: dict[str, Any]) -> bool:
    """The candidate calls a tool that changes state (service.gate.actions.is_write)."""
    for call in message.get("tool_calls") or []:
        function = call.get("function") if isinstance(call, dict) else None
        name = function.get("name") if isinstance(function, dict) else None
        if isinstance(name, str) and is_write(name):
            return True
    return False


def same_reply(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """The very same calls (as the agreement features compare them), or for text, the same text."""
    ca, cb = parse_calls(a), parse_calls(b)
    if ca or cb:
        return signature(ca) == signature(cb)
    return content_text(a).strip() == content_text(b).strip()


def doubt(scores: Sequence[float], top: int, agreement: float | None, top_writes: bool,
          cfg: CascadeSettings, replies: Sequence[dict[str, Any]] | None = None) -> Doubt | None:
    """Why the encoder's pick `top` among `scores` needs the judge, or None when it is sure.

    `agreement`: the share of the turn's candidates making the very same calls as the top pick (the
    `call_support` feature; None for text replies or a lone candidate). `replies`: the candidates'
    messages, in `scores` order; where given, the margin is to the best candidate making another
    reply than the top pick, since samples making the very same call score the same (a margin of 0
    that says nothing: that is agreement, which `min_agreement` reads), and with no other reply
    there is no margin to doubt."""
    others = [s for i, s in enumerate(scores)
              if i != top and (replies is None or not same_reply(replies[i], replies[top]))]
    if others and scores[top] - max(others) < cfg.margin:
        return "margin"
    if agreement is not None and agreement < cfg.min_agreement:
        return "agreement"
    if top_writes and cfg.on_write:
        return "write"
    return None
