"""The writer's PostgreSQL path: asyncpg on an event loop of its own, on its own thread.

The serving event loop only hands a batch over and takes the outcome back: preparing the rows
(service.store.writer.prepare, on a worker thread, pipelined with the previous batch's write) and
the transaction itself (asyncpg encoding the COPY rows; orjson the other rows) run elsewhere, so a large
batch never stalls the requests being served. The writer holds one asyncpg connection of its own,
made on its loop (asyncpg connections belong to the loop that made them); SQLAlchemy's engine, its
pool and its pre-ping cost the writer's loop about as much as the batch's own statements, so
the writer does without them and reconnects itself. The sink's engine stays on the serving loop
for the API's reads.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Coroutine
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import asyncpg

from service.gate.record import TurnRecord
from service.store.engine import COMMAND_TIMEOUT_S, CONNECT_TIMEOUT_S
from service.store.urls import async_url
from service.store.writer import LinkCache, Prepared, prepare, remember, write_pg_batch

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


# What SQLAlchemy's asyncpg dialect makes of a URL that asyncpg.connect does not take itself.
_DIALECT_ONLY = ("prepared_statement_cache_size", "prepared_statement_name_func", "async_creator_fn")


def connect_args(url: str) -> dict[str, Any]:
    """asyncpg.connect's arguments for a store URL, read as SQLAlchemy reads it for the API's engine
    (host, port, user, password, database and the URL's query, such as ssl)."""
    u = async_url(url)
    _, kwargs = u.get_dialect()().create_connect_args(u)
    return {k: v for k, v in kwargs.items() if k not in _DIALECT_ONLY}


def connection_lost(error: BaseException) -> bool:
    """The connection failed, not the statement: the driver's own errors (a connection the server
    ended while idle reads as an operation still in progress), the socket's, and the server's
    connection (08) and shutdown (57P) classes."""
    if isinstance(error, asyncpg.PostgresError):
        return str(getattr(error, "sqlstate", "")).startswith(("08", "57P"))
    return isinstance(error, (asyncpg.InterfaceError, asyncpg.InternalClientError, OSError))


class PgBatchWriter:
    """Writes batches to PostgreSQL from the writer's own loop and thread, on its own connection."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._connect_args = {**connect_args(url), "timeout": CONNECT_TIMEOUT_S, "command_timeout": COMMAND_TIMEOUT_S}
        # A lock held elsewhere fails the batch in seconds (it stays in the journal and is retried).
        self._connect_args["server_settings"] = {**self._connect_args.get("server_settings", {}),
                                                 "lock_timeout": "5s"}
        self._loop = LoopThread("turngate-store-pg")
        self._prepare: ThreadPoolExecutor | None = None
        self._conn: asyncpg.Connection | None = None  # made and used on the writer's loop only

    def start(self) -> None:
        self._loop.start()
        if self._prepare is None:
            self._prepare = ThreadPoolExecutor(1, thread_name_prefix="turngate-store-prepare")

    async def stop(self) -> None:
        """Closes the writer's connection on its loop, then ends its threads."""
        if self._loop.loop is not None:
            try:
                await self._loop.run(self._close())
            except Exception as e:  # stopping goes on: the connection ends with the loop
                log.warning("the store writer's connection did not close cleanly: %s", e)
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
        updated on the writer's loop once it committed; the caller awaits before it touches them again."""
        if prepared is None:
            prepared = self.prepare_soon(records)
        return await self._loop.run(self._write(prepared, cache, critics))

    async def _write(self, prepared: Future, cache: LinkCache, critics: set) -> Prepared:
        batch = await asyncio.wrap_future(prepared)
        reused = self._conn is not None and not self._conn.is_closed()
        try:
            links, added = await self._transaction(batch, cache, critics)
        except Exception as e:
            if not (reused and connection_lost(e)):
                raise
            # The connection died while idle and unseen (the server restarted, an idle timeout on
            # the way): once more on a new one, as a pool's pre-ping would have. Safe whether or not
            # the first try committed: a batch is idempotent by turn id.
            links, added = await self._transaction(batch, cache, critics)
        remember(cache, links, critics, added)
        return batch

    async def _transaction(self, batch: Prepared, cache: LinkCache, critics: set) -> tuple[dict[str, str], set]:
        if self._conn is None or self._conn.is_closed():
            self._conn = await asyncpg.connect(**self._connect_args)
        conn = self._conn
        try:
            async with conn.transaction():
                return await write_pg_batch(conn, batch, cache, critics)
        except BaseException as e:
            # A refusal of the data leaves a sound connection (the transaction rolled back); after
            # anything else (cancelled, timed out, broken) its state is unknown.
            if not isinstance(e, asyncpg.PostgresError) or connection_lost(e):
                conn.terminate()
                self._conn = None
            raise

    async def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            await conn.close(timeout=2.0)
