"""The producer publishes by name; a real worker process consumes it and writes a row.

Two set-ups: production-like (Redis + PostgreSQL) and the embedded default (filesystem broker +
SQLite file), which is what `drscreen demo` relies on.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import select

from core import migrate, producer
from core.db import session_scope
from core.settings import Settings
from core.tables import AuditEvent
from tests.conftest import WorkerProcess

HERE = Path(__file__).resolve().parent


def _wait_for_ping(url: str, marker: str, worker: WorkerProcess, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with session_scope(url) as s:
            found = s.scalars(select(AuditEvent).where(AuditEvent.target_id == marker)).first()
            if found is not None:
                assert found.action == "ping"
                return
        time.sleep(0.3)
    raise AssertionError(f"task not consumed within {timeout}s; worker log:\n{worker.output()}")


def _roundtrip(env: dict[str, str], url: str, start_worker: Callable[..., WorkerProcess]) -> None:
    worker = start_worker(env=env, app="pingapp:celery_app", pythonpath=[HERE])
    settings = Settings.model_validate({k[len("DRSCREEN_") :].lower(): v for k, v in env.items()})
    app = producer.make_producer_app(settings)
    markers = [uuid.uuid4().hex for _ in range(3)]
    for m in markers:
        producer.send("maintenance.ping", [m], app=app)
    for m in markers:
        _wait_for_ping(url, m, worker)


def test_redis_and_postgres(
    pg_url: str, redis_url: str, tmp_path: Path, start_worker: Callable[..., WorkerProcess]
) -> None:
    env = {
        "DRSCREEN_DATABASE_URL": pg_url,
        "DRSCREEN_BROKER_URL": redis_url,
        "DRSCREEN_VAR_DIR": str(tmp_path / "var"),
    }
    _roundtrip(env, pg_url, start_worker)


def test_embedded_filesystem_broker_and_sqlite(
    tmp_path: Path, start_worker: Callable[..., WorkerProcess]
) -> None:
    var = tmp_path / "shared-var"
    url = f"sqlite:///{var / 'drscreen.db'}"
    var.mkdir()
    migrate.upgrade(url)
    env = {"DRSCREEN_VAR_DIR": str(var), "DRSCREEN_DATABASE_URL": url}
    _roundtrip(env, url, start_worker)
