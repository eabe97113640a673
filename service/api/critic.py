"""POST /v1/critic/score: the active critic's scores for candidate replies, without the gate.

For offline evaluation, shadow pipelines and agents that want to rank replies themselves. It
scores with the same critic, micro-batched with live turns.
"""

from __future__ import annotations

import asyncio
from typing import Any, cast

from fastapi import APIRouter
from pydantic import BaseModel, Field, field_validator

from service.api.deps import LimitedKeyDep, ServicesDep
from service.api.jsonroute import WireJSONRoute
from service.api.protocol import ChatMessage, Tool
from service.critic.base import assess
from service.critic.reasons import explain

router = APIRouter(route_class=WireJSONRoute)

MAX_CANDIDATES = 64


class ScoreRequest(BaseModel):
    messages: list[ChatMessage] = Field(min_length=1)
    candidates: list[ChatMessage] = Field(min_length=1, max_length=MAX_CANDIDATES)
    tools: list[Tool] | None = None

    @field_validator("candidates")
    @classmethod
    def _assistant(cls, v: list[ChatMessage]) -> list[ChatMessage]:
        for i, c in enumerate(v):
            if c["role"] != "assistant":
                raise ValueError(f"candidate {i} has role {c['role']!r}; candidates are assistant messages")
        return v


class CriticInfo(BaseModel):
    name: str
    version: str
    provider: str


class Explanation(BaseModel):
    features: dict[str, float] | None = None  # the turn features of service.critic.features
    contributions: dict[str, float] | None = None  # each feature's share of the score's logit
    reason: str | None = None  # what the critic has against the candidate, in the turn's words


class ScoreResponse(BaseModel):
    scores: list[float]
    critic: CriticInfo
    explanations: list[Explanation]


@router.post("/v1/critic/score")
async def score(body: ScoreRequest, services: ServicesDep, _: LimitedKeyDep) -> ScoreResponse:
    """The candidates of one call are one group: agreement features see them all."""
    critic = services.critics.current  # one critic for the whole request, even across a swap
    # The messages are the client's dicts as validated (TypedDicts, plain dicts at run time): scored as sent.
    messages, candidates = cast(list[dict[str, Any]], body.messages), cast(list[dict[str, Any]], body.candidates)
    tools = cast(list[dict[str, Any]] | None, body.tools)
    found = await assess(critic, messages, candidates, tools)
    reasons = await asyncio.to_thread(explain, messages, candidates, tools)
    return ScoreResponse(
        scores=[a.score for a in found],
        critic=CriticInfo(name=critic.name, version=critic.version, provider=critic.provider),
        explanations=[Explanation(features=a.features, contributions=a.contributions, reason=r)
                      for a, r in zip(found, reasons)])
