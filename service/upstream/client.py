"""The actor client: pooled HTTP connections, one call = one chat completion request upstream.

Failures become `UpstreamError` with a kind (a bounded metric label) that the API maps to a status:
timeout -> 504, rate_limited -> 429 (Retry-After kept), client_error -> the upstream's own 4xx,
auth (401/403 to the route's own upstream_api_key: turngate's fault, not the client's) ->
502 without the upstream's text, server_error / connect / garbage -> 502.

A call that fails before the upstream sent a byte of reply is retried once: a failed connect
(refused, reset), or a pooled keep-alive connection the upstream had closed as the request went
out. Never once reply bytes came in, and never on a fresh connection that broke after the request
was sent: the upstream may be generating that reply.

What the upstream says besides the choices reaches the client unchanged: the whole body (usage with
its details, service_tier, system_fingerprint, vendor fields) stays on each Sample, and so do the
choice's own fields (logprobs) and the response headers a client acts on (`forwarded_headers`).
Streamed calls (`open_stream`, passthrough streams) hand the upstream's SSE events over as they
arrive (service.upstream.streaming).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from service import wirejson
from service.settings import RouteSettings
from service.telemetry import metrics
from service.telemetry.throttled import ThrottledWarning
from service.upstream import streaming, transport

log = logging.getLogger(__name__)


class UpstreamError(Exception):
    """kind: a bounded label. `body`: the upstream's error envelope ({"error": {...}}) where it sent
    one; for kind "stream_error" the error event it sent inside a stream, relayed as it is.
    `headers`: the failed call's forwardable headers (rate limits, request id)."""

    def __init__(self, kind: str, message: str, status: int | None = None,
                 retry_after: str | None = None, body: dict[str, Any] | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.status = status
        self.retry_after = retry_after
        self.body = body
        self.headers = headers or {}


@dataclass
class Sample:
    """One candidate reply as the upstream returned it."""

    message: dict[str, Any]
    finish_reason: str | None
    latency_s: float
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    response: dict[str, Any] = field(default_factory=dict)  # the whole upstream body, choices removed
    choice: dict[str, Any] = field(default_factory=dict)  # the choice's other fields: logprobs, vendor ones
    # This candidate's usage as the upstream sent it, details included. A call asking for n choices
    # reports one usage for all: it goes on the call's first sample, the others get None.
    usage: dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)  # its call's forwarded_headers

    @property
    def logprobs(self) -> dict[str, Any] | None:
        lp = self.choice.get("logprobs")
        return lp if isinstance(lp, dict) else None

    @property
    def request_id(self) -> str | None:
        return self.headers.get(UPSTREAM_REQUEST_ID)


# Upstream response headers a client acts on, forwarded as they are: the rate limits (so an SDK or
# agent framework can slow down before a 429), retry hints and the upstream's processing time.
# The upstream's x-request-id goes out renamed, as x-upstream-request-id: x-request-id is
# turngate's own id of the request. Never forwarded: the account's identity (openai-organization,
# openai-project: the operator's, on routes with their own key), cookies, hop-by-hop headers.
_FORWARDED_PREFIXES = (b"x-ratelimit-",)
_FORWARDED = {b"openai-processing-ms", b"retry-after", b"retry-after-ms"}
UPSTREAM_REQUEST_ID = "x-upstream-request-id"


def forwarded_headers(headers: list[tuple[bytes, bytes]]) -> dict[str, str]:
    out = {}
    for name, value in headers:
        name = name.lower()
        if name == b"x-request-id":
            out[UPSTREAM_REQUEST_ID] = value.decode("latin-1")
        elif name in _FORWARDED or name.startswith(_FORWARDED_PREFIXES):
            out[name.decode("latin-1")] = value.decode("latin-1")
    return out


def make_pools(max_connections: int = 1024) -> transport.ConnectionPools:
    """The upstream connections: service.upstream.transport's pools, one per origin, idle
    connections kept 60 s. (httpcore, measured against it: bench/upstream_client.py.)"""
    return transport.ConnectionPools(max_connections=max_connections, keepalive_expiry=60.0)


