"""The turn record: what the gate hands to the store for every turn it served (or failed to).

This is the contract between the gate and the store. Plain dataclasses of JSON-able values, so a
record can be written to a spool file and read back unchanged (`to_dict` / `from_dict`).
"""

from __future__ import annotations

import dataclasses
import secrets
import time
from dataclasses import dataclass, field
from typing import Any


def new_turn_id() -> str:
    """'turn-', the time in milliseconds (12 hex digits), then 80 random bits (20 hex digits): as
    long as the uuid4 ids of earlier releases and as unguessable for practical purposes, but
    time-ordered, so the store appends each turn's rows to its indexes instead of dirtying a random
    page of each (bench/store_cpu.py --prefill)."""
    return f"turn-{time.time_ns() // 1_000_000:012x}{secrets.token_hex(10)}"


@dataclass
class CandidateRecord:
    index: int  # position among all candidates of the turn, across rounds
    round: int  # 0 = first sampling, 1.. = after the n-th intervention
    message: dict[str, Any]  # the assistant message as the upstream returned it
    finish_reason: str | None = None
    verdict: str = "ok"  # "ok" or "veto"
    veto_reason: str | None = None  # e.g. "unknown_tool", "schema", "bad_json", "empty", "truncated"
    veto_detail: str | None = None  # the validator's message
    score: float | None = None
    features: dict[str, float] | None = None  # the turn features the critic saw (service.critic.features)
    contributions: dict[str, float] | None = None  # each feature's share of the score's logit
    upstream_latency_ms: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    # The upstream's usage object for this candidate, details included (cached and reasoning tokens);
    # a call asking for n choices reports one usage, kept on its first candidate.
    usage: dict[str, Any] | None = None
    # The candidate's token logprobs as the upstream sent them ({"content": [...], "refusal": ...}),
    # kept when the route says record_logprobs: the actor's own confidence, for the critic to learn from.
    logprobs: dict[str, Any] | None = None
    upstream_request_id: str | None = None  # the upstream's x-request-id of the call that gave it
    # The LLM critic's score (0..1) and one-sentence reason, where the cascade asked it about this round.
    judge_score: float | None = None
    judge_reason: str | None = None


@dataclass
class ConversationHint:
    """What the request says about the conversation it belongs to (the store threads turns by it)."""

    header_id: str | None = None  # x-turngate-conversation-id
    user: str | None = None  # the request's `user` field
    metadata: dict[str, Any] | None = None  # the request's `metadata` field
    key_id: str | None = None  # a short digest of the client's API key, never the key
    # The turn's tokens go to the key's spend: an issued key's (a policy's). Nothing reads another key's
    # spend, and open mode's rotating bearers would each leave counters behind for a day and a month.
    charged: bool = False


@dataclass
class UpstreamFailure:
    """A candidate call that did not give a candidate, on a turn that may still have answered."""

    kind: str  # an UpstreamError kind: "timeout", "connect", "server_error", "auth", "abandoned", ...
    message: str  # turngate's words, with the upstream's own message where the client may see it too

    @classmethod
    def of(cls, kind: str, message: str, limit: int = 500) -> UpstreamFailure:
        """Bounded and storable whatever the upstream wrote (no NUL, no lone surrogate)."""
        text = message[:limit].encode("utf-8", "replace").decode("utf-8").replace("\x00", "")
        return cls(kind, text)


@dataclass
class TurnRecord:
    turn_id: str
    route: str
    mode: str
    upstream_model: str | None  # None: an imported turn whose agent model is not known
    request_messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None
    decision: str = "error"  # see service.gate.decisions
    chosen_index: int | None = None
    rounds: int = 1
    critic_name: str | None = None
    critic_version: str | None = None
    latency_total_ms: float | None = None
    latency_upstream_ms: float | None = None
    latency_critic_ms: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    candidates_saved: int = 0  # against always sampling N (adaptive sampling)
    feedback: list[str] = field(default_factory=list)  # intervention texts, one per round
    error: str | None = None  # set when the turn failed (the client got an error)
    upstream_errors: list[UpstreamFailure] = field(default_factory=list)  # partial failures included
    # The cascade (service/gate/judging.py): which critic chose ("encoder" / "llm"; None where none
    # ranked), why the LLM critic was asked ("margin", "agreement", "write"; None when it was not),
    # whether its pick was the encoder's, and the tokens it billed: turngate's cost, never in the
    # client's usage. A failed judge call is noted in upstream_errors, kind "judge_<outcome>".
    decided_by: str | None = None
    judge_reason: str | None = None
    critics_agreed: bool | None = None
    judge_prompt_tokens: int | None = None
    judge_completion_tokens: int | None = None
    conversation: ConversationHint = field(default_factory=ConversationHint)
    candidates: list[CandidateRecord] = field(default_factory=list)
    created_at: float = field(default_factory=time.time)  # unix seconds

    @property
    def chosen(self) -> CandidateRecord | None:
        if self.chosen_index is None:
            return None
        return next((c for c in self.candidates if c.index == self.chosen_index), None)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TurnRecord:
        """The inverse of to_dict. Fields this release does not know (a record written by a newer
        one) are ignored; missing ones take their defaults."""
        d = _known(cls, d)
        d["conversation"] = ConversationHint(**_known(ConversationHint, d.get("conversation") or {}))
        d["candidates"] = [CandidateRecord(**_known(CandidateRecord, c)) for c in d.get("candidates") or []]
        d["upstream_errors"] = [UpstreamFailure(**_known(UpstreamFailure, e)) for e in d.get("upstream_errors") or []]
        return cls(**d)


def _known(cls: type, d: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in d.items() if k in names}
