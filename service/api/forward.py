"""POST /v1/embeddings, /v1/completions and /v1/responses: forwarded to the route's upstream, not gated.

An agent that points one base_url at turngate also embeds, completes text and calls the Responses
API through it. These requests are not turns the critic can judge (no chat candidates to rank), so
they go to the upstream of the route their `model` names, as sent: the body unchanged but for the
model name the route sends upstream, the route's upstream key (or the client's own), and the reply
relayed as it comes, JSON whole and SSE streams chunk by chunk. They are counted
(turngate_requests_total, by endpoint), not stored as turns; the tokens their usage reports are
charged to the client key's spend after the reply (service.api.forwarded_usage).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse
from starlette.background import BackgroundTask

from service import wirejson
from service.api import forwarded_usage
from service.api.access import route_for_key
from service.api.deps import ClientKey, LimitedKeyDep, ServicesDep
from service.api.errors import APIError, from_upstream
from service.api.jsonroute import parse_error_message
from service.api.protocol import ErrorBody
from service.api.replies import error_event
from service.api.requests import note_route
from service.settings import RouteSettings
from service.telemetry import metrics, spans
from service.upstream import transport
from service.upstream.client import UpstreamError, _status_error

router = APIRouter()

ENDPOINTS = ("embeddings", "completions", "responses")
# Upstream reply headers relayed to the client; the rest describe the upstream's connection to turngate.
_RELAYED_HEADERS = {b"content-type", b"retry-after"}
_BODY = {"requestBody": {"required": True, "content": {"application/json": {"schema": {
    "type": "object", "required": ["model"], "additionalProperties": True,
    "properties": {"model": {"type": "string", "minLength": 1}, "stream": {"type": "boolean"}}}}}}}
_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": what} for status, what in (
        (400, "The request is malformed"), (401, "Missing or wrong API key"), (404, "Unknown model"),
        (413, "The body is over the size limit"), (429, "Rate limited"), (502, "The upstream failed"),
        (504, "The upstream timed out"))}


class Forwarder:
    """Sends a request body to an upstream over the actor client's connection pools."""

    def __init__(self, pool: transport.ConnectionPools, max_reply_bytes: int | None = None) -> None:
        self._pool = pool
        self.max_reply_bytes = max_reply_bytes  # a reply's body, JSON or stream (upstream_max_reply_bytes)

    async def send(self, route: RouteSettings, endpoint: str, content: bytes, client_key: str | None,
                   accept: str | None) -> transport.Response:
        """The upstream's response, its body not read yet: the caller reads or streams it, then closes it."""
        key = route.upstream_api_key.get_secret_value() if route.upstream_api_key else client_key
        url = route.upstream_base_url.rstrip("/") + "/" + endpoint
        headers = [(b"content-type", b"application/json")]
        if key:
            headers.append((b"authorization", f"Bearer {key}".encode()))
        if accept:
            headers.append((b"accept", accept.encode("latin-1", "replace")))
        timeout = route.attempt_timeout_s  # to connect, and between two reads: a stream may run longer
        try:
            return await self._pool.request(b"POST", url, headers, content, timeout=timeout)
        except TimeoutError as e:
            raise UpstreamError("timeout", f"upstream did not answer within {timeout:g}s") from e
        except (transport.TransportError, OSError) as e:
            raise UpstreamError("connect", f"upstream unreachable: {type(e).__name__}") from e


def _make_endpoint(endpoint: str):
    async def forward(request: Request, services: ServicesDep, key: LimitedKeyDep) -> Response:
        return await _forward(request, services, key, endpoint)

    forward.__name__ = f"forward_{endpoint}"
    forward.__doc__ = (f"Forwarded to the upstream of the route named by `model` ({endpoint}), not gated; "
                       "JSON or SSE as the upstream answers.")
    return forward


for _endpoint in ENDPOINTS:
    router.post(f"/v1/{_endpoint}", openapi_extra=_BODY, responses=_ERRORS)(_make_endpoint(_endpoint))


