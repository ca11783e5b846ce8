"""Alembic environment: the metadata of core.tables, the URL from DRSCREEN_DATABASE_URL."""

from __future__ import annotations

from logging.config import fileConfig

from alembic import context
from alembic.util.exc import CommandError
from sqlalchemy import Connection, text

from core.db import make_engine
from core.settings import get_settings
from core.tables import metadata

config = context.config
if config.config_file_name is not None and config.attributes.get("configure_logger", True):
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = metadata


def _url() -> str:
    return config.attributes.get("database_url") or get_settings().database_url


def _options(url: str) -> dict[str, object]:
    return {
        "target_metadata": target_metadata,
        "render_as_batch": url.startswith("sqlite"),
        "compare_type": True,
    }


def run_migrations_offline() -> None:
    url = _url()
    context.configure(url=url, literal_binds=True, dialect_opts={"paramstyle": "named"}, **_options(url))
    with context.begin_transaction():
        context.run_migrations()


#: pg_advisory_xact_lock key: two `drscreen db upgrade` at once (two containers starting) take turns,
#: and the second finds nothing left to do (it failed on a duplicate catalogue entry, a traceback).
_MIGRATION_LOCK = 0x64727363  # "drsc"


def _sqlite_foreign_keys_off(connection: Connection) -> None:
    """Alembic's batch mode rebuilds a table on SQLite (copy, DROP, rename); with foreign keys on,
    core.db's default, the DROP cascades into every row pointing at the table: a folder job's items
    were deleted by the job-explain migration, predictions and heatmaps by downgrades. SQLite
    ignores the pragma inside a transaction, so the autobegun one is ended before the migrations'."""
    connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
    connection.commit()


def _sqlite_foreign_key_problem(connection: Connection) -> str | None:
    rows = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
    if not rows:
        return None
    tables = sorted({str(row[0]) for row in rows})
    return f"{len(rows)} row(s) of {', '.join(tables)} point at rows that do not exist"


def run_migrations_online() -> None:
    url = _url()
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            sqlite = connection.dialect.name == "sqlite"
            if sqlite:
                _sqlite_foreign_keys_off(connection)
            context.configure(connection=connection, **_options(url))
            with context.begin_transaction():
                if connection.dialect.name == "postgresql":
                    connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK})
                before = context.get_context().get_current_heads()
                context.run_migrations()
                ran = context.get_context().get_current_heads() != before
                # what the foreign keys would have refused, said (SQLite's DDL is committed per
                # migration: one that broke references must not pass for a clean upgrade); only
                # after a migration ran, so rows broken otherwise do not block `db check` for ever
                problem = _sqlite_foreign_key_problem(connection) if sqlite and ran else None
                if problem is not None:
                    raise CommandError(f"after the migrations, {problem} (PRAGMA foreign_key_check)")
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
