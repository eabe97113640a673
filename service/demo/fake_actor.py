"""A local OpenAI-compatible actor whose replies the caller controls.

The demo serves recorded candidates with it; tests script its replies per request; benchmarks give
it a fixed latency. It speaks just enough of the Chat Completions API for turngate and the
`openai` client: POST /v1/chat/completions (with `n`) and GET /v1/models; and, for the endpoints
turngate forwards without gating, POST /v1/embeddings, /v1/completions and /v1/responses (JSON, or
SSE events `stream_gap_s` apart when the request streams).
"""

from __future__ import annotations

import asyncio
import base64
import inspect
import itertools
import json
import socket
import struct
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route


@dataclass
class Reply:
    """What the fake actor answers one request with."""

    choices: list[dict[str, Any]] = field(default_factory=list)  # assistant messages, or {"message", "finish_reason"}
    status: int = 200
    raw: str | None = None  # send this body verbatim instead (garbage tests)
    delay_s: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)
    usage: dict[str, int] | None = None


Responder = Callable[[dict[str, Any], int], "Reply | Awaitable[Reply]"]


def assistant(content: str | None = None, tool_calls: list[tuple[str, Any]] | None = None) -> dict[str, Any]:
    """An assistant message; tool_calls as (name, arguments) with arguments a dict or raw string."""
    msg: dict[str, Any] = {"role": "assistant", "content": content}
    if tool_calls:
        msg["tool_calls"] = [
            {"id": f"call_{i}", "type": "function",
             "function": {"name": name, "arguments": args if isinstance(args, str) else json.dumps(args)}}
            for i, (name, args) in enumerate(tool_calls)]
    return msg


def completion_body(choices: list[dict[str, Any]], model: str, usage: dict[str, int] | None = None
                    ) -> dict[str, Any]:
    out = []
    for i, c in enumerate(choices):
        message, finish = (c["message"], c.get("finish_reason")) if "message" in c else (c, None)
        out.append({"index": i, "message": message, "logprobs": None,
                    "finish_reason": finish or ("tool_calls" if message.get("tool_calls") else "stop")})
    return {"id": f"chatcmpl-fake{time.time_ns()}", "object": "chat.completion", "created": int(time.time()),
            "model": model, "choices": out,
            "usage": usage or {"prompt_tokens": 10, "completion_tokens": 5 * len(out),
                               "total_tokens": 10 + 5 * len(out)}}


class FakeActor:
    def __init__(self, responder: Responder) -> None:
        self.responder = responder
        self.requests: list[dict[str, Any]] = []
        self.in_flight = 0
        self.disconnected = 0  # requests whose caller hung up before the reply
        self._counter = itertools.count()
        # The forwarded endpoints: (path, body, headers) of each request, the status to answer with
        # (an error envelope when >= 400) and the gap between streamed events.
        self.forwarded: list[tuple[str, dict[str, Any], dict[str, str]]] = []
        self.forwarded_status = 200
        self.stream_gap_s = 0.0
        self.app = Starlette(routes=[
            Route("/v1/chat/completions", self._chat, methods=["POST"]),
            Route("/v1/models", self._models, methods=["GET"]),
            *[Route(f"/v1/{name}", self._forwarded, methods=["POST"])
              for name in ("embeddings", "completions", "responses")],
        ])

    async def _models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": "fake-actor", "object": "model"}]})

    async def _chat(self, request: Request) -> Response:
        body = await request.json()
        self.requests.append(body)
        attempt = next(self._counter)
        self.in_flight += 1
        try:
            reply = self.responder(body, attempt)
            if inspect.isawaitable(reply):
                reply = await reply
            if reply.delay_s and await _hung_up_during(request, reply.delay_s):
                self.disconnected += 1
                return Response(status_code=499)
        finally:
            self.in_flight -= 1
        if reply.raw is not None:
            return Response(reply.raw, status_code=reply.status, headers=reply.headers,
                            media_type="application/json")
        if reply.status >= 400:
            return JSONResponse({"error": {"message": f"fake actor error {reply.status}", "type": "server_error",
                                           "param": None, "code": None}},
                                status_code=reply.status, headers=reply.headers)
        return JSONResponse(completion_body(reply.choices, body.get("model", "fake"), reply.usage),
                            headers=reply.headers)


    async def _forwarded(self, request: Request) -> Response:
        body = await request.json()
        endpoint = request.url.path.rsplit("/", 1)[1]
        self.forwarded.append((endpoint, body, dict(request.headers)))
        if self.forwarded_status >= 400:
            return JSONResponse({"error": {"message": f"fake actor error {self.forwarded_status}",
                                           "type": "invalid_request_error", "param": None, "code": "fake_error"}},
                                status_code=self.forwarded_status, headers={"retry-after": "3"})
        model = body.get("model", "fake")
        if endpoint == "embeddings":
            return JSONResponse(_embeddings(body, model))
        if not body.get("stream"):
            text = "fake text"
            return JSONResponse(_completion(model, text) if endpoint == "completions" else _response(model, text))
        events = _completion_events(model) if endpoint == "completions" else _response_events(model)
        return StreamingResponse(self._spaced(events), media_type="text/event-stream")

    async def _spaced(self, events: list[str]):
        for i, event in enumerate(events):
            if i and self.stream_gap_s:
                await asyncio.sleep(self.stream_gap_s)
            yield event.encode()


