"""Run the Alembic migrations from code (``drscreen db upgrade``, tests)."""

from __future__ import annotations

import functools
import logging
from pathlib import Path

from alembic import command
from alembic.config import Config

from core.settings import PROJECT_ROOT, get_settings

log = logging.getLogger(__name__)


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
        return _unversioned_problem(database_url)
    if at not in known_revisions():
        # Migrated by newer code (the upgrade order: migrate, then replace APIs and workers): this
        # machine's code keeps serving until it is replaced; refusing would take every old API
        # out of the load balancer before a new one is up.
        _warn_newer(at, head)
        return None
    return f"the database schema is at revision {at}, this code needs {head}: run `drscreen db upgrade`"


#: Said when drscreen's tables are there but no migration recorded them (``metadata.create_all``,
#: or a dump restored without alembic_version): `db upgrade` would fail creating them again.
UNVERSIONED = (
    "the database has drscreen's tables but no migration history (no alembic_version: made by "
    "create_all, or restored without it): `drscreen db upgrade` cannot run on it; restore a backup "
    "made by `drscreen db backup`, or, only if its tables are exactly this code's, record them with "
    "`alembic stamp head` (from the checkout) and check with `drscreen db check`"
)


def _unversioned_problem(database_url: str | None) -> str:
    from sqlalchemy import inspect

    from core.db import get_engine
    from core.tables import metadata

    with get_engine(database_url or get_settings().database_url).connect() as conn:
        tables = set(inspect(conn).get_table_names())
    if tables & set(metadata.tables):
        return UNVERSIONED
    return "the database has no schema yet: run `drscreen db upgrade`"


def upgrade_problem(database_url: str | None = None) -> str | None:
    """Why `drscreen db upgrade` cannot start on this database (its tables made without
    migrations: the upgrade died on "table clinic already exists", a traceback on PostgreSQL,
    after `serve` had said to run it), or None."""
    if current_revision(database_url) is None and _unversioned_problem(database_url) == UNVERSIONED:
        return UNVERSIONED
    return None


class SchemaBehind(RuntimeError):
    """The database's schema is behind this code's migrations (or absent): do not start."""


def check_schema_at_start(database_url: str | None = None) -> str | None:
    """The start-up check of ``drscreen serve``, ``drscreen worker`` and the API's lifespan, each
    saying it its own way. Raises :class:`SchemaBehind` (the one-line reason) when the schema is
    behind; returns why nothing was checked when the database cannot be reached (one line: it may
    come up after the API or worker, so that is not fatal; /readyz says ``schema`` later), None
    when checked and fine (a newer schema is fine, with a warning: see :func:`schema_problem`)."""
    from sqlalchemy.exc import OperationalError

    try:
        problem = schema_problem(database_url)
    except OperationalError as exc:
        lines = str(exc.orig or exc).strip().splitlines()
        return (lines[0] if lines else type(exc).__name__)[:300]
    if problem:
        raise SchemaBehind(problem)
    return None


@functools.cache
def known_revisions() -> frozenset[str]:
    """Every revision this code's migrations name."""
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(alembic_config("sqlite://"))
    return frozenset(rev.revision for rev in script.walk_revisions())


@functools.cache
def _warn_newer(at: str, head: str) -> None:
    """Once per process (/readyz asks every few seconds)."""
    log.warning("the database schema is at %s, newer than this code's %s: upgrade this machine", at, head)
