"""The effective configuration in one start-up log line, secrets masked.

What an operator needs to confirm a deployment at a glance: each route (alias, mode, N, upstream,
model, whose key), the critic (name, version, provider), the database kind and where it is, Redis,
client keys. Passwords in URLs are replaced by ***, keys are reported as set or not, never shown.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit, urlunsplit

from service.settings import RouteSettings, Settings


def masked_url(url: str | None) -> str | None:
    """The URL with its password (if any) replaced by ***."""
    if not url:
        return url
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit(parts._replace(netloc=user + host))


def _route(route: RouteSettings) -> dict[str, Any]:
    policy = route.policy
    out: dict[str, Any] = {
        "alias": route.alias, "mode": route.mode, "candidates": route.n,
        "upstream": masked_url(route.upstream_base_url),
        # The catch-all forwards the name the client asked for unless it names a model itself.
        "model": route.upstream_model or ("(as asked)" if route.alias == "*" else route.alias),
        "upstream_key": "route" if route.upstream_api_key else "client",
        # Which turns reach the store: "all", "off", or "sample <share>" (docs/store.md, "Recording less").
        "record": f"sample {route.record_sample:g}" if route.record == "sample" else route.record,
    }
    if route.mode != "passthrough":
        out["upstream_supports_n"] = route.upstream_supports_n
        out["intervene_threshold"] = policy.intervene_threshold
        out["max_interventions"] = policy.max_interventions
        out["sampling"] = policy.sampling
        if route.llm_critic is not None:  # the cascade's judge (its key never shown)
            out["llm_critic"] = f"{route.llm_critic.model} at {masked_url(route.llm_critic.base_url)}"
            out["judge_max_share"] = route.cascade.max_share
    return out


def effective(settings: Settings, critic: Any) -> dict[str, Any]:
    from service.store.urls import is_sqlite

    db = settings.database_url
    return {
        "routes": [_route(r) for r in settings.routes],
        "critic": {"name": critic.name, "version": critic.version, "provider": critic.provider},
        "database": {"kind": "sqlite" if is_sqlite(db) else "postgresql", "url": masked_url(db)},
        "redis": masked_url(settings.redis_url) if settings.redis_url else "off (in-process limits)",
        "client_keys": len(settings.api_keys) if settings.api_keys else "any",
        "admin_api": "on" if settings.admin_key else "off",
        "rate_limit_per_minute": settings.rate_limit_per_minute,
    }


def one_line(summary: dict[str, Any]) -> str:
    """The summary as `key=value` text for plain logs."""
    routes = "; ".join(
        f"{r['alias']} {r['mode']} N={r['candidates']} -> {r['upstream']} model={r['model']} key={r['upstream_key']}"
        + ("" if r.get("record", "all") == "all" else f" record={r['record'].replace(' ', ':')}")
        for r in summary["routes"])
    critic = summary["critic"]
    db = summary["database"]
    return (f"routes=[{routes}] critic={critic['name']}/{critic['version']} on {critic['provider']} "
            f"database={db['kind']} {db['url']} redis={summary['redis']} client_keys={summary['client_keys']} "
            f"admin_api={summary['admin_api']}")
