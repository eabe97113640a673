"""The writer's PostgreSQL path: asyncpg on an event loop of its own, on its own thread.

The serving event loop only hands a batch over and takes the outcome back: preparing the rows
(service.store.writer.prepare, on a worker thread, pipelined with the previous batch's write) and
the transaction itself (SQLAlchemy's begin/commit, asyncpg encoding the COPY rows and unnest
arrays) run elsewhere, so a large batch never stalls the requests being served. The writer's
engine is its own (asyncpg connections belong to the loop that made them); the sink's engine
stays on the serving loop for the API's reads.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Coroutine
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

from sqlalchemy.ext.asyncio import AsyncEngine

from service.gate.record import TurnRecord
from service.store.engine import make_async_engine
from service.store.writer import LinkCache, Prepared, prepare, write_batch

log = logging.getLogger("turngate.store")
T = TypeVar("T")


class LoopThread:
    """An event loop running on a thread of its own until stopped."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is not None:
            return
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._serve, args=(self.loop,), name=self.name, daemon=True)
        self._thread.start()

    def _serve(self, loop: asyncio.AbstractEventLoop) -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
        finally:
            loop.close()

    async def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Runs the coroutine on this thread's loop; cancelling the caller cancels it there too."""
        if self.loop is None:
            coro.close()
            raise RuntimeError(f"{self.name} is not running")
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self.loop))

    async def stop(self, timeout_s: float = 5.0) -> None:
        loop, thread, self.loop, self._thread = self.loop, self._thread, None, None
        if loop is None or thread is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        await asyncio.to_thread(thread.join, timeout_s)


class PgBatchWriter:
    """Writes batches to PostgreSQL from the writer's own loop and thread."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._loop = LoopThread("turngate-store-pg")
        self._prepare: ThreadPoolExecutor | None = None
        self._engine: AsyncEngine | None = None  # made and used on the writer's loop only

    def start(self) -> None:
        self._loop.start()
        if self._prepare is None:
            self._prepare = ThreadPoolExecutor(1, thread_name_prefix="turngate-store-prepare")

    async def stop(self) -> None:
        """Closes the writer's connections on its loop, then ends its threads."""
        if self._loop.loop is not None:
            try:
                await self._loop.run(self._dispose())
            except Exception as e:  # stopping goes on: the connections end with the loop
                log.warning("the store writer's connections did not close cleanly: %s", e)
        await self._loop.stop()
        if self._prepare is not None:
            self._prepare.shutdown(wait=False)
            self._prepare = None

    def prepare_soon(self, records: list[TurnRecord]) -> Future:
        """Starts preparing a batch now (on the prepare thread); write() takes the result."""
        if self._prepare is None:
            raise RuntimeError("the PostgreSQL writer is not started")
        return self._prepare.submit(prepare, records, True)

    async def write(self, records: list[TurnRecord], prepared: Future | None, cache: LinkCache,
                    critics: set) -> Prepared:
        """One transaction for the batch; returns what was written. `cache` and `critics` are
        updated on the writer's loop; the caller awaits before it touches them again."""
        if prepared is None:
            prepared = self.prepare_soon(records)
        return await self._loop.run(self._write(prepared, cache, critics))

    async def _write(self, prepared: Future, cache: LinkCache, critics: set) -> Prepared:
        if self._engine is None:
            self._engine = make_async_engine(self.url, pool_size=1)
        batch = await asyncio.wrap_future(prepared)
        async with self._engine.begin() as conn:
            await write_batch(conn, batch, cache, critics)
        return batch

    async def _dispose(self) -> None:
        engine, self._engine = self._engine, None
        if engine is not None:
            await engine.dispose()
