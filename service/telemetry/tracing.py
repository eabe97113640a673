"""OpenTelemetry traces (the optional `otel` extra): a span per turn, with children for each upstream
call, the critic and the store hand-off; `traceparent` sent upstream, and taken from the client.

Configured by the standard variables, as any OpenTelemetry SDK is: tracing is on when the SDK is
installed, OTEL_SDK_DISABLED is not true, and OTEL_TRACES_EXPORTER names an exporter (`otlp`,
`console`, ...; comma-separated) or an OTLP endpoint is set (OTEL_EXPORTER_OTLP_ENDPOINT,
OTEL_EXPORTER_OTLP_TRACES_ENDPOINT; the exporter is then `otlp`). OTEL_SERVICE_NAME (default
`turngate`), OTEL_RESOURCE_ATTRIBUTES, OTEL_TRACES_SAMPLER, OTEL_PROPAGATORS and the exporters'
own OTEL_EXPORTER_* variables apply as the SDK defines them. A process whose global tracer
provider is already set (e.g. under `opentelemetry-instrument`) uses that one instead.

Off, nothing of the SDK is imported and the gate skips every span (one `is None` test per step).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from service.upstream.transport import ConnectionPools, Response, Wire

log = logging.getLogger(__name__)

_TRUE = {"true", "1", "yes", "on"}


class Tracing:
    """turngate's tracer over a TracerProvider (the SDK's, or one a test builds)."""

    def __init__(self, provider: Any, owned: bool = False) -> None:
        from opentelemetry import propagate, trace

        self.provider = provider
        self.owned = owned  # built here from the environment: flushed and shut down with the app
        self.tracer = provider.get_tracer("turngate")
        self._propagate = propagate
        self._trace = trace

    @contextmanager
    def span(self, name: str, attributes: Mapping[str, Any] | None = None, client: bool = False) -> Iterator[Any]:
        kind = self._trace.SpanKind.CLIENT if client else self._trace.SpanKind.INTERNAL
        with self.tracer.start_as_current_span(name, kind=kind, attributes=_clean(attributes)) as span:
            yield span

    def failed(self, span: Any, error_type: str, message: str) -> None:
        """Marks a span failed without an exception object (a turn that answered with an error)."""
        span.set_attribute("error.type", error_type)
        span.set_status(self._trace.Status(self._trace.StatusCode.ERROR, message[:200]))

    def attach_incoming(self, headers: list[tuple[bytes, bytes]]) -> Any:
        """Makes the client's trace (its `traceparent`) the parent of what this request does; returns
        the token for `detach`."""
        from opentelemetry import context

        carrier = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in headers}
        return context.attach(self._propagate.extract(carrier))

    def detach(self, token: Any) -> None:
        from opentelemetry import context

        context.detach(token)

    def pool(self, inner: ConnectionPools) -> TracedPool:
        return TracedPool(inner, self._propagate)

    def shutdown(self) -> None:
        if self.owned:
            self.provider.shutdown()


class TracedPool:
    """The upstream connection pools, adding the current trace context (`traceparent`) to each request.

    It offers what turngate calls on the pools (service.upstream.transport.ConnectionPools):
    `request` and `aclose`."""

    def __init__(self, inner: ConnectionPools, propagate: Any) -> None:
        self.inner = inner
        self._propagate = propagate

    async def request(self, method: bytes, url: str, headers: list[tuple[bytes, bytes]], body: bytes, *,
                      timeout: float | None = None, wire: Wire | None = None) -> Response:
        carrier: dict[str, str] = {}
        self._propagate.inject(carrier)
        headers = [*headers, *((k.encode(), v.encode()) for k, v in carrier.items())]
        return await self.inner.request(method, url, headers, body, timeout=timeout, wire=wire)

    async def aclose(self) -> None:
        await self.inner.aclose()


def from_environment(environ: Mapping[str, str] | None = None) -> Tracing | None:
    """Tracing as the OTEL_* variables configure it; None when off (see the module's docstring)."""
    env = os.environ if environ is None else environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() in _TRUE:
        return None
    names = [n.strip() for n in env.get("OTEL_TRACES_EXPORTER", "").split(",") if n.strip()]
    if not names and (env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")):
        names = ["otlp"]
    names = [n for n in names if n.lower() != "none"]
    if not names:
        global_provider = _global_provider()
        return Tracing(global_provider) if global_provider is not None else None
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        log.warning("OTEL_TRACES_EXPORTER/OTEL_EXPORTER_OTLP_* are set but the OpenTelemetry SDK is not installed: "
                    "no traces (pip install 'turngate[otel]')")
        return None
    global_provider = _global_provider()
    if global_provider is not None:
        return Tracing(global_provider)
    attributes = {} if env.get("OTEL_SERVICE_NAME") else {"service.name": "turngate"}
    provider = TracerProvider(resource=Resource.create(attributes))
    for name in names:
        provider.add_span_processor(BatchSpanProcessor(_exporter(name, env)()))
    log.info("tracing on: exporters %s", ", ".join(names))
    return Tracing(provider, owned=True)


def _global_provider() -> Any:
    """The process's tracer provider when someone set one (not the API's no-op proxy)."""
    try:
        from opentelemetry import trace
    except ImportError:
        return None
    provider = trace.get_tracer_provider()
    return None if type(provider).__name__ in ("ProxyTracerProvider", "NoOpTracerProvider") else provider


def _exporter(name: str, env: Mapping[str, str]) -> Any:
    """The span exporter class an OTEL_TRACES_EXPORTER name stands for (the SDK's entry points)."""
    from importlib.metadata import entry_points

    if name == "otlp":
        protocol = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL") or \
            "http/protobuf"
        name = "otlp_proto_grpc" if protocol == "grpc" else "otlp_proto_http"
    found = entry_points(group="opentelemetry_traces_exporter", name=name)
    if not found:
        raise RuntimeError(f"OTEL_TRACES_EXPORTER: no span exporter {name!r} is installed "
                           "(the `otel` extra brings otlp over HTTP and console)")
    return next(iter(found)).load()


def _clean(attributes: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """Span attributes without the None values OpenTelemetry refuses."""
    return None if attributes is None else {k: v for k, v in attributes.items() if v is not None}
