"""What /metrics serves: this process's registry, or every worker's values in multiprocess mode."""

from __future__ import annotations

import os

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest, multiprocess

from service.telemetry import multiproc


def render() -> tuple[bytes, str]:
    """The exposition text and its content type. Reads files in multiprocess mode: not for the event loop."""
    if multiproc.enabled():
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        registry = REGISTRY
    return generate_latest(registry), CONTENT_TYPE_LATEST


def process_exit() -> None:
    """Drop this worker's live gauges (queue depth, spool, critic info) from the shared sums."""
    if multiproc.enabled():
        multiprocess.mark_process_dead(os.getpid())
