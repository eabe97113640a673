"""The actor client: pooled HTTP connections, one call = one chat completion request upstream.

Failures become `UpstreamError` with a kind (a bounded metric label) that the API maps to a status:
timeout -> 504, rate_limited -> 429 (Retry-After kept), client_error -> the upstream's own 4xx,
server_error / connect / garbage -> 502.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from dataclasses import dataclass, field
from typing import Any

import httpcore

from service.settings import RouteSettings


class UpstreamError(Exception):
    def __init__(self, kind: str, message: str, status: int | None = None,
                 retry_after: str | None = None, body: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.status = status
        self.retry_after = retry_after
        self.body = body


@dataclass
class Sample:
    """One candidate reply as the upstream returned it."""

    message: dict[str, Any]
    finish_reason: str | None
    latency_s: float
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    response: dict[str, Any] = field(default_factory=dict)  # the whole upstream body, choices removed


def make_http_clients(shards: int = 16, max_connections: int = 128) -> list[httpcore.AsyncConnectionPool]:
    """Connection pools for the upstream: httpcore, httpx's own transport, used directly.

    Two measured costs shape this. httpcore scans every connection of a pool (a select() each) on
    every request and release, so one big pool costs O(connections) per call: round-robin over
    small pools keeps each scan short (bench/overhead.py --pool-shards 1: 33 against 253 rank
    turns/s). And httpx's AsyncClient costs ~1.45x httpcore's CPU per call (bench/upstream_client.py).
    """
    return [httpcore.AsyncConnectionPool(max_connections=max_connections, keepalive_expiry=60.0)
            for _ in range(shards)]


class UpstreamClient:
    def __init__(self, pools: list[httpcore.AsyncConnectionPool]) -> None:
        self.pools = pools
        self._next = itertools.cycle(pools)

    async def aclose(self) -> None:
        for pool in self.pools:
            await pool.aclose()

    async def complete(self, route: RouteSettings, body: dict[str, Any], n: int,
                       client_key: str | None, timeout_s: float) -> list[Sample]:
        """One upstream call asking for `n` choices; returns one Sample per choice."""
        payload = {**body, "model": route.model, "stream": False}
        payload.pop("stream_options", None)
        if n > 1:
            payload["n"] = n
        else:
            payload.pop("n", None)
        content = json.dumps(payload, separators=(",", ":")).encode()
        key = route.upstream_api_key.get_secret_value() if route.upstream_api_key else client_key
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(content)).encode())]
        if key:
            headers.append((b"authorization", f"Bearer {key}".encode()))
        url = route.upstream_base_url.rstrip("/") + "/chat/completions"
        started = time.perf_counter()
        try:
            async with asyncio.timeout(timeout_s):  # the whole attempt, not each read
                resp = await next(self._next).request("POST", url, headers=headers, content=content)
        except (TimeoutError, httpcore.TimeoutException) as e:
            raise UpstreamError("timeout", f"upstream did not answer within {timeout_s:g}s") from e
        except (httpcore.NetworkError, httpcore.ProtocolError, httpcore.UnsupportedProtocol, OSError) as e:
            raise UpstreamError("connect", f"upstream unreachable: {type(e).__name__}") from e
        latency = time.perf_counter() - started
        if resp.status >= 400:
            raise _status_error(resp)
        return _parse(resp.content, latency)


def _status_error(resp: httpcore.Response) -> UpstreamError:
    try:
        body = json.loads(resp.content)
        message = body["error"]["message"]
    except (ValueError, KeyError, TypeError):
        body, message = None, resp.content[:200].decode(errors="replace") or f"HTTP {resp.status}"
    status = resp.status
    if status == 429:
        retry_after = next((v.decode() for k, v in resp.headers if k.lower() == b"retry-after"), None)
        return UpstreamError("rate_limited", f"upstream rate limit: {message}", status, retry_after, body)
    if status < 500:
        return UpstreamError("client_error", f"upstream rejected the request: {message}", status, body=body)
    return UpstreamError("server_error", f"upstream error {status}: {message}", status)


def _parse(raw: bytes, latency: float) -> list[Sample]:
    try:
        body = json.loads(raw)
        choices = body["choices"]
        if not isinstance(choices, list) or not choices:
            raise ValueError("no choices")
        usage = body.get("usage") or {}
        single = len(choices) == 1  # usage is per candidate only when there is one
        samples = []
        for choice in sorted(choices, key=lambda c: c.get("index", 0)):
            message = choice["message"]
            if not isinstance(message, dict):
                raise ValueError("message is not an object")
            samples.append(Sample(
                message=message,
                finish_reason=choice.get("finish_reason"),
                latency_s=latency,
                prompt_tokens=usage.get("prompt_tokens"),
                completion_tokens=usage.get("completion_tokens") if single else None,
                response={k: v for k, v in body.items() if k != "choices"},
            ))
        return samples
    except (ValueError, KeyError, TypeError) as e:
        raise UpstreamError("garbage", f"upstream sent an unreadable reply ({e})") from e
