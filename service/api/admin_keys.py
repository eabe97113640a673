"""Admin API for client keys (bearer TURNGATE_ADMIN_KEY): issue, list, show, change and revoke.

The secret is in the creation reply only. Every change is audited with the change, then announced
to every replica (service.control.plane), whose key cache reloads within control_poll_s.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query
from pydantic import AfterValidator, AwareDatetime, BaseModel, ConfigDict, Field, model_validator
from sqlalchemy.exc import SQLAlchemyError

from service.api.deps import AdminDep, Services, ServicesDep
from service.api.errors import APIError
from service.api.jsonroute import WireJSONRoute
from service.api.protocol import ErrorBody
from service.control import keys
from service.control.key_policy import BudgetPeriod
from service.limits import spend as spend_meter
from service.store import cursors

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/admin/keys", dependencies=[AdminDep], route_class=WireJSONRoute)

MAX_LIMIT = 1000  # keys a page
_INT32 = 2**31 - 1
_INT64 = 2**63 - 1
_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": what} for status, what in (
        (400, "Invalid fields"), (401, "Missing or wrong admin key"), (403, "The admin API is disabled"),
        (404, "No such key, or it is revoked"), (503, "No database, or TURNGATE_KEY_HASH_SECRET unset"))}


def _storable(v: str) -> str:
    """Text every database stores: no NUL (PostgreSQL refuses it), no lone surrogate (no UTF-8 for it)."""
    if "\x00" in v:
        raise ValueError("must not contain a NUL character")
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode text") from None
    return v


def _future_utc(v: datetime | None) -> datetime | None:
    if v is None:
        return None
    try:
        v = v.astimezone(UTC)
    except OverflowError:  # e.g. 9999-12-31T23:00-05:00 is past the last date Python can hold
        raise ValueError("is out of range") from None
    if v <= datetime.now(UTC):
        raise ValueError("must be in the future")
    return v


Name = Annotated[str, Field(min_length=1, max_length=200), AfterValidator(_storable)]
Alias = Annotated[str, Field(min_length=1, max_length=200), AfterValidator(_storable)]
PositiveInt32 = Annotated[int, Field(gt=0, le=_INT32, strict=True)]
Expiry = Annotated[AwareDatetime, AfterValidator(_future_utc)]


class _KeyFields(BaseModel):
    model_config = ConfigDict(extra="forbid")

    routes: list[Alias] | None = Field(None, min_length=1, max_length=1000,
                                       description="Route aliases the key may use ('*': the catch-all route); "
                                                   "null: every route.")
    rpm: PositiveInt32 | None = Field(None, description="Requests per minute; overrides "
                                                         "TURNGATE_RATE_LIMIT_PER_MINUTE for this key.")
    tpm: PositiveInt32 | None = Field(None, description="Tokens per minute.")
    budget_tokens: Annotated[int, Field(gt=0, le=_INT64, strict=True)] | None = Field(
        None, description="Tokens per budget_period.")
    budget_period: Literal["day", "month"] | None = None
    expires_at: Expiry | None = Field(None, description="With a time zone; the key gets 401 from then on.")


class KeyCreate(_KeyFields):
    name: Name

    @model_validator(mode="after")
    def _budget(self) -> KeyCreate:
        keys.check_budget(self.budget_tokens, self.budget_period)
        return self


class KeyUpdate(_KeyFields):
    """Only the fields given change; null clears one (name excepted)."""

    name: Name | None = None

    @model_validator(mode="after")
    def _name_not_cleared(self) -> KeyUpdate:
        if "name" in self.model_fields_set and self.name is None:
            raise ValueError("name cannot be cleared")
        return self


class KeyView(BaseModel):
    id: str
    object: Literal["api_key"] = "api_key"
    name: str
    prefix: str = Field(description="The secret's first characters, to tell keys apart.")
    routes: list[str] | None
    rpm: int | None
    tpm: int | None
    budget_tokens: int | None
    budget_period: Literal["day", "month"] | None
    expires_at: datetime | None
    created_at: datetime
    updated_at: datetime
    revoked_at: datetime | None
    revoked: bool


class KeySpend(BaseModel):
    period: Literal["day", "month"] = Field(description="The budget's period (month when the key has no budget).")
    tokens: int | None = Field(description="Tokens billed to the key in the current period (UTC); null when "
                                           "the meter cannot tell (Redis unreachable).")
    tokens_last_minute: int | None


class KeyDetail(KeyView):
    spend: KeySpend = Field(description="What the key spent, as the limits see it: every candidate and round.")


class KeyCreated(KeyView):
    key: str = Field(description="The secret, shown this once: give it to the client as its API key.")


class KeyList(BaseModel):
    object: Literal["list"] = "list"
    data: list[KeyView]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next (older) page; null at the end")


def _engine(services: Services) -> Any:
    if services.control is None:
        raise APIError(503, "client keys need the database store; this gateway has none configured",
                       "server_error", "store_unavailable")
    return services.control.engine


@contextmanager
def _store() -> Iterator[None]:
    """The database's failures and the key module's refusals, as API errors."""
    try:
        yield
    except keys.UnknownKey as e:
        raise APIError(404, f"No live key with id {str(e)[:64]!r} (unknown, or revoked).", "not_found_error",
                       "key_not_found", "id") from None
    except keys.InvalidKeyFields as e:
        raise APIError(400, str(e), code="invalid_value",
                       param="budget_period" if str(e).startswith("budget_period") else "budget_tokens") from None
    except keys.KeyHashSecretMissing:
        raise APIError(503, "issuing client keys needs TURNGATE_KEY_HASH_SECRET (at least 16 random characters, "
                            "e.g. `openssl rand -hex 32`), the same on every replica; set it and restart",
                       "server_error", "key_hash_secret_unset") from None
    except SQLAlchemyError as e:
        log.warning("admin keys: database error (%s)", type(e).__name__)
        raise APIError(503, "the database is unavailable; retry later", "server_error", "store_unavailable") from None


async def _announce(services: Services) -> None:
    try:
        await services.control.changed()
    except Exception as e:  # committed already: the other replicas' poll (and this one's) carries it
        log.warning("admin keys: change committed but not announced (%s); replicas pick it up by polling",
                    type(e).__name__)


KeyId = Annotated[str, Path(max_length=64, description="The key's id (key_...).")]


@router.post("", status_code=201, responses=_ERRORS)
async def create_key(body: KeyCreate, services: ServicesDep) -> KeyCreated:
    """Issue a key. The reply holds the secret; nothing shows it again. Issuing the first key makes
    client keys required on every replica."""
    engine = _engine(services)
    secret = services.settings.key_hash_secret
    with _store():
        created, key = await keys.create_key(engine, secret.get_secret_value() if secret else None,
                                             body.model_dump(include=set(keys.EDITABLE)))
    await _announce(services)
    return KeyCreated(**created, key=key)


@router.get("", responses=_ERRORS)
async def list_keys(
        services: ServicesDep,
        limit: Annotated[int, Query(ge=1, le=MAX_LIMIT, description="Keys per page")] = 100,
        cursor: Annotated[str | None, Query(min_length=1, max_length=1000)] = None,
        revoked: Annotated[bool | None, Query(description="Only revoked keys (true) or only live ones (false)")]
        = None) -> KeyList:
    """Issued keys, newest first, revoked ones included unless `revoked` says; never a secret.
    `next_cursor` pages back through older ones."""
    engine = _engine(services)
    with _store():
        try:
            views, next_cursor = await keys.list_keys(engine, limit, cursor, revoked)
        except cursors.BadCursor:
            raise APIError(400, "cursor: not a cursor this API gave out", param="cursor",
                           code="invalid_cursor") from None
    return KeyList(data=[KeyView(**v) for v in views], next_cursor=next_cursor)


@router.get("/{key_id}", responses=_ERRORS)
async def get_key(key_id: KeyId, services: ServicesDep) -> KeyDetail:
    """One key, with its spend in the current budget period and the last minute."""
    engine = _engine(services)
    with _store():
        view = await keys.get_key(engine, key_id)
    period: BudgetPeriod = view.get("budget_period") or "month"
    meter = services.spend
    spent = await spend_meter.spend(meter, key_id, period) if meter is not None else None
    last_minute = await spend_meter.tpm_used(meter, key_id) if meter is not None else None
    return KeyDetail(**view, spend=KeySpend(period=period, tokens=spent, tokens_last_minute=last_minute))


@router.patch("/{key_id}", responses=_ERRORS)
async def update_key(key_id: KeyId, body: KeyUpdate, services: ServicesDep) -> KeyView:
    """Change the fields given; null clears one. Clearing budget_tokens clears budget_period too."""
    engine = _engine(services)
    changes = {f: getattr(body, f) for f in body.model_fields_set if f in keys.EDITABLE}
    with _store():
        if not changes:
            return KeyView(**await keys.get_key(engine, key_id))
        updated = await keys.update_key(engine, key_id, changes)
    await _announce(services)
    return KeyView(**updated)


@router.delete("/{key_id}", responses=_ERRORS)
async def revoke_key(key_id: KeyId, services: ServicesDep) -> KeyView:
    """Revoke: the key gets 401 on every replica within control_poll_s; its row stays, shown revoked."""
    engine = _engine(services)
    with _store():
        revoked = await keys.revoke_key(engine, key_id)
    await _announce(services)
    return KeyView(**revoked)
