"""Alembic migrations on SQLite and PostgreSQL: every revision upgrades and downgrades, the
head schema is exactly what the tables declare, and a database with data survives a round trip
of the newest revision."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, inspect
from sqlmodel import SQLModel

import fleet_service.tables  # noqa: F401  (registers the tables on SQLModel.metadata)
from fleet_service.db import alembic_config


@pytest.fixture
def url(tmp_path: Path, database_url: str | None) -> str:
    return database_url or f"sqlite:///{tmp_path / 'migrations.db'}"


def tables(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def schema_drift(url: str) -> list[Any]:
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection)
            return list(compare_metadata(context, SQLModel.metadata))
    finally:
        engine.dispose()


def test_every_revision_goes_up_and_down_and_head_matches_the_tables(url: str) -> None:
    config = alembic_config(url)
    revisions = [
        script.revision
        for script in reversed(list(ScriptDirectory.from_config(config).walk_revisions()))
    ]
    assert revisions[0] == "0001" and len(revisions) >= 6
    for revision in revisions:
        command.upgrade(config, revision)
        command.downgrade(config, "-1")  # each downgrade runs against its own upgrade
        command.upgrade(config, revision)
    assert schema_drift(url) == []  # the migrations build exactly what tables.py declares
    command.downgrade(config, "base")
    assert tables(url) <= {"alembic_version"}
    command.upgrade(config, "head")
    assert {"telemetry_hourly", "result_hourly", "maintenance_cursor"} <= tables(url)
