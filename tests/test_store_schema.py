"""The ORM models and the Alembic migrations describe the same schema, on both databases."""

# ruff: noqa: F811 - the fixtures are imported from tests.test_store_support

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from service.store.engine import make_sync_engine
from service.store.migrate import downgrade, upgrade
from service.store.models import Base
from tests.test_store_support import db_url, make_pg_db, shared_pg_db  # noqa: F401 - fixtures


def _diff(url: str) -> list:
    engine = make_sync_engine(url)
    try:
        with engine.connect() as conn:
            return compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
    finally:
        engine.dispose()


def test_migrations_match_models(db_url):
    assert _diff(db_url) == []
    engine = make_sync_engine(db_url)
    tables = set(inspect(engine).get_table_names())
    engine.dispose()
    assert {"conversations", "turns", "candidates", "feedback", "critic_versions"} <= tables


def test_downgrade_then_upgrade_again(db_url):
    downgrade(db_url, "base")
    engine = make_sync_engine(db_url)
    assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    engine.dispose()
    upgrade(db_url)
    assert _diff(db_url) == []


def test_cli_upgrades_and_downgrades_a_fresh_database(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from service.cli import app

    url = f"sqlite:///{tmp_path}/cli.db"
    monkeypatch.setenv("TURNGATE_DATABASE_URL", url)  # the default for --url
    runner = CliRunner()
    res = runner.invoke(app, ["db", "upgrade"])
    assert res.exit_code == 0, res.output
    assert _diff(url) == []
    res = runner.invoke(app, ["db", "downgrade", "base", "--url", url])
    assert res.exit_code == 0, res.output
    engine = make_sync_engine(url)
    assert "turns" not in inspect(engine).get_table_names()
    engine.dispose()
    res = runner.invoke(app, ["db", "prune", "--older-than", "thirty days", "--url", url])
    assert res.exit_code != 0 and "30d" in res.output
