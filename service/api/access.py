"""Which routes a client key may use: every route, or the aliases an issued key names.

A model a key may not use answers exactly as one that does not exist (404 model_not_found, OpenAI's
wording), so a restricted key learns nothing about the routes it cannot reach.
"""

from __future__ import annotations

from typing import Any

from service.api.deps import ClientKey
from service.api.errors import APIError
from service.settings import RouteSettings


def unknown_model(name: str) -> APIError:
    return APIError(404, f"The model `{name}` does not exist or you do not have access to it.",
                    code="model_not_found", param="model")


def _allowed(key: ClientKey, route: RouteSettings) -> bool:
    routes = key.policy.routes if key.policy is not None else None
    return routes is None or route.alias in routes  # the catch-all's alias is '*'


def route_for_key(settings: Any, key: ClientKey, model: str) -> RouteSettings:
    """The route serving `model` for this key; 404 when there is none or the key may not use it."""
    route = settings.route_for(model)
    if route is None or not _allowed(key, route):
        raise unknown_model(model)
    return route


def models_for_key(settings: Any, key: ClientKey) -> list[str]:
    """The model names /v1/models lists to this key."""
    routes = key.policy.routes if key.policy is not None else None
    listed = settings.listed_models
    return listed if routes is None else [alias for alias in listed if alias in routes]