STREAM_WORDS = ["one ", "two ", "three"]  # the text of a streamed completion or response, in events


def _embeddings(body: dict[str, Any], model: str) -> dict[str, Any]:
    inputs = body.get("input")
    inputs = inputs if isinstance(inputs, list) else [inputs]
    data = []
    for i, text in enumerate(inputs):
        vector = [float(len(str(text))), float(i), 0.5]
        if body.get("encoding_format") == "base64":
            value: Any = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
        else:
            value = vector
        data.append({"object": "embedding", "index": i, "embedding": value})
    return {"object": "list", "data": data, "model": model, "usage": {"prompt_tokens": 3, "total_tokens": 3}}


def _completion(model: str, text: str, finish: str | None = "stop") -> dict[str, Any]:
    return {"id": "cmpl-fake", "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}]}


def _completion_events(model: str) -> list[str]:
    chunks = [_completion(model, word, None) for word in STREAM_WORDS] + [_completion(model, "", "stop")]
    return [f"data: {json.dumps(c)}\n\n" for c in chunks] + ["data: [DONE]\n\n"]


def _response(model: str, text: str, status: str = "completed") -> dict[str, Any]:
    return {"id": "resp_fake", "object": "response", "created_at": int(time.time()), "model": model,
            "status": status, "output": [{"type": "message", "id": "msg_fake", "role": "assistant",
                                          "status": status, "content": [{"type": "output_text", "text": text,
                                                                         "annotations": []}]}],
            "parallel_tool_calls": True, "tool_choice": "auto", "tools": []}


def _response_events(model: str) -> list[str]:
    def event(kind: str, **data: Any) -> str:
        return f"event: {kind}\ndata: {json.dumps({'type': kind, **data})}\n\n"

    events = [event("response.created", response=_response(model, "", "in_progress"), sequence_number=0)]
    for i, word in enumerate(STREAM_WORDS, 1):
        events.append(event("response.output_text.delta", item_id="msg_fake", output_index=0, content_index=0,
                            delta=word, sequence_number=i))
    events.append(event("response.completed", response=_response(model, "".join(STREAM_WORDS)),
                        sequence_number=len(STREAM_WORDS) + 1))
    return events


async def _hung_up_during(request: Request, delay_s: float) -> bool:
    """Sleeps delay_s, returning True early if the caller disconnects meanwhile."""
    try:
        async with asyncio.timeout(delay_s):
            while (await request.receive())["type"] != "http.disconnect":
                pass
            return True
    except TimeoutError:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve_in_thread(app, port: int | None = None, **config: Any) -> Iterator[str]:
    """Runs an ASGI app under uvicorn on loopback in a thread; yields its base URL."""
    port = port or free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           lifespan="on", **config))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=20)


def fixed_latency_responder(latency_s: float, content: str = "ok") -> Responder:
    """Every request answered after `latency_s` with `n` identical text choices (benchmarks)."""
    def respond(body: dict[str, Any], attempt: int) -> Reply:
        return Reply([assistant(content)] * int(body.get("n") or 1), delay_s=latency_s)
    return respond


def main() -> None:  # pragma: no cover - used by bench/ as a separate process
    import argparse

    parser = argparse.ArgumentParser(description="fake OpenAI-compatible actor with a fixed latency")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--latency", type=float, default=0.05)
    args = parser.parse_args()
    actor = FakeActor(fixed_latency_responder(args.latency))
    uvicorn.run(actor.app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
