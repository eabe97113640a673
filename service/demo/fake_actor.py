"""A local OpenAI-compatible actor whose replies the caller controls.

The demo serves recorded candidates with it; tests script its replies per request; benchmarks give
it a fixed latency. It speaks just enough of the Chat Completions API for turngate and the
`openai` client: POST /v1/chat/completions (with `n`, `stream`, `stream_options`, `logprobs` and
`top_logprobs`) and GET /v1/models; and, for the endpoints turngate forwards without gating,
POST /v1/embeddings, /v1/completions and /v1/responses (JSON, or SSE events `stream_gap_s` apart
when the request streams). Like OpenAI's, its chat replies carry usage with its details, a
request id and rate-limit headers, and `service_tier` / `system_fingerprint` where the script sets them.

Streams send one chunk per token (words, for the fake), `chunk_delay_s` apart; a request without
`stream` waits as long as the stream would have taken, so both are the same upstream to compare.
"""

from __future__ import annotations

import asyncio
import base64
import inspect
import itertools
import json
import re
import socket
import struct
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from service.api import onewrite


@dataclass
class Reply:
    """What the fake actor answers one request with."""

    # assistant messages, or {"message", "finish_reason", "logprobs"?}; logprobs are made up from the
    # content when the request asks for them and the choice brings none
    choices: list[dict[str, Any]] = field(default_factory=list)
    status: int = 200
    raw: str | None = None  # send this body verbatim instead (garbage tests)
    # or stream these bytes verbatim, one write each, as text/event-stream (hostile stream tests)
    raw_pieces: Iterable[bytes] | None = None
    delay_s: float = 0.0  # before the status line
    headers: dict[str, str] = field(default_factory=dict)  # x-request-id defaults to one per request
    usage: dict[str, Any] | None = None
    service_tier: str | None = None
    system_fingerprint: str | None = None
    # streams
    chunk_delay_s: float = 0.0  # before each chunk after the first
    break_after_chunks: int | None = None  # drop the connection after this many chunks
    stream_error: dict[str, Any] | None = None  # or send this in-band {"error": ...} event there instead


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


def completion_body(choices: list[dict[str, Any]], model: str, usage: dict[str, Any] | None = None,
                    request: dict[str, Any] | None = None, **top: Any) -> dict[str, Any]:
    """A ChatCompletion; `request` asks for logprobs, `top` adds fields (service_tier=..., None ones left out)."""
    out = []
    for i, c in enumerate(choices):
        message, finish = _unpack(c)
        out.append({"index": i, "message": message, "logprobs": _logprobs(c, request or {}),
                    "finish_reason": finish})
    return {"id": f"chatcmpl-fake{time.time_ns()}", "object": "chat.completion", "created": int(time.time()),
            "model": model, "choices": out, **{k: v for k, v in top.items() if v is not None},
            "usage": usage or {"prompt_tokens": 10, "completion_tokens": 5 * len(out),
                               "total_tokens": 10 + 5 * len(out)}}


def _unpack(choice: dict[str, Any]) -> tuple[dict[str, Any], str]:
    message, finish = (choice["message"], choice.get("finish_reason")) if "message" in choice else (choice, None)
    return message, finish or ("tool_calls" if message.get("tool_calls") else "stop")


def tokens(text: str) -> list[str]:
    """The fake's tokenizer: words with their leading white space."""
    return re.findall(r"\s*\S+|\s+", text)


def _logprobs(choice: dict[str, Any], request: dict[str, Any]) -> dict[str, Any] | None:
    if "logprobs" in choice:
        return choice["logprobs"]
    if not request.get("logprobs"):
        return None
    content = _unpack(choice)[0].get("content")
    top = min(max(int(request.get("top_logprobs") or 0), 0), 20)  # OpenAI's range: 0..20
    return {"content": [token_logprob(t, i, top) for i, t in enumerate(tokens(content or ""))], "refusal": None}


def token_logprob(token: str, i: int, top: int = 0) -> dict[str, Any]:
    """A made-up but deterministic logprob entry in OpenAI's shape."""
    logprob = -round(0.01 * (1 + (i * 7 + len(token)) % 23), 4)
    alternatives = [{"token": token, "logprob": logprob, "bytes": list(token.encode())}]
    alternatives += [{"token": f"{token}~{k}", "logprob": logprob - k, "bytes": list(f"{token}~{k}".encode())}
                     for k in range(1, top)]
    return {"token": token, "logprob": logprob, "bytes": list(token.encode()), "top_logprobs": alternatives[:top]}


