"""The database turn sink: a journal on local disk, a bounded in-memory queue, a batched writer.

Request path (`enqueue`): the record is serialized and written to the current spool segment with
one os.write before the call returns, so a turn answered 200 survives the process being killed
(the page cache has it); then it joins the queue. Nothing there waits on the database or the disk.
Every `sync_interval_s` a background task closes the segment being written and fsyncs it, which
bounds what a machine crash can lose.

Writer: every `flush_interval_s`, or as soon as `batch_max` turns wait, one transaction per batch.
The serving loop only coordinates; the work is on threads: SQLite batches are prepared and written
by sqlite3 on the writer's own thread (service.store.sqlite_batch), PostgreSQL batches are prepared
on a thread and written by asyncpg on a loop and thread of their own (service.store.pg_batch).
- A batch refused for a reason that lies in its records (service.store.blame) is split until the
  refusing record is found; that record goes to the quarantine file beside the spool with the
  error, and every other turn lands.
- A database that is away (refused or killed connections, timeouts, locks) is never blamed on a
  record: the queue is dropped from memory (the journal holds it), retries back off, and the
  journal's segments are replayed, oldest first, idempotently by turn id and with the same
  isolation, before anything newer is written.
- A journal segment is deleted once every turn in it is in the database (or quarantined).
Shutdown writes what it can in `drain_timeout_s`; what is left stays in the journal for the next
start (or another worker) to replay.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from concurrent.futures import Future
from pathlib import Path
from typing import NamedTuple

from sqlalchemy.ext.asyncio import AsyncEngine

from service.gate.record import TurnRecord
from service.store import lines, migrate
from service.store.blame import RECORD, blame
from service.store.engine import make_async_engine
from service.store.pg_batch import PgBatchWriter
from service.store.spool import Quarantine, Reader, Segment, Spool
from service.store.sqlite_batch import SqliteBatchWriter
from service.store.urls import is_sqlite, sqlite_path
from service.store.writer import LinkCache, prepare, write_batch
from service.telemetry import metrics

log = logging.getLogger("turngate.store")

class _Entry(NamedTuple):
    record: TurnRecord
    segment: Segment | None  # None: the journal could not take it (disk full); memory only
    at: float  # wall time it was enqueued


class _Backoff(Exception):
    """The writer is waiting before it tries the database again."""


class StoreSink:
    def __init__(self, url: str, spool_dir: str | Path, *, max_queue: int = 20_000, batch_max: int = 500,
                 flush_interval_s: float = 0.5, sync_interval_s: float = 0.5, drain_timeout_s: float = 10.0,
                 auto_migrate: bool | None = None, engine: AsyncEngine | None = None) -> None:
        self.url = url
        self.spool = Spool(spool_dir)
        self.quarantine = Quarantine(spool_dir)
        self.max_queue, self.batch_max = max_queue, batch_max
        self.flush_interval_s, self.sync_interval_s = flush_interval_s, sync_interval_s
        self.drain_timeout_s = drain_timeout_s
        # Embedded SQLite upgrades itself; Postgres is migrated by `turngate db upgrade` (a deploy step).
        self.auto_migrate = is_sqlite(url) if auto_migrate is None else auto_migrate
        self.engine = engine or make_async_engine(url)
        self._pg = not is_sqlite(url)
        # Batches are written off the serving loop: SQLite (a file) by sqlite3 on a thread of its
        # own, PostgreSQL by asyncpg on a loop of its own; only an in-memory SQLite (which only the
        # engine's connection sees) is written through `engine`, which the API also reads through.
        path = None if self._pg else sqlite_path(url)
        self._lite = SqliteBatchWriter(path) if path else None
        self._pgw = PgBatchWriter(url) if self._pg else None
        self.queue: deque[_Entry] = deque()
        # Served here, not yet known to be in the database: turn id -> client key digest (feedback
        # accepts a pending turn from its own key only).
        self.pending_ids: dict[str, str | None] = {}
        self.db_ok = True
        self.last_error: str | None = None
        self.written = 0
        self.feedback_wait_s = 2.0  # how long POST /v1/feedback waits for an unknown turn to appear
        self._cache = LinkCache()
        self._critics: set = set()
        self._holds: dict[str, Segment] = {}  # shadow turns answered, their final record still to come
        self._superseded: set[str] = set()  # turns whose final record followed a provisional one
        self._backlog_since: float | None = None  # wall time of the oldest turn only the disk holds
        self._wake: asyncio.Event | None = None
        self._flushed: asyncio.Condition | None = None
        self._flushes = 0
        self._busy = False
        self._task: asyncio.Task | None = None
        self._syncer: asyncio.Task | None = None
        self._stopping = False
        self._retry_at = 0.0
        self._backoff = 0.0

    # -- the request path ------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        """Always able to accept turns: the journal takes them while the database is away."""
        return True

    def health(self) -> dict:
        """What /readyz shows. `behind_s`: age of the oldest turn not yet in the database (grows
        while the database is away, or if the writer ever stopped making progress)."""
        now = time.time()
        ages = [now - self.queue[0].at] if self.queue else []
        if self._backlog_since is not None:
            ages.append(now - self._backlog_since)
        return {"db_ok": self.db_ok, "queue": len(self.queue), "spool_bytes": self.spool.bytes,
                "behind_s": round(max(ages, default=0.0), 3), "last_error": self.last_error,
                "quarantined": self.quarantine.count, "quarantine_last_error": self.quarantine.last_error}

    def enqueue(self, record: TurnRecord) -> None:
        """Journals the turn (one os.write), then queues it. Never raises, never waits."""
        try:
            data = lines.encode_turn(record)
        except Exception as e:
            self._set_aside(record, e)
            return
        try:
            self.pending_ids[record.turn_id] = record.conversation.key_id
            if self._task is None:  # not started, or stopped: straight to disk, for the next start
                self.spool.append_detached(data)
                return
            keep = len(self.queue) < self.max_queue and not self._stopping
            try:
                seg: Segment | None = self.spool.append(data, keep=keep)
            except OSError as e:
                log.error("the spool could not journal turn %s (%s): it is held in memory only",
                          record.turn_id, e)
                seg, keep = None, True
            held = self._holds.pop(record.turn_id, None)
            if held is not None:  # its provisional line is superseded by the one just written
                self._superseded.add(record.turn_id)
                held.refs -= 1
            if keep:
                self.queue.append(_Entry(record, seg, time.time()))
                depth = len(self.queue)
                # The depth gauge every 64 turns here (and exactly at each writer wake-up and batch): an
                # update per turn cost a fifth of this call (a lock; a file in multiprocess mode).
                if not depth & 63:
                    metrics.LOG_QUEUE_DEPTH.set(depth)
                if depth >= self.batch_max and self._wake is not None:
                    self._wake.set()
        except Exception:
            log.exception("could not enqueue turn %s", record.turn_id)

    def hold(self, record: TurnRecord) -> None:
        """Shadow mode: journals a turn whose reply is leaving now but whose record is completed
        (scored) later and then enqueued. If the process dies meanwhile, this version is replayed."""
        if self._task is None or self._stopping:
            return
        try:
            seg = self.spool.append(lines.encode_turn(record, provisional=True), keep=True)
            self._holds[record.turn_id] = seg
            self.pending_ids[record.turn_id] = record.conversation.key_id
        except Exception:
            log.exception("could not journal shadow turn %s", record.turn_id)

    def _set_aside(self, record: TurnRecord, error: BaseException) -> None:
        log.error("turn %s cannot be serialized, quarantined: %s", record.turn_id, error)
        msg = f"unserializable record: {type(error).__name__}: {error}"[:2000]
        try:
            asyncio.get_running_loop().run_in_executor(None, lambda: self.quarantine.add(msg, record=record))
        except RuntimeError:
            self.quarantine.add(msg, record=record)

    # -- lifecycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        if self.auto_migrate:
            await asyncio.to_thread(migrate.upgrade_locked, self.url)
        self._wake, self._flushed = asyncio.Event(), asyncio.Condition()
        self._stopping = False
        await asyncio.to_thread(self.spool.open)
        if self._lite is not None:
            self._lite.start()
        if self._pgw is not None:
            self._pgw.start()
        self._task = asyncio.create_task(self._run(), name="turngate-store-writer")
        self._syncer = asyncio.create_task(self._sync_loop(), name="turngate-spool-sync")

    async def stop(self) -> None:
        if self._task is None or self._wake is None:
            return
        self._stopping = True
        self._wake.set()
        try:
            await asyncio.wait_for(self._task, self.drain_timeout_s)
        except (TimeoutError, Exception):
            log.warning("store writer did not drain in %.0fs; the rest stays in the spool", self.drain_timeout_s)
        self._task = None
        if self._syncer is not None:
            self._syncer.cancel()
            await asyncio.gather(self._syncer, return_exceptions=True)
        await asyncio.to_thread(self._close_journal)
        self.queue.clear()
        metrics.LOG_QUEUE_DEPTH.set(0)
        if self._lite is not None:
            await self._lite.stop()
        if self._pgw is not None:
            await self._pgw.stop()
        await self.engine.dispose()

    def _close_journal(self) -> None:
        self.spool.rotate(reopen=False)
        self._retire()
        self.spool.release_all()  # what is not retired is replayed by the next start

    async def flush(self, timeout_s: float = 5.0) -> bool:
        """Asks the writer for a flush now and waits for it; True when the queue was written."""
        if self._task is None or self._wake is None or self._flushed is None:
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

    async def _sync_loop(self) -> None:
        while True:
            await asyncio.sleep(self.sync_interval_s)
            try:
                await asyncio.to_thread(self.spool.sync)
            except OSError as e:
                log.warning("spool fsync failed: %s", e)

    # -- the writer ------------------------------------------------------------------------------
    async def _run(self) -> None:
        wake, flushed = self._wake, self._flushed
        assert wake is not None and flushed is not None  # made by start(), which runs this
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), self.flush_interval_s)
            wake.clear()
            metrics.LOG_QUEUE_DEPTH.set(len(self.queue))
            stopping = self._stopping
            self._busy = True
            try:
                await self._flush_once()
            except Exception:
                log.exception("store writer iteration failed")
            finally:
                self._busy = False
            async with flushed:
                self._flushes += 1
                flushed.notify_all()
            if stopping:
                return

    async def _flush_once(self) -> None:
        if not await self._replay() or not await self._write_queue():
            self._drop_queue()  # the database is away: the journal holds the queue
        await asyncio.to_thread(self._housekeep)

    def _pop(self, n: int) -> list[_Entry]:
        batch: list[_Entry] = []
        while self.queue and len(batch) < n:
            e = self.queue.popleft()
            if e.segment is not None and e.segment.flagged:
                e.segment.refs -= 1  # its segment is replayed from disk, this turn with it
                continue
            batch.append(e)
        metrics.LOG_QUEUE_DEPTH.set(len(self.queue))
        return batch

    async def _write_queue(self) -> bool:
        # Pipelined: the next batch is hashed, fitted and encoded in a thread while this one is written
        # (SQLite: its writer thread prepares each batch right before writing it, in the same call).
        pending: deque[tuple[list[_Entry], Future | asyncio.Future | None]] = deque()
        while self.queue or pending:
            while len(pending) < 2 and self.queue:
                batch = self._pop(self.batch_max)
                if batch:
                    pending.append((batch, self._prepare_soon([e.record for e in batch])))
            if not pending:
                break
            batch, prepared = pending[0]
            ok = await self._write_isolated([e.record for e in batch], prepared)
            pending.popleft()
            if not ok:
                for b, fut in reversed(pending):  # back in front of the queue, in order
                    if fut is not None:
                        fut.add_done_callback(_ignore)
                    self.queue.extendleft(reversed(b))
                self.queue.extendleft(reversed(batch))
                return False
            for e in batch:
                if e.segment is not None:
                    e.segment.refs -= 1
        return True

    def _prepare_soon(self, records: list[TurnRecord]) -> Future | asyncio.Future | None:
        if self._lite is not None:
            return None
        if self._pgw is not None:
            return self._pgw.prepare_soon(records)
        return asyncio.ensure_future(asyncio.to_thread(prepare, records, self._pg))

    def _drop_queue(self) -> None:
        """The database is away: let go of the queue; the journal segments holding it get replayed."""
        kept: deque[_Entry] = deque()
        for e in self.queue:
            if e.segment is None:
                kept.append(e)  # not on disk: stays in memory
                continue
            e.segment.flagged = True  # before refs drops, so that it is never retired unreplayed
            e.segment.refs -= 1
            self._note_backlog(e.at)
        self.queue = kept
        metrics.LOG_QUEUE_DEPTH.set(len(self.queue))

    def _note_backlog(self, at: float) -> None:
        if self._backlog_since is None or at < self._backlog_since:
            self._backlog_since = at

    def _housekeep(self) -> None:
        """(thread) Deletes the journal segments whose turns are all written (the sync task rotates
        them)."""
        self._retire()
        self.spool.publish()

    def _retire(self) -> None:
        for seg in self.spool.retirable():
            self.spool.retire(seg)

    # -- writing with isolation ------------------------------------------------------------------
    async def _write_isolated(self, records: list[TurnRecord],
                              prepared: Future | asyncio.Future | None = None) -> bool:
        """Writes the records; a record the database refuses is quarantined and the rest written.
        False when the database is away (nothing is quarantined then)."""
        err = await self._attempt(records, prepared)
        if err is None:
            return True
        if blame(err) != RECORD:
            self._outage(err)
            return False
        return await self._split(records)

    async def _split(self, records: list[TurnRecord]) -> bool:
        if len(records) == 1:
            err = await self._attempt(records)  # once more: a refusal that goes away was not the record's
            if err is None:
                return True
            if blame(err) != RECORD:
                self._outage(err)
                return False
            await self._quarantine(records[0], err)
            return True
        mid = len(records) // 2
        for half in (records[:mid], records[mid:]):  # in order: a turn's predecessor first
            err = await self._attempt(half)
            if err is None:
                continue
            if blame(err) != RECORD:
                self._outage(err)
                return False
            if not await self._split(half):
                return False
        return True

    async def _attempt(self, records: list[TurnRecord], prepared: Future | asyncio.Future | None = None
                       ) -> BaseException | None:
        """One transaction; the error, or None when it committed."""
        if time.monotonic() < self._retry_at:
            if prepared is not None:
                prepared.add_done_callback(_ignore)
            return _Backoff("waiting before the next try")
        critics = set(self._critics)
        try:
            if self._lite is not None:
                batch = await self._lite.write(records, self._cache, critics)
            elif self._pgw is not None:
                assert not isinstance(prepared, asyncio.Future)
                batch = await self._pgw.write(records, prepared, self._cache, critics)
            else:
                assert not isinstance(prepared, Future)
                batch = await (prepared or asyncio.to_thread(prepare, records, self._pg))
                async with self.engine.begin() as conn:
                    await write_batch(conn, batch, self._cache, critics)
        except Exception as e:
            metrics.DB_WRITE_ERRORS.inc()
            self._cache.clear()  # links it put may name conversations that were rolled back
            return e
        self._critics = critics
        if not self.db_ok:
            log.info("database is back")
        self.db_ok, self._backoff, self.last_error = True, 0.0, None
        self.written += len(batch.records)
        for r in batch.records:
            self.pending_ids.pop(r.turn_id, None)
            self._superseded.discard(r.turn_id)
        return None

    def _outage(self, e: BaseException) -> None:
        if isinstance(e, _Backoff):
            return
        cause = e
        if "does not exist" in str(e) and "relation" in str(e):
            e = RuntimeError(f"the store's tables are missing: run `turngate db upgrade` ({e})")
        if self.db_ok:
            # The error itself, not exc_info=True: this runs after the except block that caught it.
            log.warning("database write failed, turns stay in the spool: %s", e,
                        exc_info=cause if log.isEnabledFor(logging.DEBUG) else None)
        self.db_ok, self.last_error = False, f"{type(e).__name__}: {e}"[:500]
        self._backoff = min(5.0, max(0.25, self._backoff * 2))
        self._retry_at = time.monotonic() + self._backoff

    async def _quarantine(self, record: TurnRecord, e: BaseException) -> None:
        error = f"{type(e).__name__}: {e}"[:2000]
        log.warning("the database refused turn %s; quarantined in %s: %s", record.turn_id,
                    self.quarantine.path, error)
        await asyncio.to_thread(self.quarantine.add, error, record=record)
        self.pending_ids.pop(record.turn_id, None)

    # -- replay ----------------------------------------------------------------------------------
    async def _replay(self) -> bool:
        """Writes every segment only the disk holds (this process's flagged ones, and foreign ones:
        left by a process that stopped or died), oldest first. False when the database is away."""
        cur = self.spool.current
        if cur is not None and cur.flagged:
            await asyncio.to_thread(self.spool.rotate)
        readers = [self.spool.read(s) for s in self.spool.backlog()]
        readers += await asyncio.to_thread(self.spool.claim_foreign)
        if not readers:
            self._backlog_since = None
            return True
        readers.sort(key=lambda r: r.path.name)
        self._note_backlog(min(_created(r.path) for r in readers))
        try:
            while readers:
                reader = readers[0]
                if time.monotonic() < self._retry_at or not await self._replay_segment(reader):
                    return False
                readers.pop(0)
                seg = reader.segment
                if seg is not None:
                    seg.replayed = True
                    reader.release()
                else:
                    await asyncio.to_thread(reader.done)
                log.info("replayed spool segment %s", reader.path.name)
        finally:
            for reader in readers:  # not replayed (database away, or cancelled): let go of them
                reader.release()
            self.spool.publish()
        self._backlog_since = None
        return True

    async def _replay_segment(self, reader: Reader) -> bool:
        chunks = reader.chunks(self.batch_max)
        while (chunk := await asyncio.to_thread(self._decode, reader, chunks)) is not None:
            if chunk and not await self._write_isolated(chunk):
                return False
        return True

    def _decode(self, reader: Reader, chunks) -> list[TurnRecord] | None:
        """(thread) The next batch of records; unreadable lines go to the quarantine as they are."""
        raw = next(chunks, None)
        if raw is None:
            return None
        records = []
        for lineno, line in raw:
            try:
                record, provisional = lines.decode_turn(line)
            except Exception as e:
                log.warning("spool %s line %d unreadable, quarantined: %s", reader.path.name, lineno, e)
                self.quarantine.add(f"unreadable spool line: {type(e).__name__}: {e}"[:2000], raw=line,
                                    source=f"{reader.path.name}:{lineno}")
                continue
            tid = record.turn_id
            if tid in self.quarantine.ids:
                continue  # refused before: tried once, set aside once
            if provisional and (tid in self._holds or tid in self._superseded):
                continue  # its final record is on its way (or written): that one wins
            records.append(record)
        return records


def _ignore(fut: Future | asyncio.Future) -> None:
    if not fut.cancelled():
        fut.exception()  # retrieved: a batch whose write was abandoned needs no report


def _created(path: Path) -> float:
    """A segment's creation time, from its name (seg-<time_ns>-...); its mtime otherwise."""
    try:
        return int(path.name.split("-")[1]) / 1e9
    except (IndexError, ValueError):
        try:
            return path.stat().st_mtime
        except OSError:
            return time.time()

