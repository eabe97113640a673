"""Lean measuring apparatus for bench/overhead.py: a keep-alive HTTP/1.1 client and a fixed-latency
OpenAI-compatible upstream, both on raw asyncio streams.

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

import uvloop

COMPLETION = json.dumps({
    "id": "chatcmpl-bench", "object": "chat.completion", "created": 0, "model": "fake",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop",
                 "logprobs": None}],
    "usage": {"prompt_tokens": 12, "completion_tokens": 1, "total_tokens": 13},
}).encode()
MODELS = b'{"object":"list","data":[{"id":"fake","object":"model","created":0,"owned_by":"bench"}]}'


def response(status: int, body: bytes, extra: bytes = b"") -> bytes:
    return (f"HTTP/1.1 {status} OK\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            .encode() + extra + b"\r\n" + body)


class LeanClient:
    """One keep-alive connection; POSTs a JSON body, returns (status, lower-cased headers, body)."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes) -> tuple[int, dict[str, str], bytes]:
        if self.reader is None or self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        reader = self.reader
        self.writer.write(f"POST {path} HTTP/1.1\r\nhost: {self.host}\r\ncontent-type: application/json\r\n"
                          f"content-length: {len(body)}\r\n\r\n".encode() + body)
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        headers = {}
        for line in head[1:]:
            name, _, value = line.partition(":")
            if name:
                headers[name.strip().lower()] = value.strip()
        if "content-length" not in headers:
            raise RuntimeError(f"response without content-length: {head[0]}")
        payload = await reader.readexactly(int(headers["content-length"]))
        return int(head[0].split()[1]), headers, payload

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def serve_upstream(port: int, latency: float, jitter: float = 0.0) -> None:
    """Answers every POST with one fixed chat completion after `latency` s, +- `jitter` of it drawn
    uniformly; GET /v1/models too."""
    rng = random.Random(0)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
                length = 0
                for line in head.split("\r\n")[1:]:
                    name, _, value = line.partition(":")
                    if name.strip().lower() == "content-length":
                        length = int(value)
                if length:
                    await reader.readexactly(length)
                if head.startswith("GET"):
                    writer.write(response(200, MODELS))
                    continue
                await asyncio.sleep(latency * (1 + jitter * (2 * rng.random() - 1)))
                writer.write(response(200, COMPLETION))
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
