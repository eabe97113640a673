"""Candidate sampling: N candidates from the actor, concurrently, within the turn's deadline.

One upstream request with n=N where the route says the upstream supports it, otherwise N concurrent
requests over the shared pooled client. What came back before the deadline is kept; attempts that
failed are returned as errors so the caller can rank the rest or, when nothing came back, fail with
the most telling error.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from service.settings import RouteSettings
from service.telemetry import metrics
from service.upstream.client import Sample, UpstreamClient, UpstreamError


@dataclass
class Sampled:
    samples: list[Sample] = field(default_factory=list)
    errors: list[UpstreamError] = field(default_factory=list)


def start(upstream: UpstreamClient, route: RouteSettings, body: dict[str, Any], n: int,
          client_key: str | None, deadline: float) -> list[asyncio.Task[list[Sample]]]:
    """Fire the upstream calls for n candidates; each task yields one or more samples."""
    timeout = max(0.001, min(route.attempt_timeout_s, deadline - time.monotonic()))
    if route.upstream_supports_n and n > 1:
        calls = [upstream.complete(route, body, n, client_key, timeout)]
    else:
        calls = [upstream.complete(route, body, 1, client_key, timeout) for _ in range(n)]
    return [asyncio.ensure_future(_observed(route.alias, call)) for call in calls]


async def _observed(route: str, call) -> list[Sample]:
    try:
        samples = await call
    except UpstreamError as e:
        metrics.UPSTREAM_ERRORS.labels(route, e.kind).inc()
        raise
    metrics.UPSTREAM_DURATION.labels(route).observe(samples[0].latency_s)
    return samples


async def collect(tasks: list[asyncio.Task[list[Sample]]], deadline: float) -> Sampled:
    """Wait for the tasks until the deadline; keep task order, so candidate 0 is the first call's."""
    out = Sampled()
    if not tasks:
        return out
    try:
        _, pending = await asyncio.wait(tasks, timeout=max(0.0, deadline - time.monotonic()))
    except asyncio.CancelledError:
        cancel(tasks)  # the client went away: stop paying for candidates nobody will see
        raise
    for task in tasks:
        if task in pending:
            task.cancel()
            out.errors.append(UpstreamError("timeout", "upstream did not answer before the turn deadline"))
        elif (exc := task.exception()) is not None:
            out.errors.append(exc if isinstance(exc, UpstreamError)
                              else UpstreamError("connect", f"upstream call failed: {exc!r}"))
        else:
            out.samples.extend(task.result())
    return out


def cancel(tasks: list[asyncio.Task]) -> None:
    for task in tasks:
        task.cancel()


def most_telling(errors: list[UpstreamError]) -> UpstreamError:
    """The error to show the client when no candidate came back.

    A client error (the request itself is bad) or a rate limit says the most; timeouts only when
    every attempt timed out.
    """
    for kind in ("client_error", "rate_limited", "server_error", "garbage", "connect", "timeout"):
        for e in errors:
            if e.kind == kind:
                return e
    return UpstreamError("server_error", "upstream returned no candidates")
