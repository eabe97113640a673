"""Admin API (bearer TURNGATE_ADMIN_KEY): the active critic, and activating another bundle."""

from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field, field_validator

from service.api.deps import AdminDep, ServicesDep
from service.api.errors import APIError
from service.api.jsonroute import WireJSONRoute
from service.critic.bundle import BundleError
from service.critic.registry import CriticActivator

router = APIRouter(prefix="/v1/admin", dependencies=[AdminDep], route_class=WireJSONRoute)


class ActivateRequest(BaseModel):
    path: str = Field(min_length=1, max_length=4096, description="A bundle folder on this replica's file system.")

    @field_validator("path")
    @classmethod
    def _no_nul(cls, v: str) -> str:
        if "\x00" in v:
            raise ValueError("a path cannot contain a NUL character")
        return v


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
    except OSError as e:  # the path is one the OS refuses (too long, a loop, no permission)
        raise APIError(400, f"critic bundle {body.path!r}: {e.strerror or e}", code="invalid_bundle",
                       param="path") from e
    request.app.state.critic_labels = activator.labels  # what /metrics compares against next
    return {"critic": _describe(critic), "previous": {"name": previous.name, "version": previous.version},
            "previous_closes_in_s": activator.grace_s}
