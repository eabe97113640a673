"""Liveness and readiness."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from service.api.deps import ServicesDep

router = APIRouter()


@router.get("/healthz")
async def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(services: ServicesDep, request: Request) -> JSONResponse:
    critic = services.critics.current
    # Keys not read yet (the database was away at start): every issued key would get 503 here, so
    # the load balancer should send the traffic to a replica that has them.
    keys_ready = services.keys.ready
    ready = getattr(services.sink, "ready", True) and keys_ready
    body = {
        "status": "ready" if ready else "degraded",
        "keys": {"loaded": keys_ready},
        "critic": {"name": critic.name, "version": critic.version, "provider": critic.provider},
        "routes": [{"alias": r.alias, "mode": r.mode, "candidates": r.n} for r in services.settings.routes],
    }
    sync = getattr(request.app.state, "critic_sync", None)
    if sync is not None and sync.activation is not None and not sync.activation.applied:
        # Still ready: the replica serves with the critic it has, as it did before the activation.
        body["critic_activation_failed"] = sync.activation.as_dict()
    health = getattr(services.sink, "health", None)
    if callable(health):
        # A database outage does not make the replica unready: turns spool to disk meanwhile, and
        # taking every replica out of the load balancer would turn a logging outage into a full one.
        body["store"] = health()
    return JSONResponse(body, status_code=200 if ready else 503)
