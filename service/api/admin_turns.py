"""The turn inspector's admin API (bearer TURNGATE_ADMIN_KEY): served turns, one turn whole, and
totals. Read-only; the queries live in service.store.inspect.

Everything stored came from clients, so the reply models type what turngate itself wrote and take
the client's JSON (messages, tools, metadata, usage) as it is.
"""

from __future__ import annotations

from collections.abc import Awaitable
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal, TypeVar

from fastapi import APIRouter, Path, Query
from pydantic import BaseModel, Field
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from service.api.deps import AdminDep, Services, ServicesDep
from service.api.errors import APIError
from service.api.jsonroute import WireJSONRoute
from service.gate.decisions import Decision
from service.store import cursors, inspect
from service.store.sink import StoreSink

router = APIRouter(prefix="/v1/admin", dependencies=[AdminDep], route_class=WireJSONRoute, tags=["inspector"])

MAX_LIMIT = 500
# Query text goes to the database as a parameter: PostgreSQL refuses a NUL in text, so it is a 400 here.
NO_NUL = r"^[^\x00]*$"


# -- reply models ----------------------------------------------------------------------------------
class Tokens(BaseModel):
    prompt: int | None = Field(None, description="Prompt tokens billed, over every upstream call")
    completion: int | None = Field(None, description="Completion tokens billed, over every upstream call")


class TurnSummary(BaseModel):
    id: str
    created_at: datetime
    route: str
    mode: str
    decision: str = Field(description="One of the gate's decisions (see the `decision` filter)")
    chosen_index: int | None
    rounds: int = Field(description="Sampling rounds: 1 + the interventions")
    candidates: int = Field(description="Candidates sampled, over all rounds")
    chosen_score: float | None = Field(description="The critic's score of the chosen candidate")
    latency_total_ms: float | None
    tokens: Tokens
    key_id: str | None = Field(description="The client key's id (an issued key) or digest prefix (a static key)")
    conversation_id: str
    last_user_message: str | None = Field(description=f"The last user message, cut to {inspect.PREVIEW_CHARS} "
                                                      "characters")
    chosen_reply: str | None = Field(description=f"The chosen reply, cut to {inspect.PREVIEW_CHARS} characters")
    has_feedback: bool = Field(description="Whether outcome feedback was given on this turn")


class TurnPage(BaseModel):
    object: Literal["list"] = "list"
    data: list[TurnSummary]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next (older) page; null at the end")


class TurnRequestView(BaseModel):
    messages: Any = Field(description="The request's messages, as the client sent them")
    tools: Any = None
    client_metadata: Any = None


class CandidateView(BaseModel):
    index: int
    round: int = Field(description="0 = first sampling, n = after the n-th intervention")
    chosen: bool
    message: Any = Field(description="The assistant message as the upstream returned it")
    finish_reason: str | None
    verdict: str = Field(description="Structural check: ok or veto")
    veto_reason: str | None
    veto_detail: str | None
    score: float | None
    features: dict[str, float | None] | None = Field(description="The turn features the critic saw")
    contributions: dict[str, float | None] | None = Field(description="Each feature's share of the score's logit")
    upstream_latency_ms: float | None
    tokens: Tokens
    usage: Any = Field(None, description="The upstream's usage object for this candidate's call")
    upstream_request_id: str | None
    judge_score: float | None = Field(None, description="The LLM critic's score, where the cascade asked it")
    judge_reason: str | None = Field(None, description="The LLM critic's one-sentence reason")


class FeedbackView(BaseModel):
    id: str
    turn_id: str | None
    conversation_id: str | None
    reward: float | None
    label: str | None
    source: str
    comment: str | None
    key_id: str | None
    created_at: datetime


class TurnFeedback(BaseModel):
    turn: list[FeedbackView] = Field(description="Feedback given on this turn")
    conversation: list[FeedbackView] = Field(description="Feedback given on the whole conversation")


class Latencies(BaseModel):
    total: float | None
    upstream: float | None
    critic: float | None


class CriticRef(BaseModel):
    name: str | None
    version: str | None


class TurnDetail(BaseModel):
    id: str
    created_at: datetime
    route: str
    mode: str
    upstream_model: str | None
    decision: str
    chosen_index: int | None
    rounds: int
    candidates_saved: int = Field(description="Candidates not sampled thanks to adaptive sampling")
    critic: CriticRef
    conversation_id: str
    conversation_index: int = Field(description="Assistant messages before this turn in its conversation")
    key_id: str | None
    request: TurnRequestView
    interventions: list[Any] = Field(description="The intervention texts sent to the actor, one per extra round")
    latency_ms: Latencies
    tokens: Tokens
    error: str | None
    upstream_errors: list[Any] = Field(description="Candidate calls that failed while the turn answered "
                                                   "(and LLM critic calls that failed: kind judge_<outcome>)")
    decided_by: str | None = Field(None, description="The critic whose scores chose: encoder or llm; null "
                                                     "where no critic ranked")
    judge_reason: str | None = Field(None, description="Why the cascade asked the LLM critic: margin, agreement "
                                                       "or write; null when it did not")
    critics_agreed: bool | None = Field(None, description="Where the LLM critic judged: whether its pick was "
                                                          "the encoder's")
    candidates: list[CandidateView]
    feedback: TurnFeedback


