"""The actor client: pooled HTTP connections, one call = one chat completion request upstream.

Failures become `UpstreamError` with a kind (a bounded metric label) that the API maps to a status:
timeout -> 504, rate_limited -> 429 (Retry-After kept), client_error -> the upstream's own 4xx,
auth (401/403 to the route's own upstream_api_key: turngate's fault, not the client's) ->
502 without the upstream's text, server_error / connect / garbage -> 502.

A call that fails before the upstream sent a byte of reply is retried once: a failed connect
(refused, reset), or a pooled keep-alive connection the upstream had closed as the request went
out. Never once reply bytes came in, and never on a fresh connection that broke after the request
was sent: the upstream may be generating that reply.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import httpcore

from service.settings import RouteSettings
from service.telemetry import metrics
from service.telemetry.throttled import ThrottledWarning

log = logging.getLogger(__name__)


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
    return [httpcore.AsyncConnectionPool(max_connections=max_connections, keepalive_expiry=60.0,
                                         network_backend=_NotingBackend())
            for _ in range(shards)]


class _Call:
    """What the network backend saw during one upstream call."""

    __slots__ = ("connected",)

    def __init__(self) -> None:
        self.connected = False  # set by _NotingBackend when the call opened a new connection


_CALL: ContextVar[_Call | None] = ContextVar("turngate_upstream_call", default=None)


class _NotingBackend(httpcore.AsyncNetworkBackend):
    """httpcore's asyncio network backend, noting on the current call whether it opened a connection:
    a failure on a reused connection may be the keep-alive race, on a fresh one it may not. (An
    httpcore trace callback would tell it too, with a callback per event of every call.)"""

    def __init__(self) -> None:
        self._inner = httpcore.AnyIOBackend()

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                          local_address: str | None = None, socket_options=None) -> httpcore.AsyncNetworkStream:
        call = _CALL.get()
        if call is not None:
            call.connected = True
        return await self._inner.connect_tcp(host, port, timeout=timeout, local_address=local_address,
                                             socket_options=socket_options)

    async def connect_unix_socket(self, path: str, timeout: float | None = None,
                                  socket_options=None) -> httpcore.AsyncNetworkStream:  # pragma: no cover
        return await self._inner.connect_unix_socket(path, timeout=timeout, socket_options=socket_options)

    async def sleep(self, seconds: float) -> None:  # pragma: no cover - httpcore's connect retries only
        await self._inner.sleep(seconds)


class UpstreamClient:
    """Calls the upstream over pools from make_http_clients (their backend tells reused connections)."""

    def __init__(self, pools: list[httpcore.AsyncConnectionPool]) -> None:
        self.pools = pools
        self._next = itertools.cycle(pools)
        self._auth_warning = ThrottledWarning(log)

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
            async with asyncio.timeout(timeout_s):  # the whole attempt, its retry included
                resp = await self._post(route.alias, url, headers, content)
        except (TimeoutError, httpcore.TimeoutException) as e:
            raise UpstreamError("timeout", f"upstream did not answer within {timeout_s:g}s") from e
        except (httpcore.NetworkError, httpcore.ProtocolError, httpcore.UnsupportedProtocol, OSError) as e:
            raise UpstreamError("connect", f"upstream unreachable: {type(e).__name__}") from e
        latency = time.perf_counter() - started
        if resp.status in (401, 403) and route.upstream_api_key is not None:
            raise self._auth_error(route, resp)
        if resp.status >= 400:
            raise _status_error(resp)
        return _parse(resp.content, latency)

    async def _post(self, route: str, url: str, headers: list, content: bytes) -> httpcore.Response:
        """POST, retried once when it failed before a byte of reply (see the module's docstring)."""
        for retry in (False, True):
            call = _Call()
            token = _CALL.set(call)
            in_body = False
            try:
                async with next(self._next).stream("POST", url, headers=headers, content=content) as resp:
                    in_body = True  # the status line and headers are in: never retried from here
                    await resp.aread()
                return resp
            except (httpcore.NetworkError, httpcore.RemoteProtocolError) as e:
                if isinstance(e, httpcore.ConnectError):
                    reason = "connect"  # nothing was sent
                elif not in_body and not call.connected:
                    reason = "stale_connection"  # a kept-alive connection the upstream had closed
                else:
                    reason = None
                if retry or reason is None:
                    raise
                metrics.UPSTREAM_RETRIES.labels(route, reason).inc()
            finally:
                _CALL.reset(token)
        raise AssertionError("unreachable")

    def _auth_error(self, route: RouteSettings, resp: httpcore.Response) -> UpstreamError:
        # The upstream's words are for the operator's log only: they describe turngate's credential.
        self._auth_warning.warning("upstream refused the upstream_api_key of route %s (HTTP %d): %s",
                                   route.alias, resp.status, str(_error_body(resp)[1])[:200])
        return UpstreamError("auth", f"The upstream refused this gateway's own credentials (HTTP {resp.status}). "
                                     "Your request and API key are not at fault; the gateway's operator must "
                                     "fix the route's upstream key.", resp.status)


def _error_body(resp: httpcore.Response) -> tuple[dict[str, Any] | None, str]:
    """The upstream's error envelope (None when it sent none) and its message."""
    try:
        body = json.loads(resp.content)
        return body, body["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return None, resp.content[:200].decode(errors="replace") or f"HTTP {resp.status}"


def _status_error(resp: httpcore.Response) -> UpstreamError:
    body, message = _error_body(resp)
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
