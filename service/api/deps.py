"""Request dependencies: the wired services, the caller's key."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from service.api.errors import APIError
from service.critic.base import CriticSlot
from service.gate.pipeline import Gate
from service.settings import Settings
from service.store.base import TurnSink


@dataclass
class Services:
    settings: Settings
    gate: Gate
    critics: CriticSlot
    sink: TurnSink


def get_services(request: Request) -> Services:
    return request.app.state.services


def _bearer(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


@dataclass
class ClientKey:
    key: str | None
    key_id: str | None  # a digest prefix: enough to group traffic, useless to an attacker


def client_key(request: Request, services: Annotated[Services, Depends(get_services)]) -> ClientKey:
    key = _bearer(request)
    allowed = services.settings.api_keys
    if allowed and not (key and any(hmac.compare_digest(key, k) for k in allowed)):
        raise APIError(401, "Incorrect API key provided." if key else "Missing bearer API key.",
                       code="invalid_api_key")
    return ClientKey(key, hashlib.sha256(key.encode()).hexdigest()[:12] if key else None)


def admin_key(request: Request, services: Annotated[Services, Depends(get_services)]) -> None:
    expected = services.settings.admin_key
    key = _bearer(request)
    if expected is None:
        raise APIError(403, "admin API is disabled: set TURNGATE_ADMIN_KEY", "permission_error")
    if not key or not hmac.compare_digest(key, expected.get_secret_value()):
        raise APIError(401, "invalid admin key", code="invalid_api_key")


ServicesDep = Annotated[Services, Depends(get_services)]
ClientKeyDep = Annotated[ClientKey, Depends(client_key)]
AdminDep = Depends(admin_key)