class FeedbackStats(BaseModel):
    turns_with_feedback: int
    rewards: int = Field(description="Feedback rows with a reward")
    mean_reward: float | None
    positive_share: float | None = Field(description="Share of rewards >= 0.5")


class StatsBlock(BaseModel):
    turns: int
    by_decision: dict[str, int]
    intervened_turns: int = Field(description="Turns that took more than one round")
    intervention_rounds: int = Field(description="Rounds after an intervention, summed")
    candidates: int = Field(description="Candidates sampled")
    candidates_saved: int = Field(description="Candidates not sampled thanks to adaptive sampling")
    tokens: Tokens
    feedback: FeedbackStats


class StatsReply(BaseModel):
    since: datetime
    until: datetime | None
    route: str | None
    total: StatsBlock
    by_route: dict[str, StatsBlock] | None = Field(description="Per route; null when a route was asked for")


# -- helpers ---------------------------------------------------------------------------------------
def _engine(services: Services) -> AsyncEngine:
    if not isinstance(services.sink, StoreSink):
        raise APIError(503, "the turn inspector needs the conversation store; this gateway has none configured",
                       "server_error", "store_unavailable")
    return services.sink.engine


def _utc(dt: datetime | None, param: str) -> datetime | None:
    try:
        return None if dt is None else cursors.as_utc(dt)
    except OverflowError:
        raise APIError(400, f"{param}: out of range once moved to UTC", param=param, code="invalid_value") from None


T = TypeVar("T")


async def _query(work: Awaitable[T]) -> T:
    try:
        return await work
    except (SQLAlchemyError, OSError, TimeoutError) as e:
        raise APIError(503, "the conversation store is unavailable; retry later", "server_error",
                       "store_unavailable") from e


Text = Annotated[str | None, Query(min_length=1, max_length=200, pattern=NO_NUL)]


# -- endpoints -------------------------------------------------------------------------------------
@router.get("/turns", response_model=TurnPage)
async def list_turns(
        services: ServicesDep, route: Text = None, decision: Decision | None = None,
        key_id: Annotated[str | None, Query(min_length=1, max_length=64, pattern=NO_NUL)] = None,
        since: Annotated[datetime | None, Query(description="ISO 8601; without an offset, UTC")] = None,
        until: Annotated[datetime | None, Query(description="ISO 8601, exclusive; without an offset, UTC")] = None,
        limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 50,
        cursor: Annotated[str | None, Query(min_length=1, max_length=1000)] = None) -> dict:
    """Served turns, newest first, filtered; `next_cursor` pages back through older ones."""
    engine = _engine(services)
    f = inspect.TurnFilter(route, decision.value if decision else None, key_id, _utc(since, "since"),
                           _utc(until, "until"))
    try:
        items, next_cursor = await _query(inspect.list_turns(engine, f, limit, cursor))
    except cursors.BadCursor:
        raise APIError(400, "cursor: not a cursor this API gave out", param="cursor", code="invalid_cursor") from None
    return {"object": "list", "data": items, "next_cursor": next_cursor}


@router.get("/turns/{turn_id}", response_model=TurnDetail)
async def get_turn(turn_id: Annotated[str, Path(max_length=64, description="The reply's x-turngate-turn-id")],
                   services: ServicesDep) -> dict:
    """One turn whole: the request, every round's candidates, the decision, and its feedback."""
    engine = _engine(services)
    found = None
    if "\x00" not in turn_id:  # never stored (PostgreSQL refuses a NUL in text)
        found = await _query(inspect.get_turn(engine, turn_id))
    if found is None:
        raise APIError(404, f"No turn with id {turn_id[:100]!r}.", "not_found_error", "turn_not_found", "turn_id")
    return found


@router.get("/stats", response_model=StatsReply)
async def turn_stats(
        services: ServicesDep, route: Text = None,
        since: Annotated[datetime | None, Query(description="ISO 8601; default 24 hours ago")] = None,
        until: Annotated[datetime | None, Query(description="ISO 8601, exclusive; default now")] = None) -> dict:
    """Turns by decision, interventions, candidates saved, tokens and feedback outcomes since a time."""
    engine = _engine(services)
    start = _utc(since, "since") or datetime.now(UTC) - timedelta(hours=24)
    return await _query(inspect.stats(engine, route, start, _utc(until, "until")))
