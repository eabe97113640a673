"""Applying Alembic migrations from code (`turngate db upgrade`, embedded SQLite at start)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

import service


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
    """Blocking; call it off the event loop."""
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str) -> None:
    command.downgrade(alembic_config(url), revision)
