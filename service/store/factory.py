"""Which turn sink the service writes to."""

from __future__ import annotations

from service.settings import Settings
from service.store.base import MemorySink, TurnSink


def make_sink(settings: Settings) -> TurnSink:
    return MemorySink()