def stream_chunks(choices: list[dict[str, Any]], model: str, request: dict[str, Any],
                  usage: dict[str, Any] | None = None, **top: Any) -> list[dict[str, Any]]:
    """The chunks OpenAI would stream for these choices: a role chunk, a chunk per content token
    (with its logprob when asked), tool-call deltas, the finish reason, then usage when asked."""
    body = completion_body(choices, model, usage, request, **top)
    base = {k: v for k, v in body.items() if k not in ("choices", "usage")} | {"object": "chat.completion.chunk"}
    with_usage = bool((request.get("stream_options") or {}).get("include_usage"))
    if with_usage:
        base["usage"] = None
    out = []
    for choice in body["choices"]:
        index, message, logprobs = choice["index"], choice["message"], choice["logprobs"]

        def chunk(delta: dict[str, Any], finish: str | None = None, lp: Any = None, index: int = index
                  ) -> dict[str, Any]:
            return {**base, "choices": [{"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish}]}

        out.append(chunk({"role": "assistant", "content": "", "refusal": None}))
        entries = (logprobs or {}).get("content") or []
        pieces = [e["token"] for e in entries] if entries else tokens(message.get("content") or "")
        for k, piece in enumerate(pieces):
            lp = {"content": [entries[k]], "refusal": None} if entries else None
            out.append(chunk({"content": piece}, lp=lp))
        for i, call in enumerate(message.get("tool_calls") or []):
            # function calls stream their arguments; custom-tool calls their input, in the same way
            kind, text = ("custom", "input") if call.get("type") == "custom" else ("function", "arguments")
            spec = call[kind]
            out.append(chunk({"tool_calls": [{"index": i, "id": call["id"], "type": kind,
                                              kind: {"name": spec["name"], text: ""}}]}))
            out += [chunk({"tool_calls": [{"index": i, kind: {text: spec[text][j:j + 8]}}]})
                    for j in range(0, len(spec[text]), 8)]
        out.append(chunk({}, choice["finish_reason"]))
    if with_usage:
        out.append({**base, "choices": [], "usage": body["usage"]})
    return out


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
        self.forwarded_reply: Reply | None = None  # its raw or raw_pieces instead of the usual reply
        self.raw_bytes_sent = 0  # of raw_pieces, all requests together
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
        headers = {"x-request-id": f"req_fake{attempt}", **reply.headers}
        if reply.raw is not None or reply.raw_pieces is not None:
            return self._raw(reply, headers)
        if reply.status >= 400:
            return JSONResponse({"error": {"message": f"fake actor error {reply.status}", "type": "server_error",
                                           "param": None, "code": None}},
                                status_code=reply.status, headers=headers)
        top = {"service_tier": reply.service_tier, "system_fingerprint": reply.system_fingerprint}
        model = body.get("model", "fake")
        if body.get("stream"):
            chunks = stream_chunks(reply.choices, model, body, reply.usage, **top)
            return StreamingResponse(self._stream(chunks, reply), headers=headers, media_type="text/event-stream")
        # As long as the stream would have taken: the same upstream, streamed or not.
        if reply.chunk_delay_s and await _hung_up_during(
                request, reply.chunk_delay_s * (len(stream_chunks(reply.choices, model, body)) - 1)):
            self.disconnected += 1
            return Response(status_code=499)
        return JSONResponse(completion_body(reply.choices, model, reply.usage, body, **top), headers=headers)

    def _raw(self, reply: Reply, headers: dict[str, str] | None = None) -> Response:
        if reply.raw_pieces is not None:
            return StreamingResponse(self._pieces(reply.raw_pieces), status_code=reply.status, headers=headers,
                                     media_type="text/event-stream")
        return Response(reply.raw, status_code=reply.status, headers=headers, media_type="application/json")

    async def _pieces(self, pieces: Iterable[bytes]) -> AsyncIterator[bytes]:
        for piece in pieces:
            self.raw_bytes_sent += len(piece)
            yield piece
            await asyncio.sleep(0)  # one piece a write, however fast the generator

    async def _stream(self, chunks: list[dict[str, Any]], reply: Reply):
        self.in_flight += 1
        try:
            for k, chunk in enumerate(chunks):
                if k == reply.break_after_chunks:
                    if reply.stream_error is None:
                        raise ConnectionAbortedError("the fake actor drops the stream (break_after_chunks)")
                    yield f"data: {json.dumps({'error': reply.stream_error})}\n\n".encode()
                    return
                if k and reply.chunk_delay_s:
                    await asyncio.sleep(reply.chunk_delay_s)
                yield f"data: {json.dumps(chunk)}\n\n".encode()
            yield b"data: [DONE]\n\n"
        except asyncio.CancelledError:
            self.disconnected += 1  # the caller hung up mid-stream
            raise
        finally:
            self.in_flight -= 1


    async def _forwarded(self, request: Request) -> Response:
        body = await request.json()
        endpoint = request.url.path.rsplit("/", 1)[1]
        self.forwarded.append((endpoint, body, dict(request.headers)))
        if self.forwarded_reply is not None:
            return self._raw(self.forwarded_reply)
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
    config = {"http": onewrite.NAME, **config}  # as `turngate serve` runs
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


def streaming_responder(first_s: float, words: int, chunk_delay_s: float) -> Responder:
    """`words` words, the first after `first_s`, then one every `chunk_delay_s` (bench/ttft.py)."""
    text = " ".join(f"word{k}" for k in range(words))

    def respond(body: dict[str, Any], attempt: int) -> Reply:
        return Reply([assistant(text)] * int(body.get("n") or 1), delay_s=first_s, chunk_delay_s=chunk_delay_s)
    return respond


def main() -> None:  # pragma: no cover - used by bench/ as a separate process
    import argparse

    parser = argparse.ArgumentParser(description="fake OpenAI-compatible actor with a fixed latency")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--latency", type=float, default=0.05, help="before the reply (its first token)")
    parser.add_argument("--words", type=int, help="reply with this many words, one per stream chunk")
    parser.add_argument("--chunk-delay", type=float, default=0.05, help="between chunks (with --words)")
    args = parser.parse_args()
    actor = FakeActor(streaming_responder(args.latency, args.words, args.chunk_delay) if args.words
                      else fixed_latency_responder(args.latency))
    uvicorn.run(actor.app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
