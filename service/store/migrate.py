"""Applying Alembic migrations from code (`turngate db upgrade`, embedded SQLite at start)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

import service


def migrations_dir() -> Path:
    """migrations/ beside the package (a checkout) or in the working directory (the image's /app)."""
    for base in (Path(service.__file__).resolve().parent.parent, Path.cwd()):
        if (base / "migrations" / "env.py").is_file():
            return base / "migrations"
    raise FileNotFoundError("cannot find turngate's migrations/ folder (run from the install directory)")


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