class _Call(transport.Wire):
    """What one attempt of an upstream call saw on the wire (noted by the transport: a fresh
    connection, the request's bytes handed to the socket, the latest reply bytes in), and when it
    `ended`: the reply read, or the attempt failed or was given up."""

    __slots__ = ("ended",)

    def __init__(self) -> None:
        super().__init__()
        self.ended: float | None = None

    def seconds(self) -> float:
        """Request written to reply read: the upstream's share of this attempt."""
        if self.sent is None or self.received is None:
            return 0.0
        return max(0.0, self.received - self.sent)


class UpstreamWait:
    """How long a turn waited on the upstream, as far as turngate can know it: the union of its
    calls' spans, each from its request written (last byte to the socket) to its reply read (last
    byte in), or to the moment the call failed or was given up. turngate's own work before the send
    (body built and JSON-encoded, a pooled connection taken) and after the receive (the reply parsed,
    the task woken) is outside every span. An event loop busy when the reply lands still counts."""

    def __init__(self) -> None:
        self._calls: list[_Call] = []

    def add(self, call: _Call) -> None:
        self._calls.append(call)

    def seconds(self, at: float | None = None) -> float:
        """The union's length; calls still out count up to `at` (None: they are left out)."""
        spans = sorted((c.sent, c.ended if c.ended is not None else at) for c in self._calls
                       if c.sent is not None and (c.ended is not None or at is not None))
        total, reach = 0.0, float("-inf")
        for start, end in spans:
            assert end is not None
            if end > reach:
                total += end - max(start, reach)
                reach = end
        return total


