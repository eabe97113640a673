"""Routes changed at run time: the YAML/environment routes (the seed) overlaid with the
route_overrides rows the admin API writes.

A row replaces the seed route of its alias, adds a new alias, or (deleted=True, a tombstone)
removes a seed route. Every replica's reloader reads the rows whole after each change and swaps the
new table in (Settings.serve_routes); a turn already running keeps the route object it started with.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

from pydantic import SecretStr, ValidationError
from sqlalchemy import delete, select, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from service.settings import RouteSettings, Settings
from service.store.models import RouteOverride

log = logging.getLogger(__name__)

MASK = "***"
# Route changes take this PostgreSQL advisory lock (transaction-scoped), so two replicas deleting
# routes at once cannot both see "another route is left" and leave none.
_ROUTES_LOCK = 0x7475726E  # "turn"


def mask_key(key: SecretStr | None) -> str | None:
    """How a route's upstream key is shown (GET, audit log): '***' and, for a key long enough that
    it gives little away, its last 4 characters."""
    if key is None:
        return None
    value = key.get_secret_value()
    return MASK + (value[-4:] if len(value) >= 12 else "")


def shown(route: RouteSettings) -> dict[str, Any]:
    """The route as JSON, its keys (the upstream's, the LLM critic's) masked."""
    out = route.model_dump(mode="json")
    out["upstream_api_key"] = mask_key(route.upstream_api_key)
    if route.llm_critic is not None:
        out["llm_critic"]["api_key"] = mask_key(route.llm_critic.api_key)
    return out


def _clear(key: SecretStr | None) -> str | None:
    return key.get_secret_value() if key else None


def stored(route: RouteSettings) -> dict[str, Any]:
    """The route as its route_overrides.spec: every field but the alias (the row's key), the keys in clear
    (they are sent upstream; they sit in the database as they sit in the YAML file)."""
    out = route.model_dump(mode="json", exclude={"alias"})
    out["upstream_api_key"] = _clear(route.upstream_api_key)
    if route.llm_critic is not None:
        out["llm_critic"]["api_key"] = _clear(route.llm_critic.api_key)
    return out


def overlay(seed: Iterable[RouteSettings], rows: Iterable[RouteOverride]) -> list[RouteSettings]:
    """The effective routes: seed order, each replaced or removed by its row; new aliases after, by name.
    A row that no longer validates (a setting renamed by an upgrade) is skipped, loudly: its alias
    keeps what it had in the seed."""
    routes = {r.alias: r for r in seed}
    added: dict[str, RouteSettings] = {}
    for row in rows:
        if row.deleted:
            routes.pop(row.alias, None)
            continue
        try:
            route = RouteSettings(**{**(row.spec or {}), "alias": row.alias})
        except ValidationError as e:
            log.error("route %r in route_overrides is not a valid route, ignored: %s", row.alias,
                      "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()))
            continue
        if row.alias in routes:
            routes[row.alias] = route
        else:
            added[row.alias] = route
    return [*routes.values(), *(added[a] for a in sorted(added))]


async def _rows(conn: AsyncConnection, alias: str | None = None) -> list[RouteOverride]:
    query = select(RouteOverride)
    if alias is not None:
        query = query.where(RouteOverride.alias == alias)
    return list((await conn.execute(query)).all())  # type: ignore[arg-type]  # rows read by attribute


class RouteSync:
    """The control-plane reloader that keeps `settings` serving the effective routes."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.seed = settings.seed_routes  # captured before the first change
        self.by_admin: frozenset[str] = frozenset()  # aliases a route_overrides row sets (or deletes)

    async def reload(self, conn: AsyncConnection) -> None:
        rows = await _rows(conn)
        routes = overlay(self.seed, rows)
        self.by_admin = frozenset(row.alias for row in rows)
        old = self.settings.route_table.by_alias
        if routes == list(old.values()):
            return
        self.settings.serve_routes(routes)
        new = self.settings.route_table.by_alias
        changes = [f"-{a}" for a in old if a not in new] + [
            f"{'~' if a in old else '+'}{a} ({r.mode}, N={r.n})" for a, r in new.items() if old.get(a) != r]
        log.info("routes changed: %s; %d served", ", ".join(changes), len(new))
        if not routes:
            log.error("no routes left to serve: every model name gets 404 until a route is put")


async def lock_routes(conn: AsyncConnection) -> None:
    """Serializes route changes across replicas (PostgreSQL; SQLite serializes writers itself)."""
    if conn.dialect.name == "postgresql":
        await conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _ROUTES_LOCK})


async def effective(conn: AsyncConnection, seed: Sequence[RouteSettings]) -> dict[str, RouteSettings]:
    """The effective routes as the database has them now (in the caller's transaction)."""
    return {r.alias: r for r in overlay(seed, await _rows(conn))}


async def upsert(conn: AsyncConnection, alias: str, spec: dict[str, Any] | None, deleted: bool) -> None:
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    values = {"alias": alias, "spec": spec, "deleted": deleted, "updated_at": datetime.now(UTC)}
    stmt = dialect.insert(RouteOverride).values(**values)
    await conn.execute(stmt.on_conflict_do_update(index_elements=["alias"],
                                                  set_={k: v for k, v in values.items() if k != "alias"}))


async def remove(conn: AsyncConnection, alias: str, seeded: bool) -> None:
    """A seed route gets a tombstone (the YAML file would bring it back otherwise); a route the
    admin API added loses its row."""
    if seeded:
        await upsert(conn, alias, None, deleted=True)
    else:
        await conn.execute(delete(RouteOverride).where(RouteOverride.alias == alias))
