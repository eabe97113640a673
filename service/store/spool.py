"""The durable local spool: every turn is journaled here before its reply leaves the process.

Segments are append-only JSON-lines files (service.store.lines). The request path writes each turn
to the current segment with one os.write: the page cache has it, so it survives the process being
killed; a background fsync bounds what a machine crash can lose. The writer retires a segment
(deletes it) once every turn in it is in the database, and replays from disk the turns it no
longer holds in memory (database away, queue full).

A process holds an exclusive flock on each of its segments until it retires or releases them (at
stop), so several worker processes, or a restarted one, share one spool folder: a segment nobody
holds is a foreign one, left by a process that stopped or died, and is claimed (flock) and replayed
by whoever sees it first. Replay is idempotent: the turn id is the primary key.
"""

from __future__ import annotations

import builtins  # Spool.bytes (a property) shadows the type inside the class
import fcntl
import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from service.gate.record import TurnRecord
from service.store import lines
from service.telemetry import metrics

log = logging.getLogger("turngate.store.spool")

SEGMENT_MAX_BYTES = 64 * 1024 * 1024
NEW_PREFIX = "new-"  # a segment's name until it is locked (see Spool._new_segment)
QUARANTINE_FILE = "quarantine.jsonl"


class Segment:
    """One of this process's journal segments. Its counters are kept by the sink (event loop)."""

    __slots__ = ("closed", "created", "dirty", "fd", "flagged", "path", "refs", "replayed", "size")

    def __init__(self, path: Path, fd: int) -> None:
        self.path, self.fd, self.size, self.created = path, fd, 0, time.time()
        self.refs = 0  # turns in it that are only known to be safe while held in memory
        self.flagged = False  # holds turns no longer in memory: replay it from disk before retiring
        self.replayed = False
        self.closed = False  # no more appends
        self.dirty = False  # appended to since its last fsync

    @property
    def retirable(self) -> bool:
        return self.closed and self.refs <= 0 and (self.replayed or not self.flagged)


