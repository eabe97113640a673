"""Every HTTP answer: an `x-request-id` (the client's, or a new one), the turn id once a turn exists
(with `x-turngate-recorded: false` when its route does not record it), and a count in
turngate_requests_total{route, endpoint, status}.

A pure-ASGI middleware, outermost, so the answers made before any router runs (413 from the body
limit, 404 for an unknown path) and after an unexpected exception carry the id and are counted too.
Label values are bounded: the route is a configured alias or "none", the endpoint a path template of
the app or "other", the status an HTTP code.
"""

from __future__ import annotations

import logging
import re
import uuid
from typing import Any

from fastapi import Request
from starlette.requests import ClientDisconnect

from service.api.errors import APIError
from service.telemetry import metrics
from service.telemetry.logs import REQUEST_ID
from service.telemetry.tracing import Tracing

log = logging.getLogger(__name__)

# A client's own id is kept when it is short and plain; anything else is replaced, so that logs and
# headers never carry what a client chose to inject.
_GOOD_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
_ROUTE, _TURN = "turngate_route", "turngate_turn_id"  # keys in the request's scope["state"]
_UNRECORDED = "turngate_unrecorded"


def note_route(request: Request, alias: str) -> None:
    """The route serving this request (the metric's `route` label)."""
    setattr(request.state, _ROUTE, alias)


def note_turn(request: Request, turn_id: str, recorded: bool = True) -> None:
    """The turn this request started: its id goes on the response, an error response included, and
    `x-turngate-recorded: false` when the route does not record it (feedback for it will not be found)."""
    setattr(request.state, _TURN, turn_id)
    if not recorded:
        setattr(request.state, _UNRECORDED, True)


class RequestContext:
    def __init__(self, app: Any, paths: set[str], tracing: Tracing | None = None) -> None:
        self.app = app
        self.paths = paths  # the app's own paths, for requests answered before routing
        self.tracing = tracing  # when on: the client's traceparent is the parent of the turn's spans

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = _header(scope, b"x-request-id")
        request_id = given if given and _GOOD_ID.fullmatch(given) else f"req_{uuid.uuid4().hex}"
        state = scope.setdefault("state", {})
        status = 500
        started = False
        token = REQUEST_ID.set(request_id)
        trace_token = self.tracing.attach_incoming(scope.get("headers") or []) if self.tracing else None

        async def send_with_ids(message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                started, status = True, message["status"]
                # turngate's id replaces any other (an upstream's id, if relayed, has a name of its own)
                headers, has_turn = [], False
                for name, value in message.get("headers") or ():
                    lower = name.lower()
                    if lower != b"x-request-id":
                        headers.append((name, value))
                        has_turn = has_turn or lower == b"x-turngate-turn-id"
                headers.append((b"x-request-id", request_id.encode()))
                if state.get(_TURN) and not has_turn:
                    headers.append((b"x-turngate-turn-id", state[_TURN].encode()))
                if state.get(_UNRECORDED):
                    headers.append((b"x-turngate-recorded", b"false"))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_ids)
        except ClientDisconnect:  # the client hung up before its body was all in: nobody to answer
            status = 499
        except Exception:
            # Past every handler: answer in the envelope here (Starlette's last resort would answer
            # without the ids), and log it, which the re-raise would have had uvicorn do.
            log.exception("unhandled error in %s %s", scope.get("method"), scope.get("path"))
            if started:
                raise
            await APIError(500, "internal error in turngate", "server_error").response()(scope, receive, send_with_ids)
        finally:
            if self.tracing is not None and trace_token is not None:
                self.tracing.detach(trace_token)
            REQUEST_ID.reset(token)
            metrics.labelled(metrics.REQUESTS, state.get(_ROUTE) or "none", self._endpoint(scope), str(status)).inc()

    def _endpoint(self, scope) -> str:
        route = scope.get("route")
        if route is not None and getattr(route, "path", None):
            return route.path
        return scope["path"] if scope["path"] in self.paths else "other"


def _header(scope, name: bytes) -> str | None:
    for key, value in scope.get("headers") or ():
        if key.lower() == name:
            return value.decode("latin-1")
    return None
