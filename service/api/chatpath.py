"""POST /v1/chat/completions straight to its endpoint, past the router.

Every request otherwise walks Starlette's and FastAPI's routing (each included router's match, the
route's per-request exit stacks, a second exception wrapper): 15% of the proxy's instructions in
passthrough (bench/proxy_instructions.py, docs/proxy.md). This middleware sits innermost among the app's own,
under the request context and the body limit, and hands that one path to the endpoint through an
ExceptionMiddleware with the app's handlers, so every answer, error envelopes included, is what
the routed path gives. Any other path or method, a root_path or a trailing slash takes the
ordinary route.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.routing import APIRoute
from starlette.middleware.exceptions import ExceptionMiddleware

Endpoint = Callable[[Request], Coroutine[Any, Any, Response]]


class ChatFastPath:
    def __init__(self, app: Any, fastapi: FastAPI, route: APIRoute) -> None:
        self.app = app
        self.route = route
        self.path = route.path
        endpoint: Endpoint = route.endpoint
        self._endpoint = endpoint
        # The handlers FastAPI gives its ExceptionMiddleware (500 and Exception are the outer layers').
        handlers = {k: v for k, v in fastapi.exception_handlers.items() if k not in (500, Exception)}
        self._direct = ExceptionMiddleware(self._serve, handlers=handlers)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"] == self.path and scope["method"] == "POST" \
                and not scope.get("root_path"):
            scope["route"], scope["endpoint"], scope["path_params"] = self.route, self._endpoint, {}
            return await self._direct(scope, receive, send)
        return await self.app(scope, receive, send)

    async def _serve(self, scope, receive, send) -> None:
        response = await self._endpoint(Request(scope, receive, send))
        await response(scope, receive, send)
