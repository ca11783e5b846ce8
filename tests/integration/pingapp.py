"""A tiny Celery app for the integration tests of the queue plumbing (the real workers live in
``workers/`` and have their own tests). Configured exactly like the real one, from core."""

from __future__ import annotations

from typing import Any

from celery import Celery
from celery.signals import worker_process_init

from core import repository as repo
from core.celery_config import build_celery_config
from core.db import dispose_engines, session_scope
from core.settings import get_settings

celery_app = Celery("drscreen-ping")
celery_app.conf.update(build_celery_config(get_settings()))


@worker_process_init.connect
def _fresh_engine(**_: Any) -> None:
    dispose_engines(close=False)


@celery_app.task(name="maintenance.ping", acks_late=True)
def ping(marker: str) -> None:
    """Write one audit row carrying ``marker`` (so the test can see the task ran)."""
    with session_scope() as session:
        repo.record_audit(session, action="ping", target_type="test", target_id=marker)
