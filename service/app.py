"""Wiring: build the services in a lifespan, mount the routers."""

from __future__ import annotations

import asyncio
import gc
import logging
from contextlib import asynccontextmanager
from typing import cast

from fastapi import FastAPI
from fastapi.routing import APIRoute
from fastapi.telemetry import TelemetryConfig

from service import config_summary, installed_version
from service.api import (
    admin,
    admin_keys,
    admin_page,
    admin_routes,
    admin_turns,
    errors,
    forward,
    health,
    metrics,
    openai,
    openapi,
)
from service.api import critic as critic_api
from service.api import feedback as feedback_api
from service.api.chatpath import ChatFastPath
from service.api.deps import Services
from service.api.limits import BodySizeLimit
from service.api.protocol import ChatCompletionRequest
from service.api.requests import RequestContext
from service.control.critic_sync import CriticSync
from service.control.keys import KeyCache
from service.control.plane import ControlPlane
from service.control.routes import RouteSync
from service.critic.base import Critic, CriticSlot
from service.critic.registry import CriticActivator, load_critic
from service.gate.pipeline import Gate
from service.limits.ratelimit import make_limiter
from service.limits.spend import SpendMeter, make_meter
from service.settings import Settings
from service.store.base import TurnSink
from service.store.factory import make_sink
from service.telemetry import critic_info, exposition
from service.telemetry.tracing import Tracing
from service.telemetry.tracing import from_environment as tracing_from_environment
from service.upstream.client import UpstreamClient, make_pools
from service.upstream.transport import ConnectionPools

log = logging.getLogger("turngate")

GC_YOUNG_THRESHOLD = 5000  # CPython's default is 700 (see the lifespan)


def create_app(settings: Settings | None = None, *, critic: Critic | None = None,
               sink: TurnSink | None = None, tracing: Tracing | None = None,
               spend: SpendMeter | None = None) -> FastAPI:
    """The ASGI app. `critic`, `sink`, `tracing` and `spend` override what settings and the
    environment would build (tests, benchmarks)."""
    settings = settings or Settings()
    tracing = tracing or tracing_from_environment()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        pools = make_pools()
        if tracing is not None:  # TracedPool offers the pools' methods the client calls (request, aclose)
            pools = cast(ConnectionPools, tracing.pool(pools))
        upstream = UpstreamClient(pools, settings.upstream_max_reply_bytes)
        critics = CriticSlot(critic if critic is not None else await asyncio.to_thread(load_critic, settings))
        turn_sink = sink or make_sink(settings)
        await turn_sink.start()
        meter = spend or make_meter(settings.redis_url, settings.redis_max_connections)
        gate = Gate(upstream, critics, turn_sink, settings.shadow_max_backlog, tracing, meter)
        limiter = make_limiter(settings.redis_url, settings.rate_limit_per_minute, settings.redis_max_connections)
        engine = getattr(turn_sink, "engine", None)  # the control plane lives in the store's database
        control = ControlPlane(engine, settings.redis_url, settings.control_poll_s) if engine is not None else None
        hash_secret = settings.key_hash_secret
        keys = KeyCache(hash_secret.get_secret_value() if hash_secret else None, needs_load=control is not None)
        if control is not None:
            control.on_change("keys", keys.reload)
        forwarder = forward.Forwarder(upstream.pool, settings.upstream_max_reply_bytes)
        app.state.services = Services(settings, gate, critics, turn_sink, limiter, forwarder, control,
                                      spend=meter, keys=keys)
        app.state.critic_labels = critic_info.publish(critics.current)
        app.state.critic_activator = CriticActivator(critics, settings, owns_current=critic is None,
                                                     labels=app.state.critic_labels)
        if control is not None:
            app.state.route_sync = RouteSync(settings)
            control.on_change("routes", app.state.route_sync.reload)
            app.state.critic_sync = CriticSync(app.state.critic_activator)
            control.on_change("critic", app.state.critic_sync.reload)
            await control.start()  # after the reloaders above registered
        # Everything built so far (modules, app, critic session) lives as long as the process. Freezing
        # it keeps the cyclic GC from rescanning it: a full collection over it stalled the event loop
        # ~80 ms every few seconds under load (bench/overhead.py p99).
        gc.collect()
        gc.freeze()
        # CPython collects the young generation each time 700 more container objects are alive than
        # at the last pass. The turns the store holds until their batch is written (up to half a
        # second's worth) cross that several times a second, and each pass traverses them again,
        # promoting them towards the full passes that stall the loop. At 5,000 a pass comes only when
        # that many objects stay alive: rarely, in steady state (bench/overhead.py, docs/proxy.md).
        gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
        summary = config_summary.effective(settings, critics.current)
        log.info("turngate ready: %s", config_summary.one_line(summary), extra={"config": summary})
        try:
            yield
        finally:
            if control is not None:
                await control.stop()
            await gate.drain()
            await gate.judges.aclose()  # the LLM critics' HTTP client
            await turn_sink.stop()
            await app.state.critic_activator.aclose()
            await upstream.aclose()
            if limiter is not None:
                await limiter.close()
            await meter.close()  # after gate.drain: the last turns' charges are in
            exposition.process_exit()
            if tracing is not None:
                await asyncio.to_thread(tracing.shutdown)  # flushes the last spans

    # FastAPI's own OpenTelemetry layer checks the global providers on every request; it is wanted
    # only beside turngate's tracing (which then makes its HTTP server span the turn's parent).
    native_otel = None if tracing is not None else TelemetryConfig(tracing=False, metrics=False, logs=False)
    # No redirect for a trailing slash: Starlette's 307 has no body and a Location built from the
    # client's Host header; such a path is an unknown URL like any other.
    app = FastAPI(title="turngate", version=installed_version(), lifespan=lifespan, telemetry=native_otel,
                  redirect_slashes=False)
    errors.install(app)
    routers = [openai.router, forward.router, feedback_api.router, critic_api.router, admin.router, admin_keys.router,
               admin_routes.router, admin_turns.router, admin_page.router, health.router, metrics.router]
    for router in routers:
        app.include_router(router)
    openapi.install(app, [ChatCompletionRequest])
    chat = next(r for r in openai.router.routes if isinstance(r, APIRoute) and r.endpoint is openai.chat_completions)
    app.add_middleware(ChatFastPath, fastapi=app, route=chat)  # innermost: under the body limit
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_request_bytes)
    # Outermost: the ids and the request count cover every answer, the body limit's 413 included.
    paths = {getattr(route, "path", "{") for router in routers for route in router.routes}
    app.add_middleware(RequestContext, paths={p for p in paths if "{" not in p}, tracing=tracing)
    return app
