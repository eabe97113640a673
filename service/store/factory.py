"""Which turn sink the service writes to: the database store named by settings.database_url
(embedded SQLite by default), with its spool under settings.spool_dir."""

from __future__ import annotations

from service.settings import Settings
from service.store.base import TurnSink
from service.store.sink import StoreSink


def make_sink(settings: Settings) -> TurnSink:
    return StoreSink(settings.database_url, settings.spool_dir)
