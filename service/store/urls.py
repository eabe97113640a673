"""Database URLs: users give plain `postgresql://` or `sqlite:///`; turngate picks the driver.

asyncpg for the async writer on Postgres, psycopg for sync work (CLI, Alembic); aiosqlite / the
standard sqlite3 module for SQLite.
"""

from __future__ import annotations

from sqlalchemy.engine import URL, make_url


def _base(url: str | URL) -> URL:
    u = make_url(url) if isinstance(url, str) else url
    backend = u.get_backend_name()
    if backend in ("postgresql", "postgres"):
        return u.set(drivername="postgresql")
    if backend == "sqlite":
        return u.set(drivername="sqlite")
    raise ValueError(f"unsupported database URL {u.render_as_string(hide_password=True)!r}: "
                     "use postgresql://... or sqlite:///...")


def is_sqlite(url: str | URL) -> bool:
    return _base(url).drivername == "sqlite"


def async_url(url: str | URL) -> URL:
    u = _base(url)
    return u.set(drivername="sqlite+aiosqlite" if u.drivername == "sqlite" else "postgresql+asyncpg")


def sync_url(url: str | URL) -> URL:
    u = _base(url)
    return u.set(drivername="sqlite" if u.drivername == "sqlite" else "postgresql+psycopg")


def sqlite_path(url: str | URL) -> str | None:
    """The database file of a sqlite:/// URL; None for an in-memory database (one per connection,
    so another connection would not see the tables one made)."""
    db = make_url(url).database
    return None if not db or db == ":memory:" else db