class Spool:
    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self.current: Segment | None = None
        self.held: dict[Path, Segment] = {}  # this process's segments, not retired
        self._seq = 0
        self._unsynced_since: float | None = None  # monotonic time of the first append since the last fsync
        self._new_entries = False  # a segment was created or removed since the directory's last fsync
        self._closed = True  # until open(); after release_all() no segment is opened any more
        self._foreign_bytes = sum(p.stat().st_size for p in self.dir.glob("seg-*.jsonl"))
        self.publish()

    @property
    def bytes(self) -> int:
        """The backlog: bytes of turns that only the disk holds (segments to replay). Journal
        segments whose turns are still in memory, on their way to the database, are not counted."""
        with self._lock:
            own = sum(s.size for s in self.held.values() if s.flagged and not s.replayed)
        return own + self._foreign_bytes

    def publish(self) -> None:
        metrics.SPOOL_BYTES.set(self.bytes)

    # -- the request path ------------------------------------------------------------------------
    def append(self, data: builtins.bytes, keep: bool) -> Segment:
        """Writes whole lines to the current segment (opened if none); no fsync. keep: the caller
        holds the turn in memory until it is written (a reference on the segment); otherwise the
        segment is flagged for replay from disk. Both under the lock that retirement takes."""
        with self._lock:
            seg = self.current
            if seg is None or seg.size >= SEGMENT_MAX_BYTES:
                seg = self._open_locked()
            os.write(seg.fd, data)
            if keep:
                seg.refs += 1
            else:
                seg.flagged = True
            seg.dirty = True
            seg.size += len(data)
            if self._unsynced_since is None:
                self._unsynced_since = time.monotonic()
        return seg

    def append_detached(self, data: builtins.bytes) -> None:
        """Writes lines to a segment of their own, on disk and released at once (the sink is not
        running: before start, after stop). Blocking; rare."""
        seg = self._create()
        try:
            os.write(seg.fd, data)
            os.fsync(seg.fd)
            _fsync_dir(self.dir)
        finally:
            os.close(seg.fd)  # releases the flock: the next start replays it
        self._foreign_bytes += len(data)
        self.publish()

    # -- the writer ------------------------------------------------------------------------------
    def _create(self) -> Segment:
        with self._lock:
            self._seq += 1
            seq = self._seq
        return self._new_segment(seq)

    def _new_segment(self, seq: int) -> Segment:
        """A new segment, locked before it has a name that scans for foreign segments look at: a
        file created and locked in two steps could be claimed (taken for a dead process's, replayed
        empty and deleted) between them, and the turns journaled into it then lie in no file."""
        name = f"{time.time_ns():020d}-{os.getpid()}-{seq:06d}.jsonl"
        unnamed = self.dir / (NEW_PREFIX + name)
        fd = os.open(unnamed, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            path = self.dir / ("seg-" + name)
            os.rename(unnamed, path)
        except BaseException:
            os.close(fd)
            unnamed.unlink(missing_ok=True)
            raise
        self._new_entries = True
        return Segment(path, fd)

    def _install_locked(self, seg: Segment) -> Segment | None:
        old = self.current
        if old is not None:
            old.closed = True
        self.current = seg
        self.held[seg.path] = seg
        return old

    def _open_locked(self) -> Segment:
        """Only when no segment is open (the writer opens them, off the request path)."""
        self._seq += 1
        seg = self._new_segment(self._seq)
        self._install_locked(seg)
        return seg

    def open(self) -> None:
        """Start: the first segment, opened off the request path."""
        with self._lock:
            self._closed = False
        self.rotate()

    def rotate(self, reopen: bool = True) -> Segment | None:
        """Closes the current segment for appends (a new one, created outside the lock that appends
        take, takes them); returns the closed one."""
        new = self._create() if reopen else None
        with self._lock:
            if new is not None and self._closed:  # released meanwhile (a sync racing stop)
                new.path.unlink(missing_ok=True)
                os.close(new.fd)
                return None
            if new is None:
                old = self.current
                if old is not None:
                    old.closed = True
                self.current = None
                return old
            return self._install_locked(new)

    def sync(self) -> float | None:
        """Makes what was journaled since the last call durable: rotates the current segment (so
        that no append ever waits on an fsync of its file), fsyncs the closed segments written
        since, and the folder when segments came or went. Returns how long the oldest line it
        covered had been in the page cache only, in seconds: what a machine crash at that moment
        would have lost (None: nothing new)."""
        with self._lock:
            busy = self.current is not None and self.current.dirty
        if busy:
            self.rotate()
        with self._lock:
            since, self._unsynced_since = self._unsynced_since, None
            fds = []
            for seg in self.held.values():
                if seg.dirty and seg.closed:
                    seg.dirty = False
                    fds.append(os.dup(seg.fd))
            new_entries, self._new_entries = self._new_entries, False
        try:
            for fd in fds:
                os.fsync(fd)
            if new_entries:
                _fsync_dir(self.dir)
        finally:
            for fd in fds:
                os.close(fd)
        if since is None:
            return None
        lag = time.monotonic() - since
        metrics.SPOOL_SYNC_LAG.observe(lag)
        return lag

    def retirable(self) -> list[Segment]:
        with self._lock:
            return [s for s in self.held.values() if s.retirable]

    def backlog(self) -> list[Segment]:
        """This process's segments to replay from disk."""
        with self._lock:
            return [s for s in self.held.values() if s.closed and s.flagged and not s.replayed]

    def retire(self, seg: Segment) -> None:
        """Every turn in it is in the database (or quarantined): delete it."""
        seg.path.unlink(missing_ok=True)
        self._close(seg)
        self._new_entries = True

    def release_all(self) -> None:
        """Stop: segments not retired stay on disk, fsynced and unlocked, for the next start."""
        with self._lock:
            self._closed = True
            segs = list(self.held.values())
            self.current = None
        for seg in segs:
            seg.closed = True
            self._close(seg, fsync=True)
            self._foreign_bytes += seg.size
        if segs:
            _fsync_dir(self.dir)
        self.publish()

    def _close(self, seg: Segment, fsync: bool = False) -> None:
        with self._lock:
            if self.held.pop(seg.path, None) is None:
                return
        if fsync:
            os.fsync(seg.fd)
        os.close(seg.fd)  # releases the flock

    def read(self, seg: Segment) -> Reader:
        """This process's own (flagged, closed) segment, for replay."""
        fd = os.open(seg.path, os.O_RDONLY)
        return Reader(self, seg.path, fd, seg)

    # -- foreign segments ------------------------------------------------------------------------
    def claim_foreign(self) -> list[Reader]:
        """Claims every segment no live process holds (left by one that stopped or died), oldest
        first. Another worker's journal is locked by it and skipped."""
        self._settle_unnamed()
        with self._lock:
            mine = set(self.held)
        claims = [c for p in sorted(self.dir.glob("seg-*.jsonl")) if p not in mine and (c := self.claim(p))]
        self._foreign_bytes = sum(c.size for c in claims)
        return claims

    def _settle_unnamed(self) -> None:
        """Segments whose process stopped before naming them, as their `seg-` names, to be claimed: a
        machine crash may keep a segment's lines (its fsync) and not its rename (the folder's, next);
        an empty one is deleted. Only those a minute old: a live process names its own at once."""
        for p in self.dir.glob(NEW_PREFIX + "*.jsonl"):
            try:
                stale = time.time() - p.stat().st_mtime > 60
            except FileNotFoundError:
                continue
            if not stale or (c := self.claim(p)) is None:
                continue
            if c.size:
                os.rename(p, self.dir / ("seg-" + p.name.removeprefix(NEW_PREFIX)))
                c.release()
            else:
                c.done()

    def claim(self, path: Path) -> Reader | None:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None  # held by a live process: its own writer will retire or replay it
        if not path.exists():  # replayed and removed by another process meanwhile
            os.close(fd)
            return None
        return Reader(self, path, fd, None)

    def _removed(self, nbytes: int) -> None:
        self._foreign_bytes = max(0, self._foreign_bytes - nbytes)
        self.publish()


class Reader:
    """A closed segment being replayed: its lines, raw, in batches."""

    def __init__(self, spool: Spool, path: Path, fd: int, segment: Segment | None) -> None:
        self.spool, self.path, self.fd = spool, path, fd
        self.segment = segment  # this process's own segment; None: a claimed foreign one
        self.size = os.fstat(fd).st_size
        self._file = os.fdopen(os.dup(fd), "rb")

    def chunks(self, n: int) -> Iterator[list[tuple[int, bytes]]]:
        """(line number, line) batches of n lines."""
        batch: list[tuple[int, bytes]] = []
        for lineno, line in enumerate(self._file, 1):
            if line.strip():
                batch.append((lineno, line))
            if len(batch) >= n:
                yield batch
                batch = []
        if batch:
            yield batch

    def done(self) -> None:
        """Everything in it is in the database: delete it (a foreign one; own ones are retired)."""
        if self.segment is None:
            self.path.unlink(missing_ok=True)
            _fsync_dir(self.path.parent)
            self.spool._removed(self.size)
        self.release()

    def release(self) -> None:
        if self.fd >= 0:
            self._file.close()
            os.close(self.fd)
            self.fd = -1


class Quarantine:
    """Records (or spool lines) the database refused, beside the spool: one line each, with the error.

    Turn ids already here are skipped by replays, so a poison record is tried and set aside once.
    """

    def __init__(self, directory: str | Path) -> None:
        self.path = Path(directory) / QUARANTINE_FILE
        self._lock = threading.Lock()
        self.ids: set[str] = set()
        self.count = 0
        self.last_error: str | None = None
        if self.path.exists():
            with open(self.path, "rb") as f:
                for line in f:
                    self.count += 1
                    try:
                        tid = json.loads(line).get("turn", {}).get("turn_id")
                    except (ValueError, AttributeError):
                        continue
                    if isinstance(tid, str):
                        self.ids.add(tid)

    def add(self, error: str, *, record: TurnRecord | None = None, raw: bytes | None = None,
            source: str | None = None) -> None:
        """Appends and fsyncs one entry (blocking: the writer calls it in a thread)."""
        data = lines.encode_quarantined(error, record=record, raw=raw, source=source)
        with self._lock:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            self.count += 1
            self.last_error = error
            if record is not None:
                self.ids.add(record.turn_id)
        metrics.STORE_QUARANTINED.inc()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
