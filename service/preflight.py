"""Checks `turngate serve` runs before it starts any worker, so that a configuration that cannot
work stops with one line instead of workers failing one by one with tracebacks.

Refused: a database that answers with a refusal (no such database, wrong password, not migrated
or behind this release), a critic bundle that does not validate, a spool folder that cannot be
written. A database that does not answer at all is only warned about: the service is built to
serve through a database outage (turns go to the spool), and a replica started during one must
not add to it by crash-looping.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from service.cli_errors import DatabaseProblem, database_problem
from service.settings import Settings, SettingsError


def check_before_serving(settings: Settings) -> list[str]:
    """Raises SettingsError / DatabaseProblem / BundleError for what cannot work; returns warnings."""
    warnings = []
    _check_writable(Path(settings.spool_dir).expanduser(), f"TURNGATE_SPOOL_DIR={settings.spool_dir}",
                    "the spool (turns kept while the database is away)")
    if settings.critic:
        from service.critic.bundle import read_bundle

        read_bundle(settings.critic)  # the manifest and files; the session itself loads in each worker
    try:
        warnings += _check_database(settings.database_url)
    except DatabaseProblem as problem:
        if not problem.waitable:
            raise
        warnings.append(f"{problem}. Serving anyway: turns go to the spool until the database answers")
    return warnings


def _check_writable(folder: Path, setting: str, what: str) -> None:
    """`folder` can be created and written in by this process, as the service will do."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise SettingsError(f"{setting}: cannot write in {folder} ({e.strerror or e}), so {what} would fail; "
                            "point it at a writable folder or volume") from None


def _check_database(url: str) -> list[str]:
    from sqlalchemy.engine import make_url

    from service.store.urls import is_sqlite

    try:
        sqlite = is_sqlite(url)
    except ValueError as e:  # an unsupported scheme
        raise SettingsError(f"TURNGATE_DATABASE_URL: {e}") from None
    if sqlite:
        db = make_url(url).database
        if db and db != ":memory:":  # the service creates and migrates the file itself
            _check_writable(Path(db).expanduser().parent, f"TURNGATE_DATABASE_URL={url}", "the SQLite database")
        return []
    return _check_postgres_schema(url)


def _check_postgres_schema(url: str) -> list[str]:
    """Reachable, and migrated to this release's revision (or a newer one, during a rollout)."""
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory
    from alembic.util.exc import CommandError

    from service.store.engine import make_sync_engine
    from service.store.migrate import alembic_config

    engine = make_sync_engine(url)
    try:
        with engine.connect() as conn:
            current = MigrationContext.configure(conn).get_current_revision()
    except Exception as e:
        problem = database_problem(e)
        if problem is None:
            raise
        raise problem from None
    finally:
        engine.dispose()
    script = ScriptDirectory.from_config(alembic_config(url))
    head = script.get_current_head()
    if current == head:
        return []
    if current is None:
        raise DatabaseProblem("the database has no turngate tables yet: run `turngate db upgrade` with the same "
                              "TURNGATE_DATABASE_URL before serving", waitable=False)
    try:
        script.get_revision(current)
    except CommandError:  # newer than this release: the previous release runs on an expanded schema
        return [f"the database is at revision {current}, newer than this release's {head}; serving on it"]
    raise DatabaseProblem(f"the database is at revision {current}, this release needs {head}: run "
                          "`turngate db upgrade` before serving", waitable=False)
