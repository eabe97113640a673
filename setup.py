"""Packaging beyond what pyproject.toml can say: Alembic's migrations/ (a top-level folder of the
repository) ship inside the package as `service/migrations`, so an installed turngate migrates its
database from any directory. Everything else is in pyproject.toml."""

from setuptools import find_packages, setup

setup(packages=find_packages(include=["service", "service.*", "critic_models", "critic_models.*"])
      + ["service.migrations", "service.migrations.versions"],
      package_dir={"service.migrations": "migrations"})
