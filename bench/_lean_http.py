"""Lean measuring apparatus for bench/overhead.py and bench/gateways.py: a keep-alive HTTP/1.1 client
and a fixed-latency OpenAI-compatible upstream, both on raw asyncio streams.

The upstream measures its own service time per request, from the request fully read to the reply
written (its last chunk, for a stream): it sends it in `x-bench-service-ms` and keeps it under the
request's bench id (`bench-id N` anywhere in the body, which every proxy forwards in the messages),
the longest of the calls that carried it (a rank turn's N calls), for `GET /bench/service-ms`
(returned and cleared): proxies need not forward the header.

A request that carries `bench-varied` (bench/overhead.py's agent turns) is answered in turn from
VARIED_REPLIES, tool calls with different arguments when it declares tools and texts of 2 to 60
words otherwise: 7 replies of each, so a rank turn's N calls mostly get distinct candidates, as from
an actor sampling at a temperature, and the critic scores every one of them.

The load generator, the fake upstream and the proxy share the machine's two cores, so whatever
CPU the apparatus burns shows up as queueing delay in the proxy's figures. httpx and a
Starlette/uvicorn actor cost ~1 ms of CPU per request each; these cost a tenth of that.

    python bench/_lean_http.py --port PORT --latency 0.05 [--jitter 0.2]    # the upstream
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import time

import uvloop

COMPLETION = json.dumps({
    "id": "chatcmpl-bench", "object": "chat.completion", "created": 0, "model": "fake",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop",
                 "logprobs": None}],
    "usage": {"prompt_tokens": 12, "completion_tokens": 1, "total_tokens": 13},
}).encode()
MODELS = b'{"object":"list","data":[{"id":"fake","object":"model","created":0,"owned_by":"bench"}]}'
BENCH_ID = re.compile(rb"bench-id (\d+)")
STREAM = re.compile(rb'"stream"\s*:\s*true')
STREAM_WORDS = 8  # content chunks of a streamed reply, spread over its latency


VARIED_MARK = b"bench-varied"
TOOLS = re.compile(rb'"tools"\s*:\s*\[')


def completion(message: dict, finish_reason: str, completion_tokens: int) -> bytes:
    return json.dumps({
        "id": "chatcmpl-bench", "object": "chat.completion", "created": 0, "model": "fake",
        "choices": [{"index": 0, "message": message, "finish_reason": finish_reason, "logprobs": None}],
        "usage": {"prompt_tokens": 300, "completion_tokens": completion_tokens,
                  "total_tokens": 300 + completion_tokens},
    }).encode()


def _tool_call(arguments: dict) -> bytes:
    call = {"id": "call_bench", "type": "function",
            "function": {"name": "book_flight", "arguments": json.dumps(arguments)}}
    return completion({"role": "assistant", "content": None, "tool_calls": [call]}, "tool_calls", 20)


def _text(words: str) -> bytes:
    return completion({"role": "assistant", "content": words}, "stop", len(words.split()) * 4 // 3)


# An agent's plausible replies to the agent turn (bench/_load.AGENT_CONTEXT): seven of each kind, a
# prime number, so that the calls of a turn, served one after another, rarely repeat one.
VARIED_REPLIES = {
    True: [_tool_call({"to": "LIS"}), _text("Before I book it, please confirm: the 9:40 economy flight from "
                                            "Boston to Lisbon on May 14, $412, on the Visa ending in 4421?"),
           _tool_call({"to": "Lisbon"}), _tool_call({"to": "LIS", "date": "2026-05-14", "cabin": "economy"}),
           _text("Booked."), _tool_call({"to": "Lisbon, Portugal"}),
           _text("I found three flights to Lisbon on May 14: TAP at 9:40 for $412 with no stops, United at "
                 "18:05 for $455 with one stop in Newark, and Delta at 21:30 for $498. The TAP flight is the "
                 "cheapest and the shortest. Shall I book it with the Visa card on your profile?")],
    False: [_text("Sure."), _text("The cheapest flight to Lisbon on May 14 is TAP's 9:40 departure at $412."),
            _text("I can book that for you. Which card should I use, the Visa ending in 4421 or the Amex?"),
            _text("I found three flights to Lisbon on May 14: TAP at 9:40 for $412 with no stops, United at "
                  "18:05 for $455 with one stop in Newark, and Delta at 21:30 for $498. The TAP flight is "
                  "the cheapest and the shortest. Shall I book it with the Visa card on your profile?"),
            _text("Done: you are booked to Lisbon."),
            _text("Flights to Lisbon start at $412 on May 14. Do you want a refundable fare? It is $96 more."),
            _text("Let me check the fares for May 14 first.")],
}


def sse_chunks() -> list[bytes]:
    """A streamed reply's events: role, STREAM_WORDS words, finish, usage, [DONE]."""
    def chunk(choices: list, usage: dict | None = None) -> bytes:
        body = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 0, "model": "fake",
                "choices": choices, **({"usage": usage} if usage else {})}
        return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"
    out = [chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])]
    out += [chunk([{"index": 0, "delta": {"content": f"w{i} "}, "finish_reason": None}]) for i in range(STREAM_WORDS)]
    out.append(chunk([{"index": 0, "delta": {}, "finish_reason": "stop"}]))
    out.append(chunk([], {"prompt_tokens": 12, "completion_tokens": STREAM_WORDS, "total_tokens": 12 + STREAM_WORDS}))
    return out + [b"data: [DONE]\n\n"]


