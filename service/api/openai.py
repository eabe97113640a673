"""POST /v1/chat/completions, GET /v1/models and GET /v1/models/{id}."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Path, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import ValidationError
from starlette.background import BackgroundTask

from service import wirejson
from service.api import replies
from service.api.access import models_for_key, route_for_key
from service.api.deps import ClientKeyDep, ServicesDep, limited_key
from service.api.directroute import DirectRoute
from service.api.errors import APIError, from_validation
from service.api.jsonroute import parse_error_message
from service.api.protocol import ChatCompletionRequest, ErrorBody, may_refer
from service.api.requests import note_route, note_turn
from service.gate.pipeline import Relay, TurnRequest, TurnResult
from service.gate.record import ConversationHint, new_turn_id
from service.settings import RouteSettings

router = APIRouter()

CONVERSATION_HEADER = "x-turngate-conversation-id"
T = TypeVar("T")


class ClientGone(Exception):
    pass


# The body is declared for the OpenAPI document (service.api.openapi adds the models) but read raw:
# validation by the model must not rewrite what is forwarded, and any content type is read as JSON.
_REQUEST_BODY = {"requestBody": {"required": True, "content": {"application/json": {
    "schema": {"$ref": "#/components/schemas/ChatCompletionRequest"}}}}}
_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": what} for status, what in (
        (400, "The request is malformed"), (401, "Missing or wrong API key"), (404, "Unknown model"),
        (413, "The body is over the size limit"), (422, "Every candidate was rejected (on_exhausted=error)"),
        (429, "Rate limited"), (502, "The upstream failed"), (504, "The upstream timed out"))}
# Bodies past this size are parsed and validated on a worker thread, off the event loop.
_PARSE_OFF_LOOP_BYTES = 256 * 1024
_PARSE_OFF_LOOP_BYTES_WITH_REFS = 8 * 1024


def _model(name: str, created: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "turngate"}


@router.get("/v1/models")
async def list_models(services: ServicesDep, key: ClientKeyDep) -> dict:
    """The route aliases (those the key may use); a catch-all route ('*') serves any other name but lists none."""
    created = int(time.time())
    return {"object": "list", "data": [_model(alias, created) for alias in models_for_key(services.settings, key)]}


@router.get("/v1/models/{model_id:path}", responses={404: _ERRORS[404]})
async def retrieve_model(model_id: Annotated[str, Path(max_length=256)], services: ServicesDep,
                         key: ClientKeyDep) -> dict:
    """One model by name: any alias, or any name when a catch-all route is configured (that the key may use)."""
    route_for_key(services.settings, key, model_id)
    return _model(model_id, int(time.time()))


async def chat_completions(request: Request) -> Response:
    """An OpenAI Chat Completions request, gated; unknown fields pass through to the upstream unchanged."""
    services, key = await limited_key(request)  # the hot path: no dependency solving (DirectRoute)
    raw = await request.body()
    refs = may_refer(raw)
    # Walking a schema's refs costs about 0.7 ms per KB of schema: more than a few KB of it goes off the loop.
    off_loop = len(raw) > (_PARSE_OFF_LOOP_BYTES_WITH_REFS if refs else _PARSE_OFF_LOOP_BYTES)
    payload = await asyncio.to_thread(_parse, raw, refs) if off_loop else _parse(raw, refs)
    route = route_for_key(services.settings, key, payload["model"])
    note_route(request, route.alias)
    _check_n(payload, route)
    turn = TurnRequest(
        turn_id=new_turn_id(), route=route, body=payload, client_key=key.upstream_key,
        conversation=ConversationHint(header_id=request.headers.get(CONVERSATION_HEADER),
                                      user=payload.get("user"), metadata=payload.get("metadata"),
                                      key_id=key.key_id, charged=key.policy is not None))
    note_turn(request, turn.turn_id, turn.recorded)
    logprobs = bool(payload.get("logprobs"))
    keepalive_s = services.settings.keepalive_interval_s
    if payload.get("stream") and route.mode == "passthrough":
        include_usage = bool((payload.get("stream_options") or {}).get("include_usage"))
        return await _stream(request, asyncio.ensure_future(services.gate.relay(turn)), turn, keepalive_s,
                             lambda relay: (replies.relay_headers(relay.record, relay.headers),
                                            replies.relayed(relay.events(), include_usage, logprobs)))
    if not payload.get("stream"):
        try:
            result = await _watched(request, services.gate.run(turn))
        except ClientGone:
            return Response(status_code=499)
        return Response(wirejson.dumps(_with_choices(result, route, logprobs)), media_type="application/json",
                        headers=replies.decision_headers(result))
    include_usage = bool((payload.get("stream_options") or {}).get("include_usage"))
    return await _stream(request, asyncio.ensure_future(services.gate.run(turn)), turn, keepalive_s,
                         lambda result: (replies.decision_headers(result), _iter(replies.replay_chunks(
                             replies.completion_body(result, route.alias, logprobs, route.usage_reported),
                             include_usage))))


router.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"], openapi_extra=_REQUEST_BODY,
                     responses=_ERRORS, route_class_override=DirectRoute)


def _check_n(payload: dict[str, Any], route: RouteSettings) -> None:
    """`n` choices: passthrough forwards any n (and streams them as the upstream sends them); a gated
    route returns its best n candidates, so n cannot exceed the candidates it samples. A gated
    stream replays one reply: n > 1 there is refused."""
    n = payload.get("n") or 1
    if n == 1:
        return
    if route.mode != "passthrough" and n > route.candidates:
        raise APIError(400, f"n={n} is more than the {route.candidates} candidates this model's route samples; "
                            f"ask for at most {route.candidates}.", code="invalid_value", param="n")
    if payload.get("stream") and route.mode != "passthrough":
        raise APIError(400, "n > 1 cannot be streamed through this gateway; ask without stream for several "
                            "choices.", code="invalid_value", param="n")


def _with_choices(result: TurnResult, route: RouteSettings, logprobs: bool) -> dict[str, Any]:
    """The reply body with every choice of the turn (`n`), each built as the chosen one is."""
    body = replies.completion_body(result, route.alias, logprobs, route.usage_reported)
    if len(result.choices) > 1:
        body["choices"] = [{**replies.completion_body(TurnResult(result.record, c), route.alias,
                                                      logprobs)["choices"][0],
                            "index": i}
                           for i, c in enumerate(result.choices)]
    return body


def _parse(raw: bytes, refs: bool = True) -> dict:
    try:
        payload = wirejson.loads(raw)
    except wirejson.WireJSONError as e:
        raise APIError(400, parse_error_message(e)) from None
    if not isinstance(payload, dict):
        raise APIError(400, "The request body must be a JSON object.")
    try:
        ChatCompletionRequest.model_validate(payload, context={"may_refer": refs})
    except ValidationError as e:
        raise from_validation(e) from e
    return payload  # forwarded as sent, unknown fields included


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone (the body is read: nothing else comes but the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _watched(request: Request, turn: Awaitable[T]) -> T:
    """Awaits the turn in this task; cancels it (and so its upstream calls) if the client disconnects
    first. One watcher task a request, not a task for the turn as well and an asyncio.wait."""
    me = asyncio.current_task()
    assert me is not None
    gone = False

    async def cancel_when_gone() -> None:
        nonlocal gone
        await _disconnected(request)
        gone = True
        me.cancel()

    watcher = asyncio.get_running_loop().create_task(cancel_when_gone())
    try:
        return await turn
    except asyncio.CancelledError:
        if not gone:
            raise
        me.uncancel()  # the cancel was this function's own, and ends here
        raise ClientGone() from None
    finally:
        watcher.cancel()


async def _until_done(request: Request, task: asyncio.Task, timeout: float | None = None) -> bool:
    """Waits for the turn; cancels it (and so its upstream calls) if the client disconnects.

    Returns False when `timeout` passed first, with the turn still running.
    """
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        if not watcher.done():
            watcher.cancel()
    if task.done():
        return True
    if watcher.done():
        task.cancel()
        raise ClientGone()
    return False


async def _stream(request: Request, task: asyncio.Task, turn: TurnRequest, keepalive_s: float,
                  respond: Callable[[Any], tuple[dict[str, str], AsyncGenerator[bytes, None]]]) -> Response:
    """SSE. `task` yields what `respond` turns into headers and chunks: a gated turn's result, whose
    chosen reply is replayed (ranking needs whole candidates), or a passthrough Relay, whose
    upstream stream is relayed as it comes.

    If the task settles within the first keepalive interval the client gets real status codes
    and all headers; after that the stream is open, kept alive with SSE comments, the headers come
    as an SSE comment, and a late failure arrives as an error event. So does any failure once the
    stream began: a connection cut mid-stream reads as a network error, which clients retry blindly.
    """
    try:
        settled = await _until_done(request, task, timeout=keepalive_s)
    except ClientGone:
        return Response(status_code=499)
    if settled:
        headers, chunks = respond(task.result())  # raises: the handlers turn it into an error response
        return StreamingResponse(_ending_in_errors(chunks), media_type="text/event-stream", headers=headers,
                                 background=BackgroundTask(_close_unread, task))

    async def events() -> AsyncGenerator[bytes, None]:
        try:
            while not task.done():
                await asyncio.wait({task}, timeout=keepalive_s)
                if not task.done():
                    yield b": keepalive\n\n"
            headers, chunks = respond(task.result())
            yield replies.as_comment(headers)
            async with aclosing(chunks):
                async for chunk in chunks:
                    yield chunk
        finally:
            if not task.done():
                task.cancel()  # the client went away mid-wait

    return StreamingResponse(_ending_in_errors(events()), media_type="text/event-stream",
                             headers={"x-turngate-turn-id": turn.turn_id},
                             background=BackgroundTask(_close_unread, task))


async def _ending_in_errors(chunks: AsyncGenerator[bytes, None]) -> AsyncIterator[bytes]:
    """The chunks; a failure among them ends the stream with an error event (replies.error_event)."""
    try:
        async with aclosing(chunks):
            async for chunk in chunks:
                yield chunk
    except Exception as e:
        yield replies.error_event(e)


async def _close_unread(task: asyncio.Task) -> None:
    """A Relay whose stream was never read (the client left first) still closes, and is recorded."""
    if task.done() and not task.cancelled() and task.exception() is None and isinstance(task.result(), Relay):
        await task.result().aclose()


async def _iter(chunks) -> AsyncGenerator[bytes, None]:
    for chunk in chunks:
        yield chunk
