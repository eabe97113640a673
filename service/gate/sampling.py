"""Candidate sampling: N candidates from the actor, concurrently, within the turn's deadline.

One upstream request with n=N where the route says the upstream supports it, otherwise N concurrent
requests over the shared pooled client. Once the first candidate is in, the others get the route's
candidate wait (max(candidate_wait_s, candidate_wait_ratio x the first one's latency)), never past
the deadline; calls still out then are cancelled, so one hung call cannot hold the turn. Attempts
that failed or were given up are returned as errors so the caller can rank the rest, record them,
or, when nothing came back, fail with the most telling error.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any

from service.gate.usage import is_token_count
from service.settings import RouteSettings
from service.telemetry import metrics, spans
from service.telemetry.tracing import Tracing
from service.upstream.client import Sample, UpstreamClient, UpstreamError, UpstreamWait


@dataclass
class Sampled:
    samples: list[Sample] = field(default_factory=list)
    errors: list[UpstreamError] = field(default_factory=list)
    # Tokens the upstream billed for these calls, from each call's usage (None: no call reported any).
    # Per call, not per sample: one call with n=N reports its prompt once and its N completions together.
    prompt_tokens: int | None = None
    completion_tokens: int | None = None

    def add_usage(self, samples: list[Sample]) -> None:
        """Counts one call's usage (the samples one call returned)."""
        usage = samples[0].response.get("usage") if samples else None
        if not isinstance(usage, dict):
            return
        for kind in ("prompt_tokens", "completion_tokens"):
            value = usage.get(kind)
            if is_token_count(value):
                setattr(self, kind, (getattr(self, kind) or 0) + value)


def start(upstream: UpstreamClient, route: RouteSettings, body: dict[str, Any], n: int,
          client_key: str | None, deadline: float, one_call: bool | None = None,
          tracing: Tracing | None = None, wait: UpstreamWait | None = None) -> list[asyncio.Task[list[Sample]]]:
    """Fire the upstream calls for n candidates; each task yields one or more samples.

    `one_call`: ask for all n in one request (default: when the route says its upstream takes `n`).
    `wait`: collects the calls' request-written-to-reply-read spans (the turn's upstream time).
    """
    timeout = max(0.001, min(route.attempt_timeout_s, deadline - time.monotonic()))
    per_call = n if (route.upstream_supports_n if one_call is None else one_call) and n > 1 else 1
    return [asyncio.ensure_future(_observed(route, per_call, upstream.complete(route, body, per_call, client_key,
                                                                                timeout, wait), tracing))
            for _ in range(n // per_call)]


async def one(upstream: UpstreamClient, route: RouteSettings, body: dict[str, Any], n: int,
              client_key: str | None, deadline: float, tracing: Tracing | None = None,
              wait: UpstreamWait | None = None) -> Sampled:
    """One call asking for all n, awaited in the caller's own task (passthrough): no task and no
    wait of its own, which cost more than the rest of the gate on that path. Nothing else runs
    beside it, and its timeout is the turn's deadline already, as in `start`."""
    timeout = max(0.001, min(route.attempt_timeout_s, deadline - time.monotonic()))
    out = Sampled()
    try:
        samples = await _observed(route, n, upstream.complete(route, body, n, client_key, timeout, wait), tracing)
    except UpstreamError as e:
        out.errors.append(e)
    except Exception as e:  # as collect reports a call that failed otherwise
        out.errors.append(UpstreamError("connect", f"upstream call failed: {e!r}"))
    else:
        out.samples.extend(samples)
        out.add_usage(samples)
    return out


async def _observed(route: RouteSettings, n: int, call: Awaitable[list[Sample]],
                    tracing: Tracing | None) -> list[Sample]:
    if tracing is None:
        return await _measured(route.alias, call)
    # A client span per upstream call; current while the call runs, so its traceparent goes upstream.
    with tracing.span(f"chat {route.model}", spans.upstream_call(route, n), client=True) as span:
        try:
            samples = await _measured(route.alias, call)
        except UpstreamError as e:
            tracing.failed(span, e.kind, e.message)
            raise
        except asyncio.CancelledError:
            span.set_attribute("turngate.cancelled", True)  # given up by the candidate wait, or the client left
            raise
        span.set_attributes(spans.upstream_result(samples))
        return samples


async def _measured(route: str, call: Awaitable[list[Sample]]) -> list[Sample]:
    try:
        samples = await call
    except UpstreamError as e:
        metrics.UPSTREAM_ERRORS.labels(route, e.kind).inc()
        raise
    metrics.labelled(metrics.UPSTREAM_DURATION, route).observe(samples[0].latency_s)
    return samples


def candidate_wait(route: RouteSettings, first_latency_s: float) -> float:
    """How long the other candidates may take once the first is in."""
    return max(route.candidate_wait_s, route.candidate_wait_ratio * first_latency_s)


async def collect(tasks: list[asyncio.Task[list[Sample]]], deadline: float, route: RouteSettings,
                  started: float | None = None, first_in: float | None = None) -> Sampled:
    """Wait for the tasks until the deadline or the candidate wait runs out, cancel what is left;
    keep task order, so candidate 0 is the first call's.

    `started` is when the calls were fired (default: now) and `first_in` when an earlier collect of
    the same turn got its first candidate (time.monotonic()); the wait then counts from there.
    """
    out = Sampled()
    if not tasks:
        return out
    started = time.monotonic() if started is None else started
    stop, wait = deadline, None
    if first_in is not None:
        wait = candidate_wait(route, first_in - started)
        stop = min(deadline, first_in + wait)
    pending = set(tasks)
    try:
        while pending and (timeout := stop - time.monotonic()) > 0:
            done, pending = await asyncio.wait(
                pending, timeout=timeout,
                return_when=asyncio.ALL_COMPLETED if wait is not None else asyncio.FIRST_COMPLETED)
            if wait is None and any(not t.cancelled() and t.exception() is None for t in done):
                first_in = time.monotonic()
                wait = candidate_wait(route, first_in - started)
                stop = min(deadline, first_in + wait)
    except asyncio.CancelledError:
        cancel(tasks)  # the client went away: stop paying for candidates nobody will see
        raise
    for task in tasks:
        if not task.done():
            task.cancel()
            if stop < deadline:
                error = UpstreamError("abandoned", f"gave up {wait:.3g}s after the first candidate came back "
                                      "(candidate_wait_s, candidate_wait_ratio)")
            else:
                error = UpstreamError("timeout", "upstream did not answer before the turn deadline")
            metrics.UPSTREAM_ERRORS.labels(route.alias, error.kind).inc()
            out.errors.append(error)
        elif (exc := task.exception()) is not None:
            out.errors.append(exc if isinstance(exc, UpstreamError)
                              else UpstreamError("connect", f"upstream call failed: {exc!r}"))
        else:
            out.samples.extend(task.result())
            out.add_usage(task.result())
    return out


def cancel(tasks: list[asyncio.Task]) -> None:
    for task in tasks:
        task.cancel()


def most_telling(errors: list[UpstreamError]) -> UpstreamError:
    """The error to show the client when no candidate came back.

    A client error (the request itself is bad) or a rate limit says the most; timeouts only when
    every attempt timed out.
    """
    for kind in ("client_error", "auth", "rate_limited", "server_error", "garbage", "connect", "timeout",
                 "abandoned"):
        for e in errors:
            if e.kind == kind:
                return e
    return UpstreamError("server_error", "upstream returned no candidates")
