"""Admin API (bearer TURNGATE_ADMIN_KEY): the active critic, and activating another bundle."""

from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from service.api.deps import AdminDep, ServicesDep
from service.api.errors import APIError
from service.critic.bundle import BundleError
from service.critic.registry import CriticActivator

router = APIRouter(prefix="/v1/admin", dependencies=[AdminDep])


class ActivateRequest(BaseModel):
    path: str = Field(min_length=1, description="A bundle folder on this replica's file system.")


def _describe(critic) -> dict:
    info = getattr(critic, "info", None)
    return info() if callable(info) else {"name": critic.name, "version": critic.version,
                                          "provider": critic.provider}


@router.get("/critic")
async def active_critic(services: ServicesDep) -> dict:
    return {"critic": _describe(services.critics.current)}


@router.post("/critic/activate")
async def activate_critic(body: ActivateRequest, request: Request) -> dict:
    activator: CriticActivator = request.app.state.critic_activator
    previous = activator.slot.current
    try:
        critic = await activator.activate(body.path)
    except BundleError as e:
        raise APIError(400, str(e), code="invalid_bundle", param="path") from e
    request.app.state.critic_labels = activator.labels  # what /metrics compares against next
    return {"critic": _describe(critic), "previous": {"name": previous.name, "version": previous.version},
            "previous_closes_in_s": activator.grace_s}
