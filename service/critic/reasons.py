"""One sentence per candidate saying what the gate has against it, in the words of the turn.

The intervention feedback quotes these to the actor, and the score API returns them, so they name
the concrete disagreement ("3 of 4 candidates call cancel_reservation with reservation_id 'X';
this one passes 'Y', which appears nowhere in the conversation") rather than a bare score.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from typing import Any

from service.critic.features import (
    Call,
    conversation_text,
    history,
    kind_of,
    parse_calls,
    signature,
    value_strings,
)
from service.gate import structural, toolschema
from service.gate.actions import is_write

Message = dict[str, Any]
_QUOTE = 60  # characters of a quoted value


def _quote(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"), default=str)
    return repr(text if len(text) <= _QUOTE else text[:_QUOTE] + "...")


def _describe(calls: list[Call]) -> str:
    return " and ".join(sorted({c.name for c in calls})) if calls else "no tool (a text reply)"


def _argument_difference(mine: list[Call], theirs: list[Call]) -> tuple[str, Any, Any] | None:
    """The first argument of a same-named call where this candidate passes another value."""
    for call in mine:
        other = next((o for o in theirs if o.name == call.name), None)
        if other is None or not isinstance(call.args, dict) or not isinstance(other.args, dict):
            continue
        for key in sorted(set(call.args) | set(other.args)):
            if call.args.get(key) != other.args.get(key):
                return key, other.args.get(key), call.args.get(key)
    return None


def explain(messages: list[Message], candidates: list[Message], tools: list[dict[str, Any]] | None
            ) -> list[str | None]:
    """The objections to each candidate, joined in one sentence; None where there are none."""
    calls = [parse_calls(c) for c in candidates]
    sigs = [signature(c) for c in calls]
    support = Counter(sigs)
    top_sig, top_n = support.most_common(1)[0] if sigs else (None, 0)
    majority = calls[sigs.index(top_sig)] if top_sig is not None else []
    n = len(candidates)
    schemas = structural.tool_schemas(tools)
    deadline = time.monotonic() + structural.SCHEMA_BUDGET_S  # the gate's bound on schema checks
    turn = toolschema.TurnValidators()  # the candidates share one build of each schema
    agent = kind_of(messages, candidates, tools) == "tool"
    text = conversation_text(messages) if agent else ""
    hist = history(messages)
    out: list[str | None] = []
    for cand, cs, sig in zip(candidates, calls, sigs):
        found: list[str] = []
        verdict = structural.check(cand, None, schemas, deadline=deadline, turn=turn) if tools else structural.OK
        if not verdict.ok:
            found.append(verdict.detail or "it breaks the request's tool rules")
        if n > 1 and sig != top_sig and top_n > support[sig] and top_n > 1:
            diff = _argument_difference(cs, majority)
            if diff is not None:
                key, theirs, mine = diff
                found.append(f"{top_n} of {n} candidates call {_describe(majority)} with {key} {_quote(theirs)}; "
                             f"this one passes {_quote(mine)}")
            else:
                found.append(f"{top_n} of {n} candidates call {_describe(majority)}; this one calls {_describe(cs)}")
        if agent:
            missing = [v for v in value_strings(cs) if len(v) >= 3 and v.lower() not in text]
            if missing:
                found.append(f"{', '.join(_quote(v) for v in missing[:3])} "
                             f"{'appears' if len(missing) == 1 else 'appear'} nowhere in the conversation")
            writes = [c.name for c in cs if is_write(c.name)]
            if writes and not hist.since_write_user:
                found.append(f"{writes[0]} changes state, and the user has not confirmed since the last change")
            if any(signature([c]) in hist.failed for c in cs):
                found.append("it repeats the call that just failed, unchanged")
        out.append("; ".join(found) if found else None)
    return out
