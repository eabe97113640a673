"""The critic interface the gate scores candidates with.

A critic returns one score in [0, 1] per candidate: its estimate that the candidate is a good turn
given the conversation so far. Implementations must not block the event loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

Message = dict[str, Any]


@dataclass
class Assessment:
    """A candidate's score with what it rests on: the turn features and, where a head scored them,
    each feature's contribution to the logit (service.critic.head)."""

    score: float
    features: dict[str, float] | None = None
    contributions: dict[str, float] | None = None


class Critic(Protocol):
    name: str
    version: str
    provider: str  # the execution provider actually in use, e.g. "CPUExecutionProvider"

    async def score(self, messages: list[Message], candidates: list[Message],
                    tools: list[dict[str, Any]] | None = None) -> list[float]: ...


async def assess(critic: Critic, messages: list[Message], candidates: list[Message],
                 tools: list[dict[str, Any]] | None = None, verdicts: list[bool] | None = None
                 ) -> list[Assessment]:
    """The critic's assessments; a critic that only scores gets bare ones. ``verdicts``: the
    structural checks, where the caller already ran them."""
    explain = getattr(critic, "assess", None)
    if callable(explain):
        return await explain(messages, candidates, tools, verdicts)
    return [Assessment(float(s)) for s in await critic.score(messages, candidates, tools)]


class ConstantCritic:
    """Scores every candidate the same: selection then rests on the structural checks alone.

    Used when no learned critic bundle is configured or shipped, and in benchmarks that must
    take the critic's cost out of the measurement.
    """

    name = "constant"
    version = "0"
    provider = "none"

    def __init__(self, value: float = 0.5) -> None:
        self.value = value

    async def score(self, messages, candidates, tools=None) -> list[float]:
        return [self.value] * len(candidates)


class CriticSlot:
    """Holds the active critic. Swapping is one reference assignment, so a turn in flight keeps
    the critic it started with and the next turn gets the new one: no request is dropped."""

    def __init__(self, critic: Critic) -> None:
        self.current = critic

    def swap(self, critic: Critic) -> Critic:
        old, self.current = self.current, critic
        return old
