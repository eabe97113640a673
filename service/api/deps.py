"""Request dependencies: the wired services, the caller's key."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import Depends, Request

from service.api.errors import APIError
from service.control.key_policy import KeyPolicy
from service.control.keys import KeyCache
from service.critic.base import CriticSlot
from service.gate.pipeline import Gate
from service.limits import spend
from service.limits.spend import SpendMeter
from service.settings import Settings
from service.store.base import TurnSink


@dataclass
class Services:
    settings: Settings
    gate: Gate
    critics: CriticSlot
    sink: TurnSink
    limiter: Any = None  # service.limits.ratelimit.*Limiter, None when unlimited
    forwarder: Any = None  # service.api.forward.Forwarder: the endpoints passed to the upstream ungated
    control: Any = None  # service.control.plane.ControlPlane; None without a database store
    spend: SpendMeter | None = None  # tokens per client key (service.limits.spend)
    keys: KeyCache = field(default_factory=lambda: KeyCache(None))  # keys issued through the admin API


# Dependencies are `async def` although they never await: FastAPI runs a plain `def` dependency on
# its thread pool, two thread hops per request for nothing.
async def get_services(request: Request) -> Services:
    return request.app.state.services


def _bearer(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def _same_key(given: str, expected: str) -> bool:
    # Header values arrive decoded as latin-1 and may hold any byte; compare_digest only takes ASCII
    # str, so compare the bytes the client sent with the key's UTF-8 bytes.
    return hmac.compare_digest(given.encode("latin-1", "replace"), expected.encode())


@dataclass
class ClientKey:
    key: str | None
    key_id: str | None  # a digest prefix (or, for an issued key, its id): groups traffic, useless to an attacker
    policy: KeyPolicy | None = None  # set for a key issued through the admin API

    @property
    def upstream_key(self) -> str | None:
        """The bearer sent upstream by a route without a key of its own: the client's own key, never
        one turngate issued (a third party has no business seeing it, and could not use it)."""
        return None if self.policy is not None else self.key


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode("latin-1", "replace")).hexdigest()[:12]


async def client_key(request: Request, services: Annotated[Services, Depends(get_services)]) -> ClientKey:
    """The caller's key. A key of TURNGATE_API_KEYS, or a live key issued through the admin API;
    any key (or none) when neither the list is set nor any key was ever issued."""
    key = _bearer(request)
    allowed = services.settings.api_keys
    if key and allowed and any(_same_key(key, k) for k in allowed):
        return ClientKey(key, _digest(key))
    if not services.keys.ready:  # fail closed: an open gateway would let revoked keys and strangers in
        raise APIError(503, "Client keys are not loaded yet (the database is unreachable); retry shortly.",
                       "server_error", "keys_unavailable", headers={"retry-after": "1"})
    issued = services.keys.lookup(key) if key else None
    now = datetime.now(UTC)
    if issued is not None:
        refusal = issued.refusal(now)  # revoked or expired: refused even where keys are not required
        if refusal:
            raise APIError(401, refusal, code="invalid_api_key")
        return ClientKey(key, issued.policy.id, issued.policy)
    if allowed or services.keys.any_issued:
        raise APIError(401, "Incorrect API key provided." if key else "Missing bearer API key.",
                       code="invalid_api_key")
    return ClientKey(key, _digest(key) if key else None)


async def rate_limited(key: Annotated[ClientKey, Depends(client_key)],
                       services: Annotated[Services, Depends(get_services)]) -> ClientKey:
    """The client key, once its request budget allows one more request (429 otherwise): an issued
    key's own rpm, else TURNGATE_RATE_LIMIT_PER_MINUTE."""
    per_minute = (key.policy.rpm if key.policy is not None else None) or services.settings.rate_limit_per_minute
    if services.limiter is not None and per_minute:
        verdict = await services.limiter.hit(key.key_id or "anonymous", per_minute)
        if not verdict.allowed:
            raise APIError(429, "Rate limit reached for this API key; retry after the window resets.",
                           "rate_limit_error", "rate_limit_exceeded",
                           headers={"retry-after": str(verdict.retry_after_s)})
    await within_spend(key, services)
    return key


async def within_spend(key: ClientKey, services: Services) -> None:
    """429 when the key's policy has a tokens-per-minute limit its last minute reached, or a token
    budget its period spent. Only issued keys have a policy; the others are neither charged nor limited."""
    if key.policy is None or key.key_id is None or services.spend is None:
        return
    refusal = await spend.refusal(services.spend, key.key_id, key.policy)
    if refusal is None:
        return
    if refusal.code == "budget_exceeded":
        # OpenAI's type for a spent quota; x-should-retry tells its SDKs not to retry before the reset.
        raise APIError(429, refusal.message, "insufficient_quota", refusal.code,
                       headers={"retry-after": str(refusal.retry_after_s), "x-should-retry": "false"})
    raise APIError(429, refusal.message, "rate_limit_error", refusal.code,
                   headers={"retry-after": str(refusal.retry_after_s)})


async def admin_key(request: Request, services: Annotated[Services, Depends(get_services)]) -> None:
    expected = services.settings.admin_key
    key = _bearer(request)
    if expected is None:
        raise APIError(403, "admin API is disabled: set TURNGATE_ADMIN_KEY", "permission_error")
    if not key or not _same_key(key, expected.get_secret_value()):
        raise APIError(401, "invalid admin key", code="invalid_api_key")


async def limited_key(request: Request) -> tuple[Services, ClientKey]:
    """The services and the caller's key once its budgets allow the request: client_key then
    rate_limited, called directly by an endpoint on a DirectRoute (service.api.directroute)."""
    services = request.app.state.services
    # An override of client_key (FastAPI's dependency_overrides: what tests put in front of the key
    # store) applies here as on the routes that declare it; it takes the request.
    override = request.app.dependency_overrides.get(client_key)
    key = await (override(request) if override is not None else client_key(request, services))
    return services, await rate_limited(key, services)


ServicesDep = Annotated[Services, Depends(get_services)]
ClientKeyDep = Annotated[ClientKey, Depends(client_key)]
LimitedKeyDep = Annotated[ClientKey, Depends(rate_limited)]
AdminDep = Depends(admin_key)