async def _forward(request: Request, services: Any, key: ClientKey, endpoint: str) -> Response:
    raw = await request.body()
    payload = _parse(raw)
    asked = payload["model"]
    route = route_for_key(services.settings, key, asked)
    client_key = key.upstream_key
    note_route(request, route.alias)
    # orjson (the standard library only for what it refuses): 1.9 million empty lists re-encoded in 6 ms,
    # not 76 (an ad hoc timing).
    content = raw if route.model == asked else wirejson.dumps({**payload, "model": route.model})
    tracing = services.gate.tracing
    if tracing is None:
        resp = await services.forwarder.send(route, endpoint, content, client_key, request.headers.get("accept"))
    else:  # a span for the call (to the reply's headers: a stream goes on after it)
        with tracing.span(f"{endpoint} {route.model}", {**spans.upstream_call(route, 1),
                                                        "gen_ai.operation.name": endpoint}, client=True):
            resp = await services.forwarder.send(route, endpoint, content, client_key,
                                                 request.headers.get("accept"))
    limit = services.forwarder.max_reply_bytes
    try:
        if resp.status >= 400:
            await resp.aread(limit)
            raise _error(services.gate.upstream, route, resp)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in resp.headers if k.lower() in _RELAYED_HEADERS}
        # Only an issued key's spend is read (service.gate.record.ConversationHint.charged).
        meter = forwarded_usage.Meter(services.spend, key.key_id if key.policy is not None else None)
        if headers.get("content-type", "").startswith("text/event-stream"):
            closing, resp = resp, None  # the stream closes it
            return StreamingResponse(_relay(closing, meter.tap(), limit, route.alias), status_code=closing.status,
                                     headers=headers, background=BackgroundTask(meter.charge))
        content = await resp.aread(limit)
        return Response(content, status_code=resp.status, headers=headers,
                        background=BackgroundTask(meter.charge_body, content))  # after the reply is sent
    except transport.TransportError as e:
        raise UpstreamError("timeout" if isinstance(e, TimeoutError) else "connect",
                            f"upstream reply broke off: {type(e).__name__}") from e
    except transport.ReplyTooLarge as e:
        metrics.UPSTREAM_ERRORS.labels(route.alias, "garbage").inc()
        raise UpstreamError("garbage", str(e)) from e
    finally:
        if resp is not None:
            await resp.aclose()


async def _relay(resp: transport.Response, tap: forwarded_usage.Tap, limit: int | None,
                 route: str) -> AsyncIterator[bytes]:
    """The upstream's SSE bytes as they arrive; the upstream connection closes with the client's. A
    stream past `limit` bytes ends with an error event in OpenAI's envelope (the openai client raises it)."""
    try:
        async for chunk in resp.aiter_stream(limit):
            tap.feed(chunk)
            yield chunk
    except transport.ReplyTooLarge as e:
        metrics.UPSTREAM_ERRORS.labels(route, "garbage").inc()
        yield b"\n\n" + error_event(UpstreamError("garbage", str(e)))  # after a blank line: the event it cut
    finally:
        await resp.aclose()


def _parse(raw: bytes) -> dict[str, Any]:
    try:
        payload = wirejson.loads(raw)
    except wirejson.WireJSONError as e:
        raise APIError(400, parse_error_message(e), code="invalid_json") from None
    if not isinstance(payload, dict):
        raise APIError(400, "The request body must be a JSON object.", code="invalid_value")
    if not isinstance(payload.get("model"), str) or not payload["model"]:
        raise APIError(400, "model: a model name (a non-empty string) is required; it picks the route.",
                       code="invalid_value", param="model")
    return payload


def _error(upstream: Any, route: RouteSettings, resp: transport.Response) -> APIError:
    """The upstream's refusal as the chat route reports it (service.api.errors.from_upstream), through
    the actor client's own reading of it (its status mapping, and its log line for a refused route key)."""
    if resp.status in (401, 403) and route.upstream_api_key is not None:
        error = upstream._auth_error(route, resp)
    else:
        error = _status_error(resp)
    metrics.UPSTREAM_ERRORS.labels(route.alias, error.kind).inc()
    return from_upstream(error)
