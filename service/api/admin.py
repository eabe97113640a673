"""Admin API (bearer TURNGATE_ADMIN_KEY): the active critic, and activating another bundle on every
replica (service.control.critic_sync)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field, field_validator
from sqlalchemy.exc import SQLAlchemyError

from service.api.deps import AdminDep, ServicesDep
from service.api.errors import APIError
from service.api.jsonroute import WireJSONRoute
from service.control import critic_sync
from service.control.plane import audit
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


class ActivationStatus(BaseModel):
    """The newest activation through the admin API, on any replica, and whether this one runs it."""

    path: str
    name: str | None
    version: str | None
    at: str = Field(description="When it was recorded (ISO 8601).")
    applied: bool = Field(description="This replica runs it; false: it could not load it and kept its critic.")
    error: str | None = Field(description="Why this replica could not load it.")


class CriticStatus(BaseModel):
    critic: dict[str, Any] = Field(description="The critic this replica runs: name, version, provider, ...")
    activation: ActivationStatus | None = Field(description="null: nothing activated through the admin API.")


class PreviousCritic(BaseModel):
    name: str
    version: str


class ActivateResponse(BaseModel):
    critic: dict[str, Any]
    previous: PreviousCritic
    previous_closes_in_s: float


def _describe(critic) -> dict:
    info = getattr(critic, "info", None)
    return info() if callable(info) else {"name": critic.name, "version": critic.version,
                                          "provider": critic.provider}


def _activation(request: Request) -> ActivationStatus | None:
    sync: critic_sync.CriticSync | None = getattr(request.app.state, "critic_sync", None)
    if sync is None or sync.activation is None:
        return None
    return ActivationStatus(**sync.activation.as_dict())


@router.get("/critic")
async def active_critic(services: ServicesDep, request: Request) -> CriticStatus:
    """The critic this replica runs; `activation`: the newest activation through this API, on any
    replica, and whether this one runs it (`applied`, else the `error` that kept it from loading)."""
    return CriticStatus(critic=_describe(services.critics.current), activation=_activation(request))


@router.post("/critic/activate")
async def activate_critic(body: ActivateRequest, request: Request, services: ServicesDep) -> ActivateResponse:
    """Load the bundle here, then have every replica load it (the path must exist on each)."""
    activator: CriticActivator = request.app.state.critic_activator
    previous, previous_path = activator.slot.current, activator.path
    try:
        critic = await activator.activate(body.path)
    except BundleError as e:
        raise APIError(400, str(e), code="invalid_bundle", param="path") from e
    except OSError as e:  # the path is one the OS refuses (too long, a loop, no permission)
        raise APIError(400, f"critic bundle {body.path!r}: {e.strerror or e}", code="invalid_bundle",
                       param="path") from e
    request.app.state.critic_labels = activator.labels  # what /metrics compares against next
    if services.control is not None:  # the record every other replica (and a later one) follows
        try:
            async with services.control.engine.begin() as conn:
                await audit(conn, "admin", critic_sync.ACTION, body.path[:200],
                            critic_sync.described(previous_path, previous), critic_sync.described(body.path, critic))
        except SQLAlchemyError as e:
            raise APIError(503, f"activated on this replica only: the database did not take the record "
                                f"({type(e).__name__}), so the others keep their critic; retry", "server_error",
                           "store_unavailable") from None
        await services.control.changed()
    return ActivateResponse(critic=_describe(critic), previous=PreviousCritic(name=previous.name,
                                                                              version=previous.version),
                            previous_closes_in_s=activator.grace_s)
