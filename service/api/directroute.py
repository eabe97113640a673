"""A route whose endpoint takes the Request alone and resolves what it needs itself.

FastAPI solves an endpoint's dependencies on every request: for POST /v1/chat/completions (the
services, the client key, the rate limit: three levels) that was about 0.15 ms of CPU a request on
the 2-core bench machine, a tenth of what a passthrough turn costs in all (docs/proxy.md, "What
made the request path cheaper"). This class hands the request straight to the endpoint; the route is
still an APIRoute, so the OpenAPI document describes it as before.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute


class DirectRoute(APIRoute):
    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        return self.endpoint
