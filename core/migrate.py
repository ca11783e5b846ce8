"""Run the Alembic migrations from code (``drscreen db upgrade``, tests)."""

from __future__ import annotations

import functools
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


@functools.cache
def head_revision() -> str:
    """The newest migration this code ships (what its tables need)."""
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()
    assert head is not None, "migrations/ holds no revision"
    return head


def schema_problem(database_url: str | None = None) -> str | None:
    """One line saying why the database cannot serve this code, None when its schema is the
    newest migration's. An API or worker on a database that is not migrated (or migrated by other
    code) answered 500 to every upload while /readyz said ready (session 18's operator review).
    Raises SQLAlchemy's OperationalError when the database cannot be reached."""
    at, head = current_revision(database_url), head_revision()
    if at == head:
        return None
    if at is None:
        return "the database has no schema yet: run `drscreen db upgrade`"
    return (
        f"the database schema is at revision {at}, this code needs {head}: run `drscreen db upgrade` "
        f"(if {at} is newer, this machine runs older code than the one that migrated the database)"
    )
