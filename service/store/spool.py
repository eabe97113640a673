"""The durable local spool: append-only JSON-lines segment files of TurnRecord.to_dict().

Turns go here when the database is down or slow, or when the in-memory queue is full; the sink
replays closed segments when the database is back. The segment being written is held with an
exclusive flock, and a replayer claims a closed segment the same way, so several worker processes
(or a restarted one) can share one spool folder without replaying a segment twice at once.
A torn last line (a crash mid-append) is skipped on replay.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from service.gate.record import TurnRecord
from service.telemetry import metrics

log = logging.getLogger("turngate.store.spool")

SEGMENT_MAX_BYTES = 64 * 1024 * 1024


class Spool:
    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._path: Path | None = None
        self._size = 0  # bytes in the open segment
        self._seq = 0
        self.bytes = sum(p.stat().st_size for p in self.dir.glob("seg-*.jsonl"))
        metrics.SPOOL_BYTES.set(self.bytes)

    # -- writing ---------------------------------------------------------------------------------
    def append(self, records: list[TurnRecord], fsync: bool = True) -> int:
        """Appends records; with fsync, returns only once they are on disk. Thread-safe."""
        data = b"".join(json.dumps(r.to_dict(), ensure_ascii=False, separators=(",", ":")).encode() + b"\n"
                        for r in records)
        with self._lock:
            if self._fd is None or self._size >= SEGMENT_MAX_BYTES:
                self._open_locked()
            os.write(self._fd, data)
            self._size += len(data)
            self.bytes += len(data)
            dup = os.dup(self._fd) if fsync else None
        metrics.SPOOL_BYTES.set(self.bytes)
        if dup is not None:  # fsync outside the lock: appenders on the event loop never wait on the disk
            try:
                os.fsync(dup)
            finally:
                os.close(dup)
        return len(data)

    def sync(self) -> None:
        with self._lock:
            dup = os.dup(self._fd) if self._fd is not None else None
        if dup is not None:
            try:
                os.fsync(dup)
            finally:
                os.close(dup)

    def _open_locked(self) -> None:
        self._close_locked()
        self._seq += 1
        path = self.dir / f"seg-{time.time_ns():020d}-{os.getpid()}-{self._seq:06d}.jsonl"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        self._fd, self._path, self._size = fd, path, 0
        _fsync_dir(self.dir)

    def _close_locked(self) -> None:
        if self._fd is not None:
            os.fsync(self._fd)
            os.close(self._fd)  # releases the flock: the segment is now claimable
            self._fd, self._path, self._size = None, None, 0

    def rotate(self) -> None:
        """Closes the open segment so that it can be replayed; new appends start another."""
        with self._lock:
            self._close_locked()

    def close(self) -> None:
        self.rotate()

    @property
    def has_open_segment(self) -> bool:
        return self._fd is not None

    # -- replaying -------------------------------------------------------------------------------
    def segments(self) -> list[Path]:
        with self._lock:
            current = self._path
        return sorted(p for p in self.dir.glob("seg-*.jsonl") if p != current)

    def pending(self) -> bool:
        return any(self.dir.glob("seg-*.jsonl"))

    def claim(self, path: Path) -> Claim | None:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        if not path.exists():  # replayed and removed by another process meanwhile
            os.close(fd)
            return None
        return Claim(self, path, fd)

    def _removed(self, nbytes: int) -> None:
        self.bytes = max(0, self.bytes - nbytes)
        metrics.SPOOL_BYTES.set(self.bytes)


class Claim:
    """A closed segment this process is replaying."""

    def __init__(self, spool: Spool, path: Path, fd: int) -> None:
        self.spool, self.path, self.fd = spool, path, fd
        self.size = os.fstat(fd).st_size
        self._file = os.fdopen(os.dup(fd), "rb")

    def chunks(self, n: int) -> Iterator[list[TurnRecord]]:
        batch: list[TurnRecord] = []
        for lineno, line in enumerate(self._file, 1):
            try:
                batch.append(TurnRecord.from_dict(json.loads(line)))
            except (ValueError, TypeError) as e:
                log.warning("spool %s line %d unreadable, skipped: %s", self.path.name, lineno, e)
                continue
            if len(batch) >= n:
                yield batch
                batch = []
        if batch:
            yield batch

    def done(self) -> None:
        """Everything in it is in the database: delete it."""
        self.path.unlink(missing_ok=True)
        _fsync_dir(self.path.parent)
        self.spool._removed(self.size)
        self.release()

    def release(self) -> None:
        self._file.close()
        os.close(self.fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