SSE = sse_chunks()


def response(status: int, body: bytes, extra: bytes = b"") -> bytes:
    return (f"HTTP/1.1 {status} OK\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            .encode() + extra + b"\r\n" + body)


class LeanClient:
    """One keep-alive connection; POSTs a JSON body, returns (status, lower-cased headers, body)."""

    def __init__(self, host: str, port: int, headers: dict[str, str] | None = None) -> None:
        self.host, self.port = host, port
        self.extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes) -> tuple[int, dict[str, str], bytes]:
        if self.reader is None or self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        reader = self.reader
        self.writer.write(f"POST {path} HTTP/1.1\r\nhost: {self.host}\r\ncontent-type: application/json\r\n"
                          f"content-length: {len(body)}\r\n{self.extra}\r\n".encode() + body)
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        headers = {}
        for line in head[1:]:
            name, _, value = line.partition(":")
            if name:
                headers[name.strip().lower()] = value.strip()
        if "content-length" in headers:
            payload = await reader.readexactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding") == "chunked":
            parts = []
            while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
                parts.append(await reader.readexactly(size))
                await reader.readexactly(2)
            await reader.readuntil(b"\r\n")  # the (empty) trailer
            payload = b"".join(parts)
        else:
            raise RuntimeError(f"response without content-length or chunks: {head[0]}")
        return int(head[0].split()[1]), headers, payload

    async def get(self, path: str) -> bytes:
        if self.reader is None or self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        self.writer.write(f"GET {path} HTTP/1.1\r\nhost: {self.host}\r\n\r\n".encode())
        head = (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1").lower()
        length = int(head.split("content-length:")[1].split("\r\n")[0])
        return await self.reader.readexactly(length)

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def serve_upstream(port: int, latency: float, jitter: float = 0.0) -> None:
    """Answers every POST with one fixed chat completion (a `bench-varied` one: the next of
    VARIED_REPLIES) after `latency` s, +- `jitter` of it drawn uniformly (a stream: its chunks
    spread over that time); GET /v1/models and /bench/service-ms too."""
    rng = random.Random(0)
    service_ms: dict[str, float] = {}
    served = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal served
        try:
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
                length = 0
                for line in head.split("\r\n")[1:]:
                    name, _, value = line.partition(":")
                    if name.strip().lower() == "content-length":
                        length = int(value)
                body = await reader.readexactly(length) if length else b""
                if head.startswith("GET /bench/service-ms"):
                    writer.write(response(200, json.dumps(service_ms).encode()))
                    service_ms.clear()
                    continue
                if head.startswith("GET"):
                    writer.write(response(200, MODELS))
                    continue
                t0 = time.perf_counter()  # the request is fully read
                delay = latency * (1 + jitter * (2 * rng.random() - 1))
                if STREAM.search(body):
                    await asyncio.sleep(delay / 2)  # time to the first token, then the rest spread out
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                                 b"transfer-encoding: chunked\r\n\r\n")
                    for i, event in enumerate(SSE):
                        if 1 <= i <= STREAM_WORDS:
                            await asyncio.sleep(delay / 2 / STREAM_WORDS)
                        writer.write(b"%x\r\n%s\r\n" % (len(event), event))
                    writer.write(b"0\r\n\r\n")
                    spent = (time.perf_counter() - t0) * 1000
                else:
                    await asyncio.sleep(delay)
                    spent = (time.perf_counter() - t0) * 1000
                    reply = COMPLETION
                    if VARIED_MARK in body:
                        served += 1
                        reply = VARIED_REPLIES[bool(TOOLS.search(body))][served % 7]
                    writer.write(response(200, reply, b"x-bench-service-ms: %.3f\r\n" % spent))
                if m := BENCH_ID.search(body):
                    key = m.group(1).decode()
                    service_ms[key] = max(spent, service_ms.get(key, 0.0))
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=1024)
    async with server:
        await server.serve_forever()


def main() -> None:
    ap = argparse.ArgumentParser(description="fixed-latency OpenAI-compatible upstream for benchmarks")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--latency", type=float, default=0.05)
    ap.add_argument("--jitter", type=float, default=0.0, help="relative spread of the latency, 0..1")
    args = ap.parse_args()
    uvloop.run(serve_upstream(args.port, args.latency, args.jitter))


if __name__ == "__main__":
    main()