class UpstreamClient:
    """Calls the upstream over pools from make_pools (or a TracedPool around them)."""

    def __init__(self, pool: transport.ConnectionPools, max_reply_bytes: int | None = None) -> None:
        self.pool = pool
        self.max_reply_bytes = max_reply_bytes  # a reply's body, streamed or not; None: no limit
        self._auth_warning = ThrottledWarning(log)

    async def aclose(self) -> None:
        await self.pool.aclose()

    async def complete(self, route: RouteSettings, body: dict[str, Any], n: int,
                       client_key: str | None, timeout_s: float, wait: UpstreamWait | None = None) -> list[Sample]:
        """One upstream call asking for `n` choices; returns one Sample per choice, its latency the
        call's request-written-to-reply-read span. `wait` collects the call's attempts."""
        payload = _payload(route, body, stream=False)
        if n > 1:
            payload["n"] = n
        else:
            payload.pop("n", None)
        resp, call = await self._call(route, payload, client_key, timeout_s, stream=False, wait=wait)
        return _parse(resp.content, call.seconds(), forwarded_headers(resp.headers))

    async def open_stream(self, route: RouteSettings, body: dict[str, Any], client_key: str | None,
                          timeout_s: float, idle_timeout_s: float,
                          wait: UpstreamWait | None = None) -> UpstreamStream:
        """A streamed call (`stream: true`), open once the upstream's status line and headers are in
        (within timeout_s); its events then come as the upstream sends them, each within
        idle_timeout_s of the one before. An error status raises here, its body read."""
        payload = _payload(route, body, stream=True)
        # turngate counts the tokens of every turn: usage is asked for whatever the client asked.
        payload["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
        resp, call = await self._call(route, payload, client_key, timeout_s, stream=True, wait=wait)
        return UpstreamStream(resp, forwarded_headers(resp.headers), idle_timeout_s, call, self.max_reply_bytes)

    async def _call(self, route: RouteSettings, payload: dict[str, Any], client_key: str | None,
                    timeout_s: float, stream: bool,
                    wait: UpstreamWait | None = None) -> tuple[transport.Response, _Call]:
        """POSTs the payload; a streamed reply comes back unread, anything else read whole."""
        content = await wirejson.dumps_off_loop(payload)
        key = route.upstream_api_key.get_secret_value() if route.upstream_api_key else client_key
        url = route.upstream_base_url.rstrip("/") + "/chat/completions"
        headers = [(b"content-type", b"application/json")]
        if key:
            headers.append((b"authorization", f"Bearer {key}".encode()))
        try:
            async with asyncio.timeout(timeout_s):  # the whole attempt, its retry included
                resp, call = await self._post(route.alias, url, headers, content, stream, wait)
                if stream and resp.status >= 400:
                    await _read_and_close(resp, self.max_reply_bytes)
        except TimeoutError as e:  # the transport's own timeouts are TimeoutErrors too
            raise UpstreamError("timeout", f"upstream did not answer within {timeout_s:g}s") from e
        except (transport.TransportError, OSError) as e:
            raise UpstreamError("connect", f"upstream unreachable: {type(e).__name__}") from e
        except transport.ReplyTooLarge as e:
            raise UpstreamError("garbage", str(e)) from e
        if resp.status in (401, 403) and route.upstream_api_key is not None:
            raise self._auth_error(route, resp)
        if resp.status >= 400:
            raise _status_error(resp)
        return resp, call

    async def _post(self, route: str, url: str, headers: list[tuple[bytes, bytes]], content: bytes,
                    stream: bool = False, wait: UpstreamWait | None = None) -> tuple[transport.Response, _Call]:
        """POST, retried once when it failed before a byte of reply (see the module's docstring).
        With `stream` the body is left unread: the caller reads and closes it (the call's span then
        ends with the headers; the stream's events extend it)."""
        for retry in (False, True):
            call = _Call()
            if wait is not None:
                wait.add(call)
            done = False
            try:
                resp = await self.pool.request(b"POST", url, headers, content, wire=call)
                if not stream:
                    await _read_and_close(resp, self.max_reply_bytes)
                done = True
                return resp, call
            except (transport.ConnectFailed, transport.StaleConnection) as e:
                if retry:
                    raise
                # Nothing was sent, or a kept-alive connection the upstream had closed: no reply bytes.
                reason = "connect" if isinstance(e, transport.ConnectFailed) else "stale_connection"
                metrics.UPSTREAM_RETRIES.labels(route, reason).inc()
            finally:
                # A failed or cancelled attempt held the turn until now; a read one until its last byte.
                call.ended = call.received if done and call.received is not None else time.perf_counter()
        raise AssertionError("unreachable")

    def _auth_error(self, route: RouteSettings, resp: transport.Response) -> UpstreamError:
        # The upstream's words are for the operator's log only: they describe turngate's credential.
        self._auth_warning.warning("upstream refused the upstream_api_key of route %s (HTTP %d): %s",
                                   route.alias, resp.status, str(_error_body(resp)[1])[:200])
        return UpstreamError("auth", f"The upstream refused this gateway's own credentials (HTTP {resp.status}). "
                                     "Your request and API key are not at fault; the gateway's operator must "
                                     "fix the route's upstream key.", resp.status)


def _payload(route: RouteSettings, body: dict[str, Any], stream: bool) -> dict[str, Any]:
    payload = {**body, "model": route.model, "stream": stream}
    if not stream:
        payload.pop("stream_options", None)
    if route.record_logprobs and not body.get("logprobs"):
        payload["logprobs"] = True  # kept on the record, not sent to the client (service.api.replies)
    return payload


async def _read_and_close(resp: transport.Response, limit: int | None = None) -> None:
    try:
        await resp.aread(limit)
    finally:
        await resp.aclose()


def _error_body(resp: transport.Response) -> tuple[dict[str, Any] | None, str]:
    """The upstream's error envelope (None when it sent none) and its message."""
    try:
        body = json.loads(resp.content)
        return body, body["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return None, resp.content[:200].decode(errors="replace") or f"HTTP {resp.status}"


def _status_error(resp: transport.Response) -> UpstreamError:
    body, message = _error_body(resp)
    status, headers = resp.status, forwarded_headers(resp.headers)
    if status == 429:
        retry_after = headers.get("retry-after")
        return UpstreamError("rate_limited", f"upstream rate limit: {message}", status, retry_after, body, headers)
    if status < 500:
        return UpstreamError("client_error", f"upstream rejected the request: {message}", status, body=body,
                             headers=headers)
    return UpstreamError("server_error", f"upstream error {status}: {message}", status, headers=headers)


def _parse(raw: bytes, latency: float, headers: dict[str, str] | None = None) -> list[Sample]:
    try:
        body = wirejson.loads_upstream(raw)
        choices = body["choices"]
        if not isinstance(choices, list) or not choices:
            raise ValueError("no choices")
        return samples_of(body, choices, latency, headers or {})
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise UpstreamError("garbage", f"upstream sent an unreadable reply ({e})") from e


def samples_of(body: dict[str, Any], choices: list[dict[str, Any]], latency: float,
               headers: dict[str, str]) -> list[Sample]:
    """One Sample per choice of a reply (a body and its choices, which a stream assembles)."""
    usage = body.get("usage")
    usage = usage if isinstance(usage, dict) else None
    single = len(choices) == 1  # usage is per candidate only when there is one
    response = {k: v for k, v in body.items() if k != "choices"}
    samples = []
    for position, choice in enumerate(sorted(choices, key=lambda c: c.get("index", 0))):
        message = choice["message"]
        if not isinstance(message, dict):
            raise TypeError("message is not an object")
        samples.append(Sample(
            message=message,
            finish_reason=choice.get("finish_reason"),
            latency_s=latency,
            prompt_tokens=usage.get("prompt_tokens") if usage else None,
            completion_tokens=usage.get("completion_tokens") if usage and single else None,
            response=response,
            choice={k: v for k, v in choice.items() if k not in ("index", "message", "finish_reason")},
            usage=usage if position == 0 else None,
            headers=headers,
        ))
    return samples


class UpstreamStream:
    """A streamed upstream reply, open: its forwarded headers, then its SSE events (`events`), which
    the caller must see through or close (`aclose`)."""

    def __init__(self, resp: transport.Response, headers: dict[str, str], idle_timeout_s: float,
                 call: _Call | None = None, max_bytes: int | None = None) -> None:
        self.headers = headers
        self._max_bytes = max_bytes  # the stream is cut past this many bytes (upstream_max_reply_bytes)
        # The upstream's span (UpstreamWait's definition): request written to the latest piece in.
        now = time.perf_counter()
        self.sent = call.sent if call is not None and call.sent is not None else now
        self.last_in = call.received if call is not None and call.received is not None else now
        self._resp = resp
        self._idle_timeout_s = idle_timeout_s
        content_type = next((v for k, v in resp.headers if k.lower() == b"content-type"), b"")
        self._is_sse = content_type.split(b";")[0].strip().lower() == b"text/event-stream"

    async def events(self, deadline: float) -> AsyncIterator[streaming.Event]:
        """Events as they arrive, up to [DONE]; a failure raises UpstreamError: the connection broke
        ("connect"), nothing came for idle_timeout_s or the deadline (time.monotonic()) passed
        ("timeout"), the upstream sent an error event ("stream_error"), no SSE, or more than the size
        limit ("garbage")."""
        if not self._is_sse:
            raise UpstreamError("garbage", "upstream answered a stream request without an event stream")
        decoder = streaming.Decoder()
        pieces = self._resp.aiter_stream(self._max_bytes)
        while True:
            left = deadline - time.monotonic()
            wait = min(self._idle_timeout_s, left)
            try:
                async with asyncio.timeout(max(wait, 0.0)):
                    piece = await anext(pieces, None)
                self.last_in = time.perf_counter()
            except TimeoutError as e:
                why = "the turn's deadline passed" if wait >= left else f"nothing came for {wait:g}s"
                raise UpstreamError("timeout", f"upstream stream stalled: {why}") from e
            except (transport.TransportError, OSError) as e:
                raise UpstreamError("connect", f"upstream stream broke: {type(e).__name__}") from e
            except transport.ReplyTooLarge as e:
                raise UpstreamError("garbage", str(e)) from e
            try:
                events = decoder.feed(piece) if piece is not None else decoder.close()
            except streaming.StreamGarbage as e:
                raise UpstreamError("garbage", f"upstream sent an unreadable stream ({e})") from e
            for event in events:
                if isinstance(event.data, dict) and event.data.get("error") is not None:
                    message = event.data["error"].get("message") if isinstance(event.data["error"], dict) else None
                    raise UpstreamError("stream_error", f"upstream error in its stream: {message or event.data}",
                                        body=event.data, headers=self.headers)
                yield event
                if event.done:
                    return
            if piece is None:
                return

    async def aclose(self) -> None:
        await self._resp.aclose()
