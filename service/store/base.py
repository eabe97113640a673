"""The store interface the gate writes to, and the in-memory implementation used in tests.

The request path calls `enqueue` (and `hold`) only: they must return at once and never raise. Durability
(batching, spooling, replay) is the implementation's job.
"""

from __future__ import annotations

from typing import Protocol

from service.gate.record import TurnRecord


class TurnSink(Protocol):
    def enqueue(self, record: TurnRecord) -> None: ...

    def hold(self, record: TurnRecord) -> None:
        """Shadow mode: the reply is leaving before the record is complete (scored in the
        background, then enqueued); a durable sink keeps this version until then."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class MemorySink:
    """Keeps records in a list. For tests and benchmarks; not durable."""

    def __init__(self) -> None:
        self.records: list[TurnRecord] = []

    def enqueue(self, record: TurnRecord) -> None:
        self.records.append(record)

    def hold(self, record: TurnRecord) -> None:
        return None

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None
