"""Applying Alembic migrations from code (`turngate db upgrade`, embedded SQLite at start)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
from pathlib import Path

from alembic import command
from alembic.config import Config

import service
from service.store.urls import is_sqlite, sqlite_path


def migrations_dir() -> Path:
    """Alembic's folder: inside the installed package (setup.py ships the repository's migrations/
    as service/migrations), else migrations/ beside the package in a checkout or editable install."""
    package = Path(service.__file__).resolve().parent
    for folder in (package / "migrations", package.parent / "migrations"):
        if (folder / "env.py").is_file():
            return folder
    raise FileNotFoundError(f"turngate's migrations are missing from {package} (a broken install? "
                            "reinstall turngate)")


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    cfg.attributes["url"] = url
    cfg.attributes["configure_logger"] = False
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    """Blocking; call it off the event loop. A SQLite file is left in WAL mode."""
    command.upgrade(alembic_config(url), revision)
    _wal_mode(url)


def _wal_mode(url: str) -> None:
    # WAL is kept in the file, and turning it on needs the file to itself: beside another
    # connection's write it fails at once, with no busy wait. So it is turned on here, before the
    # writers start (under `serve --workers N`'s start-up lock), not by their first connections.
    path = sqlite_path(url) if is_sqlite(url) else None
    if path:
        with contextlib.closing(sqlite3.connect(path, timeout=5.0)) as conn:
            conn.execute("PRAGMA journal_mode=WAL")


def upgrade_locked(url: str) -> None:
    """upgrade() at start; on a SQLite file under a lock, since `serve --workers N` starts N
    processes that would otherwise race to create the same tables."""
    path = sqlite_path(url) if is_sqlite(url) else None
    if path is None:
        upgrade(url)
        return
    file = Path(path).expanduser().resolve()
    file.parent.mkdir(parents=True, exist_ok=True)
    # flock on the database file itself: SQLite locks with fcntl(), which flock() does not touch.
    fd = os.open(file, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        upgrade(url)
    finally:
        os.close(fd)


def downgrade(url: str, revision: str) -> None:
    command.downgrade(alembic_config(url), revision)
