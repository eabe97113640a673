"""`turngate db ...`, `turngate export`, `turngate import`: the conversation store's commands."""

from __future__ import annotations

import typer

db_app = typer.Typer(help="Database schema and maintenance.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    """Adds the store's top-level commands (export, import) and the `db` group to the CLI."""
    app.add_typer(db_app, name="db")
