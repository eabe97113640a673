"""POST /v1/feedback: an outcome (reward in [0, 1] and/or a label) for a turn or a conversation."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body
from pydantic import BaseModel, ConfigDict, Field, model_validator

from service.api.deps import ClientKeyDep, ServicesDep
from service.api.errors import APIError
from service.store.feedback import FeedbackIn, StoreUnavailable, UnknownTarget, record_feedback

router = APIRouter()


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    turn_id: str | None = Field(None, min_length=1, max_length=64)
    conversation_id: str | None = Field(None, min_length=1, max_length=4096)  # the header's id, any length
    reward: float | None = Field(None, ge=0, le=1, allow_inf_nan=False)
    label: str | None = Field(None, min_length=1, max_length=200)
    comment: str | None = Field(None, max_length=10_000)
    source: str = Field("api", min_length=1, max_length=64)
    id: str | None = Field(None, min_length=1, max_length=200)  # the client's idempotency id

    @model_validator(mode="after")
    def _target_and_outcome(self) -> FeedbackRequest:
        if (self.turn_id is None) == (self.conversation_id is None):
            raise ValueError("give exactly one of turn_id or conversation_id")
        if self.reward is None and self.label is None:
            raise ValueError("give a reward in [0, 1], a label, or both")
        return self


@router.post("/v1/feedback")
async def post_feedback(body: Annotated[FeedbackRequest, Body()], services: ServicesDep,
                        key: ClientKeyDep) -> dict:
    sink = services.sink
    if not hasattr(sink, "engine"):
        raise APIError(503, "feedback needs the conversation store; this gateway has none configured",
                       "server_error", "store_unavailable")
    fb = FeedbackIn(body.turn_id, body.conversation_id, body.reward, body.label, body.comment, body.source,
                    body.id, key.key_id)
    try:
        row, duplicate = await record_feedback(sink, fb, wait_s=getattr(sink, "feedback_wait_s", 2.0))
    except UnknownTarget:
        what = "turn" if body.turn_id else "conversation"
        raise APIError(404, f"No {what} with id {body.turn_id or body.conversation_id!r}.",
                       "not_found_error", f"{what}_not_found", f"{what}_id") from None
    except StoreUnavailable:
        raise APIError(503, "the conversation store is unavailable; retry later", "server_error",
                       "store_unavailable") from None
    return {**row, "duplicate": duplicate}
