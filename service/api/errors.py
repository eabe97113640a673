"""Every error leaves turngate in OpenAI's envelope: {"error": {message, type, param, code}}.

Status map: 400 bad request, 401 auth, 404 unknown model/id, 413 too large, 422 turn_rejected
(the gate judged every candidate unsafe and the route says to stop), 429 upstream rate limit with
its Retry-After, 502 upstream failure or garbage, 504 upstream timeout.

Upstream 4xx: when turngate forwards the client's own key, the upstream's status, message, type,
code and param reach the client (a refused key is the client's; nothing else of the upstream's
reply is relayed). When the route holds its own upstream key, a 401/403 is turngate's fault: 502
`upstream_auth`, with turngate's message only (service.upstream.client).
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from service.api.protocol import ErrorBody, ErrorDetail
from service.gate.pipeline import TurnRejected
from service.upstream.client import UpstreamError


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.code, self.param, self.headers = code, param, headers or {}

    def body(self) -> dict:
        return ErrorBody(error=ErrorDetail(message=self.message, type=self.type, param=self.param,
                                           code=self.code)).model_dump()

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def from_validation(exc: ValidationError | RequestValidationError) -> APIError:
    # The deepest error says the most: for `content: str | list[part]` it is the bad part, not "not a str".
    err = max(exc.errors(), key=lambda e: len(e.get("loc", ())))
    param = _param(err.get("loc", ()))
    return APIError(400, f"{param + ': ' if param else ''}{err.get('msg')}", param=param,
                    code="invalid_value")


_TYPE_TAGS = {"str", "int", "float", "bool", "none", "dict", "list"}


def _param(loc) -> str | None:
    """OpenAI's spelling of a location, `messages[0].content[1].text`, without pydantic's union tags."""
    out = ""
    for i, part in enumerate(loc):
        if i == 0 and part in ("query", "path", "header"):  # where a parameter came from: `limit`, not `query.limit`
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        elif part != "body" and not _is_tag(part):
            out += f".{part}" if out else str(part)
    return out or None


def _is_tag(part: str) -> bool:
    return "[" in part or part in _TYPE_TAGS or part[:1].isupper()


def from_upstream(exc: UpstreamError) -> APIError:
    # The failed call's rate-limit and request-id headers go along (service.upstream.client).
    headers = dict(exc.headers)
    if exc.kind == "timeout":
        return APIError(504, exc.message, "upstream_error", "upstream_timeout", headers=headers)
    if exc.kind == "rate_limited":
        if exc.retry_after:
            headers["retry-after"] = exc.retry_after
        return APIError(429, exc.message, "rate_limit_error", "rate_limit_exceeded", headers=headers)
    if exc.kind == "client_error" and exc.status:
        detail = (exc.body or {}).get("error") or {}
        return APIError(exc.status, exc.message, detail.get("type") or "invalid_request_error",
                        detail.get("code"), detail.get("param"), headers=headers)
    # server_error, connect, garbage, stream_error, auth (the route's own key refused: its message is
    # turngate's, and it carries no headers)
    return APIError(502, exc.message, "upstream_error", f"upstream_{exc.kind}", headers=headers)


def from_rejection(exc: TurnRejected) -> APIError:
    return APIError(422, exc.message, "turn_rejected", "turn_rejected",
                    headers={"x-turngate-turn-id": exc.record.turn_id, "x-turngate-decision": "rejected"})


def from_http(request: Request, exc: HTTPException) -> APIError:
    """Starlette's own refusals (no route for the path, a method the path does not take, a body
    service.api.jsonroute could not parse) in the envelope, each with a code a client can test."""
    where = f"{request.method} {request.url.path}"
    if exc.status_code == 404:
        return APIError(404, f"Unknown request URL: {where}. turngate serves the OpenAI API under /v1 "
                             "(chat/completions, completions, embeddings, responses, models).", code="unknown_url")
    if exc.status_code == 405:
        return APIError(405, f"Method not allowed: {where}.", code="method_not_allowed",
                        headers=dict(exc.headers or {}))
    return APIError(exc.status_code, str(exc.detail), code="invalid_json" if exc.status_code == 400 else None,
                    headers=dict(exc.headers or {}))


def install(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api(_: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError):
        return from_validation(exc).response()

    @app.exception_handler(UpstreamError)
    async def _upstream(_: Request, exc: UpstreamError):
        return from_upstream(exc).response()

    @app.exception_handler(TurnRejected)
    async def _rejected(_: Request, exc: TurnRejected):
        return from_rejection(exc).response()

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException):
        return from_http(request, exc).response()

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception):
        return APIError(500, "internal error in turngate", "server_error").response()
