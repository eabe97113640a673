"""What each span of a turn says: attributes from the records the gate already keeps.

Names follow OpenTelemetry's GenAI conventions where one fits (gen_ai.*), turngate.* otherwise.
Plain dictionaries, so this module needs no OpenTelemetry import.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from service.gate.record import TurnRecord


def turn_outcome(record: TurnRecord) -> dict[str, Any]:
    chosen = record.chosen
    out: dict[str, Any] = {"turngate.decision": record.decision, "turngate.rounds": record.rounds,
                           "turngate.candidates": len(record.candidates)}
    if chosen is not None and chosen.score is not None:
        out["turngate.score"] = chosen.score
    if record.prompt_tokens is not None:
        out["gen_ai.usage.input_tokens"] = record.prompt_tokens
    if record.completion_tokens is not None:
        out["gen_ai.usage.output_tokens"] = record.completion_tokens
    return out


def upstream_call(route: Any, n: int) -> dict[str, Any]:
    where = urlsplit(route.upstream_base_url)
    return {"gen_ai.operation.name": "chat", "gen_ai.request.model": route.model,
            "gen_ai.request.choice.count": n, "server.address": where.hostname, "server.port": where.port,
            "turngate.route": route.alias}


def upstream_result(samples: list[Any]) -> dict[str, Any]:
    if not samples:
        return {}
    response = samples[0].response
    usage = response.get("usage") if isinstance(response.get("usage"), dict) else {}
    out: dict[str, Any] = {"gen_ai.response.finish_reasons": [s.finish_reason or "" for s in samples]}
    for key, name in (("id", "gen_ai.response.id"), ("model", "gen_ai.response.model")):
        if isinstance(response.get(key), str):
            out[name] = response[key]
    for key, name in (("prompt_tokens", "gen_ai.usage.input_tokens"),
                      ("completion_tokens", "gen_ai.usage.output_tokens")):
        if isinstance(usage.get(key), int):
            out[name] = usage[key]
    return out


def critic(scorer: Any, cands: list[Any]) -> dict[str, Any]:
    return {"turngate.critic.name": scorer.name, "turngate.critic.version": scorer.version,
            "turngate.critic.provider": scorer.provider, "turngate.candidates": len(cands),
            "turngate.vetoed": sum(not c.ok for c in cands)}


def scores(cands: list[Any]) -> dict[str, Any]:
    scored = [c.score for c in cands if c.ok and c.score is not None]
    return {"turngate.best_score": max(scored)} if scored else {}
