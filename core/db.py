"""Engine and session handling. Engines are built on demand (never at import).

- :func:`get_engine` / :func:`get_sessionmaker`: cached per database URL.
- :func:`session_scope`: one unit of work; commits on success, rolls back on error.
- :func:`dispose_engines`: call in a forked worker child (``worker_process_init``) and on shutdown.

SQLite gets WAL journaling, ``busy_timeout`` and foreign keys on every connection, so the API and
worker processes can share one file.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, SessionTransaction, sessionmaker

from core.settings import get_settings

SQLITE_BUSY_TIMEOUT_MS = 30_000

_lock = threading.Lock()
_engines: dict[str, Engine] = {}
_sessionmakers: dict[str, sessionmaker[Session]] = {}


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")
    finally:
        cursor.close()


def make_engine(url: str, **kwargs: Any) -> Engine:
    """A new engine for ``url`` (SQLite: parent folder created, pragmas set on connect)."""
    parsed = make_url(url)
    # Statement parameters hold patient ids and file names; keep them out of exception messages,
    # which end up in logs (Celery logs a retried task's exception with its full message).
    kwargs.setdefault("hide_parameters", True)
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database
        if database and database != ":memory:" and not database.startswith("file:"):
            Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        kwargs.setdefault("connect_args", {}).setdefault("timeout", SQLITE_BUSY_TIMEOUT_MS / 1000)
        engine = create_engine(url, **kwargs)
        event.listen(engine, "connect", _sqlite_on_connect)
        return engine
    kwargs.setdefault("pool_pre_ping", True)
    engine = create_engine(url, **kwargs)
    if parsed.get_backend_name() == "postgresql":
        event.listen(engine, "connect", _postgresql_on_connect)
    return engine


def _postgresql_on_connect(dbapi_connection: Any, _record: Any) -> None:
    """Timestamps come back in the session's time zone, which a server takes from its host at
    initdb: pages that print them under "(UTC)" showed New York time. Every connection asks for
    UTC with a SET (a startup `options` parameter is refused by PgBouncer, and one in the URL
    would have replaced it)."""
    autocommit = dbapi_connection.autocommit
    dbapi_connection.autocommit = True
    try:
        with dbapi_connection.cursor() as cursor:
            cursor.execute("SET TIME ZONE 'UTC'")
    finally:
        dbapi_connection.autocommit = autocommit


def get_engine(url: str | None = None) -> Engine:
    """The cached engine for ``url`` (default: ``DRSCREEN_DATABASE_URL``)."""
    url = url or get_settings().database_url
    with _lock:
        engine = _engines.get(url)
        if engine is None:
            engine = _engines[url] = make_engine(url)
        return engine


def get_sessionmaker(url: str | None = None) -> sessionmaker[Session]:
    url = url or get_settings().database_url
    engine = get_engine(url)
    with _lock:
        factory = _sessionmakers.get(url)
        if factory is None:
            factory = _sessionmakers[url] = sessionmaker(bind=engine, expire_on_commit=False)
        return factory


@contextmanager
def session_scope(url: str | None = None) -> Iterator[Session]:
    """One unit of work: yields a Session, commits on success, rolls back on any exception."""
    session = get_sessionmaker(url)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


_AT_COMMIT = "drscreen.at_commit"


def at_commit(session: Session, write: Callable[[Session], object]) -> None:
    """Make ``write(session)`` when ``session`` next commits (before the commit's flush); dropped
    when its transaction ends otherwise (a rollback undoes it as it would have undone the write).

    For the small writes a read makes: its audit row, the last use of an API key or a web sign-in.
    On SQLite a transaction's first write takes the database's one write lock and keeps it until
    the commit, so such a write at the start of a read held off every upload, worker write and
    other read of the service while the read ran (a job's results CSV: seconds; the SQLite review
    of session 32). Made at the commit, it holds the lock for an INSERT."""
    session.info.setdefault(_AT_COMMIT, []).append(write)


@event.listens_for(Session, "before_commit")
def _write_at_commit(session: Session) -> None:
    writes: list[Callable[[Session], object]] = session.info.pop(_AT_COMMIT, None) or []
    for write in writes:
        write(session)


@event.listens_for(Session, "after_transaction_end")
def _drop_at_commit(session: Session, transaction: SessionTransaction) -> None:
    if transaction.parent is None:
        session.info.pop(_AT_COMMIT, None)


def dispose_engines(close: bool = True) -> None:
    """Drop every cached engine. In a forked child pass ``close=False`` (do not touch the parent's
    connections); the next :func:`get_engine` builds a fresh one."""
    with _lock:
        for engine in _engines.values():
            engine.dispose(close=close)
        _engines.clear()
        _sessionmakers.clear()


def ping(url: str | None = None) -> bool:
    """True when the database answers ``SELECT 1`` (for ``/readyz``)."""
    try:
        with get_engine(url).connect() as conn:
            conn.execute(text("SELECT 1"))
        return True
    except Exception:
        return False
