"""Migrations create the schema on SQLite and PostgreSQL, and `alembic check` is clean on both."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from sqlalchemy import create_engine, inspect

from core import migrate
from core.tables import metadata

REPO_ROOT = Path(__file__).resolve().parents[2]


def _tables(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_sqlite_upgrade_and_check(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'm.db'}"
    migrate.upgrade(url)
    assert set(metadata.tables) <= _tables(url)
    migrate.check(url)
    migrate.upgrade(url)  # idempotent


def test_postgres_migrated_and_check(pg_url: str) -> None:
    assert set(metadata.tables) <= _tables(pg_url)
    migrate.check(pg_url)


def test_cli_db_upgrade_and_alembic_check_command(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    env = {**os.environ, "DRSCREEN_DATABASE_URL": url}
    drscreen = Path(sys.executable).with_name("drscreen")
    alembic = Path(sys.executable).with_name("alembic")
    run = subprocess.run([drscreen, "db", "upgrade"], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    check = subprocess.run(
        [alembic, "check"], env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert "No new upgrade operations detected" in check.stdout + check.stderr
