"""The database turn sink: a bounded in-memory queue, a background batched writer, a durable spool.

The request path calls `enqueue` only: a deque append (or, when the queue is full, one buffered
write to the spool file, fsync'ed by the writer within a tick). The writer task flushes every
`flush_interval_s` or as soon as `batch_max` turns are waiting, one transaction per batch. When a
write fails (database down, connection killed, too slow) the batch goes to the spool, fsync'ed,
and the writer replays the spool (oldest first, idempotently by turn id) before writing anything
newer once the database answers again. Nothing is dropped: shutdown drains the queue or spools it.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import time
from collections import deque
from pathlib import Path

from sqlalchemy.ext.asyncio import AsyncEngine

from service.gate.record import TurnRecord
from service.store import migrate
from service.store.engine import make_async_engine
from service.store.spool import Spool
from service.store.urls import is_sqlite
from service.store.writer import LinkCache, prepare, write_batch
from service.telemetry import metrics

log = logging.getLogger("turngate.store")


class StoreSink:
    def __init__(self, url: str, spool_dir: str | Path, *, max_queue: int = 20_000, batch_max: int = 500,
                 flush_interval_s: float = 0.5, drain_timeout_s: float = 10.0,
                 auto_migrate: bool | None = None, engine: AsyncEngine | None = None) -> None:
        self.url = url
        self.spool = Spool(spool_dir)
        self.max_queue, self.batch_max = max_queue, batch_max
        self.flush_interval_s, self.drain_timeout_s = flush_interval_s, drain_timeout_s
        # Embedded SQLite upgrades itself; Postgres is migrated by `turngate db upgrade` (a deploy step).
        self.auto_migrate = is_sqlite(url) if auto_migrate is None else auto_migrate
        self.engine = engine or make_async_engine(url)
        self._pg = not is_sqlite(url)
        self.queue: deque[TurnRecord] = deque()
        # Served here, not yet known to be in the database: turn id -> client key digest (feedback
        # accepts a pending turn from its own key only).
        self.pending_ids: dict[str, str | None] = {}
        self.db_ok = True
        self.last_error: str | None = None
        self.written = 0
        self.feedback_wait_s = 2.0  # how long POST /v1/feedback waits for an unknown turn to appear
        self._cache = LinkCache()
        self._critics: set = set()
        self._wake: asyncio.Event | None = None
        self._flushed: asyncio.Condition | None = None
        self._flushes = 0
        self._busy = False
        self._task: asyncio.Task | None = None
        self._stopping = False
        self._retry_at = 0.0
        self._backoff = 0.0
        self._spool_dirty = False

    # -- the request path ------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        """Always able to accept turns: the spool takes them while the database is away."""
        return True

    def health(self) -> dict:
        return {"db_ok": self.db_ok, "queue": len(self.queue), "spool_bytes": self.spool.bytes,
                "last_error": self.last_error}

    def enqueue(self, record: TurnRecord) -> None:
        try:
            self.pending_ids[record.turn_id] = record.conversation.key_id
            if len(self.queue) < self.max_queue and not self._stopping and self._task is not None:
                self.queue.append(record)
                metrics.LOG_QUEUE_DEPTH.set(len(self.queue))
                if len(self.queue) >= self.batch_max and self._wake is not None:
                    self._wake.set()
                return
            # Full (or not running): straight to the spool file; the writer fsyncs it within a tick.
            self.spool.append([record], fsync=self._task is None)
            self._spool_dirty = True
        except Exception:
            log.exception("could not enqueue turn %s", record.turn_id)

    # -- lifecycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        if self.auto_migrate:
            await asyncio.to_thread(_upgrade_locked, self.url)
        self._wake, self._flushed = asyncio.Event(), asyncio.Condition()
        self._stopping = False
        self._task = asyncio.create_task(self._run(), name="turngate-store-writer")

    async def stop(self) -> None:
        if self._task is None:
            return
        self._stopping = True
        self._wake.set()
        try:
            await asyncio.wait_for(self._task, self.drain_timeout_s)
        except (TimeoutError, Exception):  # noqa: BLE001 - whatever is left goes to the spool
            log.warning("store writer did not drain in %.0fs; spooling the rest", self.drain_timeout_s)
        self._task = None
        if self.queue:
            rest = list(self.queue)
            self.queue.clear()
            self.spool.append(rest)
        self.spool.close()
        metrics.LOG_QUEUE_DEPTH.set(0)
        await self.engine.dispose()

    async def flush(self, timeout_s: float = 5.0) -> bool:
        """Asks the writer for a flush now and waits for it; True when the queue was written."""
        if self._task is None:
            return False
        # One whole iteration that starts after this call: the next one, or the one after if busy.
        target = self._flushes + (2 if self._busy else 1)
        self._wake.set()
        async with self._flushed:
            try:
                await asyncio.wait_for(self._flushed.wait_for(lambda: self._flushes >= target), timeout_s)
            except TimeoutError:
                return False
        return self.db_ok and not self.queue

    # -- the writer ------------------------------------------------------------------------------
    async def _run(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self.flush_interval_s)
            except TimeoutError:
                pass
            self._wake.clear()
            stopping = self._stopping
            self._busy = True
            try:
                await self._flush_once()
            except Exception:
                log.exception("store writer iteration failed")
            finally:
                self._busy = False
            async with self._flushed:
                self._flushes += 1
                self._flushed.notify_all()
            if stopping:
                return

    async def _flush_once(self) -> None:
        if self._spool_dirty:
            self._spool_dirty = False
            await asyncio.to_thread(self.spool.sync)
        if self.spool.pending() and not await self._replay():
            await self._spool_queue()  # the database is still away: keep the queue on disk
            return
        # Pipelined: the next batch is hashed and encoded in a thread while this one is written.
        pending: deque[tuple[list[TurnRecord], asyncio.Future]] = deque()
        try:
            while self.queue or pending:
                while len(pending) < 2 and self.queue:
                    batch = self._pop(self.batch_max)
                    pending.append((batch, asyncio.ensure_future(asyncio.to_thread(prepare, batch, self._pg))))
                batch, prepared = pending[0]
                ok = await self._write(batch, prepared)
                pending.popleft()
                if not ok:
                    rest = batch + [r for b, _ in pending for r in b]
                    pending.clear()
                    await self._to_spool(rest)
                    await self._spool_queue()
                    return
        except BaseException:
            for b, _ in pending:  # popped but not written: never lose them (shutdown, cancellation)
                self.spool.append(b)
            raise

    def _pop(self, n: int) -> list[TurnRecord]:
        batch = [self.queue.popleft() for _ in range(min(n, len(self.queue)))]
        metrics.LOG_QUEUE_DEPTH.set(len(self.queue))
        return batch

    async def _spool_queue(self) -> None:
        while self.queue:
            await self._to_spool(self._pop(5000))

    async def _to_spool(self, batch: list[TurnRecord]) -> None:
        try:
            await asyncio.to_thread(self.spool.append, batch)
        except BaseException:
            self.spool.append(batch)  # cancelled mid-write (shutdown): finish it here, never lose it
            raise

    async def _write(self, batch: list[TurnRecord], prepared: asyncio.Future | None = None) -> bool:
        """One transaction; False (and the error counted) when the database did not take it."""
        if time.monotonic() < self._retry_at:
            return False
        try:
            prepared = await (prepared or asyncio.to_thread(prepare, batch, self._pg))
            async with self.engine.begin() as conn:
                await write_batch(conn, prepared, self._cache, self._critics)
        except Exception as e:
            metrics.DB_WRITE_ERRORS.inc()
            if "does not exist" in str(e) and "relation" in str(e):
                e = RuntimeError(f"the store's tables are missing: run `turngate db upgrade` ({e})")
            if self.db_ok:
                log.warning("database write failed, spooling turns: %s", e, exc_info=log.isEnabledFor(logging.DEBUG))
            self.db_ok, self.last_error = False, f"{type(e).__name__}: {e}"[:500]
            self._backoff = min(5.0, max(0.25, self._backoff * 2))
            self._retry_at = time.monotonic() + self._backoff
            return False
        if not self.db_ok:
            log.info("database is back")
        self.db_ok, self._backoff, self.last_error = True, 0.0, None
        self.written += len(batch)
        for r in batch:
            self.pending_ids.pop(r.turn_id, None)
        return True

    async def _replay(self) -> bool:
        """Writes every closed spool segment, oldest first. False when the database failed."""
        if time.monotonic() < self._retry_at:
            return False
        if self.spool.has_open_segment:
            await asyncio.to_thread(self.spool.rotate)
        for path in await asyncio.to_thread(self.spool.segments):
            claim = await asyncio.to_thread(self.spool.claim, path)
            if claim is None:
                continue  # being written or replayed by another process
            try:
                chunks = claim.chunks(self.batch_max)
                while (batch := await asyncio.to_thread(next, chunks, None)) is not None:
                    if not await self._write(batch):
                        claim.release()
                        return False
                await asyncio.to_thread(claim.done)
                log.info("replayed spool segment %s", path.name)
            except BaseException:
                claim.release()
                raise
        return True


def _upgrade_locked(url: str) -> None:
    """Migrations at start; on a SQLite file under a lock, since `serve --workers N` starts N
    processes that would otherwise race to create the same tables."""
    if not is_sqlite(url):
        migrate.upgrade(url)
        return
    from sqlalchemy.engine import make_url

    db = make_url(url).database
    if not db or db == ":memory:":
        migrate.upgrade(url)
        return
    path = Path(db).expanduser().resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    # flock on the database file itself: SQLite locks with fcntl(), which flock() does not touch.
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        migrate.upgrade(url)
    finally:
        os.close(fd)
