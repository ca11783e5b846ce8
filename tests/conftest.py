"""Shared fixtures.

- every test gets its own ``DRSCREEN_VAR_DIR`` (tmp) and a fresh ``get_settings()``;
- ``pg_url``: a fresh, uniquely named PostgreSQL database migrated with Alembic (session scope);
- ``redis_url``: real Redis; FAILS (never skips) when Redis is down;
- ``start_worker``: starts ``drscreen worker`` as a real subprocess with the given environment.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from fastapi.testclient import TestClient

REPO_ROOT = Path(__file__).resolve().parent.parent
PG_ADMIN_URL = os.environ.get("DRSCREEN_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("DRSCREEN_TEST_REDIS", "redis://127.0.0.1:6379/9")
DRSCREEN_BIN = Path(sys.executable).with_name("drscreen")
# the fresh databases' name prefix: engineers sharing one server tell theirs apart by it
PG_TEST_PREFIX = os.environ.get("DRSCREEN_TEST_PG_PREFIX") or "drscreen_test"


def _clear_cached_settings() -> None:
    from core.db import dispose_engines
    from core.producer import reset_producer
    from core.settings import get_settings

    get_settings.cache_clear()
    reset_producer()
    dispose_engines()


@pytest.fixture(autouse=True)
def isolated_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Point every DRSCREEN_ setting at a per-test folder so no test touches ./var."""
    for name in list(os.environ):
        if name.startswith("DRSCREEN_") and not name.startswith("DRSCREEN_TEST_"):
            monkeypatch.delenv(name)
    var = tmp_path / "var"
    monkeypatch.setenv("DRSCREEN_VAR_DIR", str(var))
    _clear_cached_settings()
    yield var
    _clear_cached_settings()


def _psycopg_url(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


@contextlib.contextmanager
def fresh_pg_database(prefix: str | None = None, *, migrated: bool = True) -> Iterator[str]:
    """A new PostgreSQL database migrated to head (empty with ``migrated=False``), dropped on exit.
    Fails loudly when PostgreSQL is down (CI must not skip what it cannot reach). Named
    ``<prefix>_<random>``, by default ``PG_TEST_PREFIX``."""
    prefix = prefix or PG_TEST_PREFIX
    import psycopg

    from core.migrate import upgrade

    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    try:
        admin = psycopg.connect(_psycopg_url(PG_ADMIN_URL), autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        pytest.fail(f"PostgreSQL is not reachable at {PG_ADMIN_URL}: {exc}", pytrace=False)
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    url = f"{base}/{name}"
    try:
        if migrated:
            upgrade(url)
        yield url
    finally:
        from core.db import dispose_engines

        dispose_engines()
        with psycopg.connect(_psycopg_url(PG_ADMIN_URL), autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database, migrated to head; dropped at the end of the session."""
    with fresh_pg_database() as url:
        yield url


@pytest.fixture
def own_pg_url(isolated_settings: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fresh PostgreSQL database for one test (tests that erase or purge every clinic), set as
    the deployment's (DRSCREEN_DATABASE_URL): the API and the CLI use it too."""
    with fresh_pg_database() as url:
        monkeypatch.setenv("DRSCREEN_DATABASE_URL", url)
        _clear_cached_settings()
        yield url


@pytest.fixture(scope="session")
def redis_url() -> str:
    """Real Redis (a test database index, flushed). Fails loudly when Redis is down."""
    import redis

    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3)
    try:
        client.ping()
    except redis.RedisError as exc:
        pytest.fail(f"Redis is not reachable at {REDIS_URL}: {exc}. Start it (see .ci/run).", pytrace=False)
    client.flushdb()
    return REDIS_URL


class WorkerProcess:
    def __init__(self, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.proc = proc
        self.log = log

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self, timeout: float = 20) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)


@pytest.fixture
def start_worker(tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    """Factory: ``start_worker(env={...}, app="module:attr")`` starts ``drscreen worker`` in a
    subprocess, waits until Celery reports ready, and stops it at the end of the test."""
    started: list[WorkerProcess] = []

    def _start(
        env: dict[str, str],
        app: str = "workers.app:celery_app",
        queues: str = "uploads,scoring,explain",
        pythonpath: list[Path] | None = None,
        ready_timeout: float = 90,
    ) -> WorkerProcess:
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("DRSCREEN_")}
        full_env.update(env)
        full_env.setdefault("DRSCREEN_STORE_DIR", str(tmp_path / "worker-store"))
        paths = [str(p) for p in (pythonpath or [])] + [str(REPO_ROOT)]
        full_env["PYTHONPATH"] = os.pathsep.join(paths)
        log = tmp_path / f"worker-{len(started)}.log"
        cmd = [str(DRSCREEN_BIN), "worker", "--app", app, "--queues", queues, "--concurrency", "1"]
        with open(log, "wb") as fh:
            proc = subprocess.Popen(
                cmd, env=full_env, cwd=tmp_path, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True
            )
        worker = WorkerProcess(proc, log)
        started.append(worker)
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"worker exited with {proc.returncode}:\n{worker.output()}", pytrace=False)
            if " ready." in worker.output():
                return worker
            time.sleep(0.2)
        worker.stop()
        pytest.fail(f"worker not ready after {ready_timeout}s:\n{worker.output()}", pytrace=False)

    yield _start
    for worker in started:
        worker.stop()


@pytest.fixture
def shifted_clock(monkeypatch: pytest.MonkeyPatch) -> Callable[[str, timedelta], None]:
    """``shift(module, by)``: the ``utcnow`` that ``module`` stamps its rows with runs ``by`` ahead
    of the real clock from now on (another machine's clock, or this one's before an NTP step)."""
    from core.tables import utcnow

    def shift(module: str, by: timedelta) -> None:
        monkeypatch.setattr(f"{module}.utcnow", lambda: utcnow() + by)

    return shift


@pytest.fixture
def roots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An import root for folder jobs (DRSCREEN_IMPORT_ROOTS), empty."""
    root = tmp_path / "imports"
    root.mkdir()
    monkeypatch.setenv("DRSCREEN_IMPORT_ROOTS", str(root))
    _clear_cached_settings()
    return root


@pytest.fixture
def client(url: str) -> Iterator[TestClient]:
    """A client of the real app on the requesting module's ``url`` database (tests/unit/conftest.py
    migrates an embedded one; the PostgreSQL modules give their own)."""
    from fastapi.testclient import TestClient

    from services.app import create_app
    from services.config import get_api_settings

    get_api_settings.cache_clear()
    with TestClient(create_app()) as c:
        yield c
    get_api_settings.cache_clear()
