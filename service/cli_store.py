"""`turngate db ...`, `turngate export`, `turngate import`: the conversation store's commands.

Every command takes --url (default: TURNGATE_DATABASE_URL, else the embedded SQLite file).
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import typer

db_app = typer.Typer(help="Database schema and maintenance.", no_args_is_help=True)

_URL = typer.Option(None, "--url", help="Database URL; default TURNGATE_DATABASE_URL.")


def _url(url: str | None) -> str:
    from service.settings import Settings, SettingsError
    from service.store.urls import is_sqlite

    if not url:
        return Settings().database_url
    try:
        is_sqlite(url)
    except ValueError as e:
        raise SettingsError(f"--url: {e}") from None
    return url


def _when(text: str | None, default: datetime) -> datetime:
    """An ISO date/time (UTC unless it says otherwise) or an age back from now like 7d, 12h."""
    if not text:
        return default
    from service.store.prune import parse_age

    try:
        return datetime.now(UTC) - parse_age(text)
    except ValueError:
        pass
    try:
        dt = datetime.fromisoformat(text)
    except ValueError:
        raise typer.BadParameter(f"expected an ISO date/time or an age like 7d, got {text!r}") from None
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


@db_app.command("upgrade")
def db_upgrade(revision: str = typer.Argument("head"), url: str | None = _URL) -> None:
    """Apply the Alembic migrations (run before starting new replicas)."""
    from service.store.migrate import upgrade

    upgrade(_url(url), revision)
    typer.echo(f"database at {revision}")


@db_app.command("downgrade")
def db_downgrade(revision: str = typer.Argument(..., help="Target revision, e.g. base."),
                 url: str | None = _URL) -> None:
    """Revert migrations down to REVISION."""
    from service.store.migrate import downgrade

    downgrade(_url(url), revision)
    typer.echo(f"database at {revision}")


@db_app.command("prune")
def db_prune(older_than: str = typer.Option(..., help="Age like 30d, 12h: conversations idle longer go."),
             batch: int = typer.Option(1000, help="Conversations deleted per transaction."),
             url: str | None = _URL) -> None:
    """Delete conversations (with their turns, candidates, feedback) whose last turn is older."""
    from service.store.prune import parse_age, prune

    try:
        age = parse_age(older_than)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    counts = prune(_url(url), age, batch)
    typer.echo(f"deleted {counts['conversations']} conversations, {counts['turns']} turns")


def export(out: Path = typer.Option(..., "--out", help="Trajectory JSONL file to write ('-' = stdout)."),
           since: str | None = typer.Option(None, help="ISO date/time or age (7d); default: the beginning."),
           until: str | None = typer.Option(None, help="ISO date/time or age; default: now."),
           route: str | None = typer.Option(None, help="Only conversations on this route alias."),
           url: str | None = _URL) -> None:
    """Stream conversations with their outcomes to trajectory JSONL."""
    import sys

    from service.store.transfer import export_trajectories

    lo = _when(since, datetime(1970, 1, 1, tzinfo=UTC))
    hi = _when(until, datetime.now(UTC))
    if str(out) == "-":
        n = export_trajectories(_url(url), sys.stdout, lo, hi, route)
    else:
        with open(out, "w", encoding="utf-8") as f:
            n = export_trajectories(_url(url), f, lo, hi, route)
    typer.echo(f"exported {n} conversations", err=True)


def import_(files: list[Path] = typer.Argument(..., help="Trajectory JSONL files."),
            url: str | None = _URL) -> None:
    """Load trajectory JSONL into the store (idempotent: re-importing changes nothing)."""
    import asyncio

    from service.store.transfer import import_trajectories

    total = {"conversations": 0, "turns": 0, "rewards": 0}
    for path in files:
        with open(path, encoding="utf-8") as f:
            counts = asyncio.run(import_trajectories(_url(url), f))
        total = {k: total[k] + counts[k] for k in total}
        typer.echo(f"{path}: {counts['conversations']} conversations, {counts['turns']} turns")
    typer.echo(f"imported {total['conversations']} conversations, {total['turns']} turns, "
               f"{total['rewards']} rewards")


def register(app: typer.Typer) -> None:
    """Adds the store's top-level commands (export, import) and the `db` group to the CLI."""
    app.add_typer(db_app, name="db")
    app.command("export")(export)
    app.command("import")(import_)
