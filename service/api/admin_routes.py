"""Admin API for routes (bearer TURNGATE_ADMIN_KEY): list what this replica serves, put a whole
route, delete one. A change is stored in route_overrides and audited in one transaction, then every
replica reloads (service.control.plane): within the poll interval, at once with Redis."""

from __future__ import annotations

import unicodedata
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from fastapi import APIRouter, Body, Path, Request
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from sqlalchemy.exc import SQLAlchemyError

from service import config_checks
from service.api.deps import AdminDep, Services, ServicesDep
from service.api.errors import APIError
from service.api.jsonroute import WireJSONRoute
from service.api.protocol import ErrorBody
from service.control import routes as store
from service.control.plane import audit
from service.settings import LLMCriticSettings, RouteSettings

router = APIRouter(prefix="/v1/admin", dependencies=[AdminDep], route_class=WireJSONRoute, tags=["admin"])

ALIAS_CHARS = 200  # route_overrides.alias
AliasPath = Annotated[str, Path(min_length=1, max_length=ALIAS_CHARS,
                                description="The model name clients ask for; '*' is the catch-all route.")]
_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": what} for status, what in (
        (400, "Not a valid route, or the last route"), (401, "Missing or wrong admin key"),
        (404, "No such route"), (503, "No database to store the change in"))}


def _storable(value: Any, where: str) -> None:
    """PostgreSQL refuses NUL in text and JSONB: refuse it here, naming the field, not with a 500 there."""
    if isinstance(value, str) and "\x00" in value:
        raise ValueError(f"{where}: a NUL character cannot be stored")
    if isinstance(value, dict):
        for k, v in value.items():
            _storable(v, f"{where}.{k}" if where else str(k))


def _is_http_url(v: str) -> bool:
    # urlsplit drops CR, LF and tabs without a word and reads the port only when asked: a URL with
    # either (or a space) would send every request of the route upstream malformed.
    if any(c <= " " or c == "\x7f" for c in v):
        return False
    try:
        parts = urlsplit(v)
        parts.port  # noqa: B018 - raises ValueError for a port out of range or not a number
        return parts.scheme in ("http", "https") and bool(parts.hostname)
    except ValueError:
        return False


class RouteBody(RouteSettings):
    """A whole route: the fields of a YAML route. Fields left out take their defaults, as in the YAML
    file; `upstream_api_key` left out means "forward each client's own key". To keep the stored key
    without resending it, send the masked value GET shows ('***' and its last 4 characters)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    alias: str | None = Field(  # type: ignore[assignment]  # the path names the route
        None, description="Optional; when given it must be the alias in the path.")

    @field_validator("upstream_base_url")
    @classmethod
    def _http_url(cls, v: str) -> str:
        # A typo here would take the route down on every replica within 2 s: refuse it now.
        if not _is_http_url(v):
            raise ValueError("must be an http:// or https:// URL with a host, e.g. https://api.openai.com/v1")
        return v

    @model_validator(mode="after")
    def _fits_the_database(self) -> RouteBody:
        if self.llm_critic is not None and not _is_http_url(self.llm_critic.base_url):
            raise ValueError("llm_critic.base_url must be an http:// or https:// URL with a host")
        _storable(store.stored(self), "")  # every field, the keys in clear
        return self


class LLMCriticView(LLMCriticSettings):
    """A route's LLM critic, its key masked."""

    api_key: str | None = Field(  # type: ignore[assignment]  # shown masked, never in clear
        None, description="Masked: '***' and the key's last 4 characters; null when the critic has none.")


class RouteView(RouteSettings):
    """A route as this replica serves it, its keys masked."""

    llm_critic: LLMCriticView | None = None
    upstream_api_key: str | None = Field(  # type: ignore[assignment]  # shown masked, never in clear
        None, description="Masked: '***' and the key's last 4 characters; null when the route forwards "
                          "each client's own key.")
    source: Literal["config", "admin"] = Field(description="config: as the YAML file / environment set it; "
                                                           "admin: set through this API.")


class RouteList(BaseModel):
    object: Literal["list"] = "list"
    data: list[RouteView]


class RouteDeleted(BaseModel):
    alias: str
    deleted: Literal[True] = True


def _view(route: RouteSettings, by_admin: bool) -> RouteView:
    return RouteView(**{**store.shown(route), "source": "admin" if by_admin else "config"})


def _control(services: Services):
    if services.control is None:
        raise APIError(503, "changing routes at run time needs the database store; this gateway has none "
                            "configured", "server_error", "store_unavailable")
    return services.control


