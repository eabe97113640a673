"""Routes whose JSON bodies are parsed by service.wirejson (bounded, RFC 8259), not by `json.loads`.

FastAPI reads a declared body through `Request.json()`; this route class hands it a request whose
`json()` is turngate's parser, so every router that uses it refuses a 100k-deep, 5,000-digit or
NaN-laden body with a 400 in OpenAI's envelope instead of failing later.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import HTTPException, Request, Response
from fastapi.routing import APIRoute

from service import wirejson


def parse_error_message(e: wirejson.WireJSONError) -> str:
    return f"We could not parse the JSON body of your request: {e}"


class _WireJSONRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            try:
                self._json = wirejson.loads(await self.body())
            except wirejson.WireJSONError as e:
                raise HTTPException(400, parse_error_message(e)) from None
        return self._json


class WireJSONRoute(APIRoute):
    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            return await handler(_WireJSONRequest(request.scope, request.receive))

        return route
