"""The actor client: one pooled httpx client, one call = one chat completion request upstream.

Failures become `UpstreamError` with a kind (a bounded metric label) that the API maps to a status:
timeout -> 504, rate_limited -> 429 (Retry-After kept), client_error -> the upstream's own 4xx,
server_error / connect / garbage -> 502.
"""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from service.settings import RouteSettings

ERROR_KINDS = ("timeout", "connect", "rate_limited", "client_error", "server_error", "garbage")


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


def make_http_clients(shards: int = 16, max_connections: int = 128) -> list[httpx.AsyncClient]:
    """Pooled clients for the upstream, sharded.

    httpcore scans every connection of a pool (a select() each) on every request and release, so
    one big pool costs O(connections) per call and collapses near 64 concurrent calls (measured:
    bench/overhead.py). Round-robin over small pools keeps each scan short.
    """
    # Timeouts are enforced per attempt by the sampler; the pool itself never gives up first.
    limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
    return [httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(None)) for _ in range(shards)]


class UpstreamClient:
    def __init__(self, clients: list[httpx.AsyncClient]) -> None:
        self.clients = clients
        self._next = itertools.cycle(clients)

    async def aclose(self) -> None:
        for client in self.clients:
            await client.aclose()

    async def complete(self, route: RouteSettings, body: dict[str, Any], n: int,
                       client_key: str | None, timeout_s: float) -> list[Sample]:
        """One upstream call asking for `n` choices; returns one Sample per choice."""
        payload = {**body, "model": route.model, "stream": False}
        payload.pop("stream_options", None)
        if n > 1:
            payload["n"] = n
        else:
            payload.pop("n", None)
        key = route.upstream_api_key.get_secret_value() if route.upstream_api_key else client_key
        headers = {"authorization": f"Bearer {key}"} if key else {}
        url = route.upstream_base_url.rstrip("/") + "/chat/completions"
        started = time.perf_counter()
        try:
            resp = await next(self._next).post(url, json=payload, headers=headers,
                                        timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 10.0)))
        except httpx.TimeoutException as e:
            raise UpstreamError("timeout", f"upstream did not answer within {timeout_s:g}s") from e
        except httpx.HTTPError as e:
            raise UpstreamError("connect", f"upstream unreachable: {type(e).__name__}") from e
        latency = time.perf_counter() - started
        if resp.status_code >= 400:
            raise _status_error(resp)
        return _parse(resp, latency)


def _status_error(resp: httpx.Response) -> UpstreamError:
    try:
        body = resp.json()
        message = body["error"]["message"]
    except (ValueError, KeyError, TypeError):
        body, message = None, resp.text[:200] or resp.reason_phrase
    status = resp.status_code
    if status == 429:
        return UpstreamError("rate_limited", f"upstream rate limit: {message}", status,
                             resp.headers.get("retry-after"), body)
    if status < 500:
        return UpstreamError("client_error", f"upstream rejected the request: {message}", status, body=body)
    return UpstreamError("server_error", f"upstream error {status}: {message}", status)


def _parse(resp: httpx.Response, latency: float) -> list[Sample]:
    try:
        body = resp.json()
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
    except (ValueError, KeyError, TypeError, json.JSONDecodeError) as e:
        raise UpstreamError("garbage", f"upstream sent an unreadable reply ({e})") from e