def _unavailable(e: SQLAlchemyError) -> APIError:
    return APIError(503, f"the database is unavailable ({type(e).__name__}); nothing was changed, retry later",
                    "server_error", "store_unavailable")


def _not_found(alias: str) -> APIError:
    return APIError(404, f"No route {alias!r}.", "not_found_error", "route_not_found", "alias")


@router.get("/routes", responses=_ERRORS)
async def list_routes(services: ServicesDep, request: Request) -> RouteList:
    """Every route this replica serves now, with its policy."""
    sync: store.RouteSync | None = getattr(request.app.state, "route_sync", None)
    by_admin = sync.by_admin if sync is not None else frozenset()
    return RouteList(data=[_view(r, r.alias in by_admin) for r in services.settings.route_table.routes])


def _resolve_key(given: SecretStr | None, current: SecretStr | None, dev: bool,
                 name: str = "upstream_api_key", unset: str = "forward each client's own key") -> SecretStr | None:
    """The masked value GET shows means "keep the stored key"; any other '***...' is a mistake, and
    an example value is refused as it is in the YAML file (unless TURNGATE_DEV)."""
    if given is None:
        return None
    if not given.get_secret_value().startswith(store.MASK):
        if not dev and (why := config_checks.weak_secret(given.get_secret_value(), ours=False)):
            raise APIError(400, f"{name} {why}: send the real key", param=name, code="invalid_value")
        return given
    if current is not None and store.mask_key(current) == given.get_secret_value():
        return current
    raise APIError(400, f"{name}: this is a masked key that does not match this route's key; send the "
                        f"real key, or leave it out to {unset}", param=name, code="invalid_value")


def _check_alias(alias: str) -> None:
    # A model name is printable: control characters and line breaks would reach logs and metric labels.
    if any(unicodedata.category(ch) in ("Cc", "Cs", "Zl", "Zp") for ch in alias):
        raise APIError(400, "alias: control characters and line breaks are not allowed in a model name",
                       param="alias", code="invalid_value")


@router.put("/routes/{alias:path}", responses=_ERRORS)
async def put_route(alias: AliasPath, body: Annotated[RouteBody, Body()], services: ServicesDep) -> RouteView:
    """Create or replace the route `alias` (a whole route: fields left out take their defaults)."""
    if body.alias is not None and body.alias != alias:
        raise APIError(400, f"alias: the body says {body.alias!r} but the path says {alias!r}", param="alias",
                       code="invalid_value")
    _check_alias(alias)
    control = _control(services)
    try:
        async with control.engine.begin() as conn:
            await store.lock_routes(conn)
            current = (await store.effective(conn, services.settings.seed_routes)).get(alias)
            fields = body.model_dump(exclude={"alias", "upstream_api_key"})
            key = _resolve_key(body.upstream_api_key, current.upstream_api_key if current else None,
                               services.settings.dev)
            if body.llm_critic is not None:
                held = current.llm_critic if current is not None else None
                fields["llm_critic"]["api_key"] = _resolve_key(
                    body.llm_critic.api_key, held.api_key if held is not None else None, services.settings.dev,
                    "llm_critic.api_key", "call the LLM critic without a key")
            route = RouteSettings(alias=alias, upstream_api_key=key, **fields)
            await store.upsert(conn, alias, store.stored(route), deleted=False)
            before = store.shown(current) if current is not None else None
            await audit(conn, "admin", "route.put", alias, before, store.shown(route))
    except SQLAlchemyError as e:
        raise _unavailable(e) from None
    await control.changed()
    return _view(route, by_admin=True)


@router.delete("/routes/{alias:path}", responses=_ERRORS)
async def delete_route(alias: AliasPath, services: ServicesDep) -> RouteDeleted:
    """Stop serving `alias` on every replica. The last route cannot be deleted: it would serve nothing."""
    control = _control(services)
    seed = services.settings.seed_routes
    try:
        async with control.engine.begin() as conn:
            await store.lock_routes(conn)
            routes = await store.effective(conn, seed)
            current = routes.get(alias)
            if current is None:
                raise _not_found(alias)
            if len(routes) == 1:
                raise APIError(400, f"{alias!r} is the last route: a gateway without routes serves nothing; put "
                                    "another route first", param="alias", code="last_route")
            await store.remove(conn, alias, seeded=any(r.alias == alias for r in seed))
            await audit(conn, "admin", "route.delete", alias, store.shown(current), None)
    except SQLAlchemyError as e:
        raise _unavailable(e) from None
    await control.changed()
    return RouteDeleted(alias=alias)
