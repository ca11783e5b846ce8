"""Run the Alembic migrations from code (``drscreen db upgrade``, tests)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

from core.settings import PROJECT_ROOT, get_settings


def alembic_config(database_url: str | None = None) -> Config:
    migrations = Path(PROJECT_ROOT) / "migrations"
    if not migrations.is_dir():
        # a regular (non-editable) install puts core/ in site-packages, away from migrations/
        raise RuntimeError(
            f"the Alembic migrations are not at {migrations}: run drscreen from the source folder's "
            "editable install (pip install -e .), as the Dockerfile does"
        )
    ini = PROJECT_ROOT / "alembic.ini"
    cfg = Config(str(ini)) if ini.is_file() else Config()
    cfg.set_main_option("script_location", str(migrations))
    cfg.attributes["database_url"] = database_url or get_settings().database_url
    cfg.attributes["configure_logger"] = False
    return cfg


def upgrade(database_url: str | None = None, revision: str = "head") -> None:
    command.upgrade(alembic_config(database_url), revision)


def check(database_url: str | None = None) -> None:
    """Raise when the tables in core.tables and the migrations differ (``alembic check``)."""
    command.check(alembic_config(database_url))


def current_revision(database_url: str | None = None) -> str | None:
    """The Alembic revision the database is at (None: not migrated)."""
    from alembic.runtime.migration import MigrationContext

    from core.db import get_engine

    with get_engine(database_url or get_settings().database_url).connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()
