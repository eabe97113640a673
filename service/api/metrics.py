"""GET /metrics: Prometheus exposition, summed over all workers in multiprocess mode."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from service.telemetry import critic_info, exposition

router = APIRouter()


@router.get("/metrics", include_in_schema=False)
def metrics(request: Request) -> Response:
    """A plain (sync) handler on purpose: FastAPI runs it in a thread, off the event loop, because
    multiprocess mode reads every worker's files."""
    state = request.app.state
    services = getattr(state, "services", None)
    if services is not None:  # refresh the critic info: a hot swap may have happened since
        state.critic_labels = critic_info.publish(services.critics.current, getattr(state, "critic_labels", None))
    body, content_type = exposition.render()
    return Response(body, media_type=content_type)
