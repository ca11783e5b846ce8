"""Thin named tasks: parse ids, call the plain function, turn transient failures into retries.

Transient = the database or the broker went away for a moment (connection dropped, server
restarting, SQLite busy, deadlock victim). Everything else is a bug or bad data, retried by nobody:
the plain functions already record per-photo failures on the rows.
"""

from __future__ import annotations

import logging
import random
from typing import Any

from celery import Task
from kombu.exceptions import OperationalError as KombuOperationalError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from sqlalchemy.exc import DBAPIError, OperationalError

from core import tasks
from workers import explain, folders, scoring, sweep
from workers.app import celery_app, worker_started_at

log = logging.getLogger(__name__)

MAX_RETRIES = 8
BACKOFF_BASE_S = 2.0
BACKOFF_MAX_S = 300.0


def is_transient(exc: BaseException) -> bool:
    """True for errors that a later attempt can get past."""
    if isinstance(exc, OperationalError):
        return True  # connection refused/dropped, server shutting down, SQLite locked, deadlock
    if isinstance(exc, DBAPIError):
        return bool(exc.connection_invalidated)  # e.g. a disconnect seen as InterfaceError
    return isinstance(
        exc, RedisConnectionError | RedisTimeoutError | KombuOperationalError | ConnectionError | TimeoutError
    )


def backoff(retries: int) -> float:
    """Exponential backoff with full jitter: spreads out workers that failed together."""
    ceiling = min(BACKOFF_MAX_S, BACKOFF_BASE_S * (2**retries))
    return random.uniform(ceiling / 2, ceiling)


def _run(task: Task, fn: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(*args, **kwargs)
    except Exception as exc:
        if not is_transient(exc):
            raise
        delay = backoff(task.request.retries)
        log.warning(
            "%s: transient %s, retry %d in %.0fs",
            task.name,
            type(exc).__name__,
            task.request.retries + 1,
            delay,
        )
        raise task.retry(exc=exc, countdown=delay, max_retries=MAX_RETRIES) from exc


def _ids(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    return [str(v) for v in value or []]


def _flag(value: Any) -> bool | None:
    return None if value is None else bool(value)


@celery_app.task(name=tasks.SCORE_IMAGES, bind=True, acks_late=True, ignore_result=True)
def score_images_task(self: Task, image_ids: Any, explain: Any = None) -> dict[str, int]:
    summary = _run(
        self, scoring.score_images, _ids(image_ids), explain=_flag(explain), worker=self.request.hostname
    )
    return {
        "scored": len(summary.scored),
        "ungradable": len(summary.ungradable),
        "failed": len(summary.failed),
    }


@celery_app.task(name=tasks.EXPLAIN_IMAGE, bind=True, acks_late=True, ignore_result=True)
def explain_image_task(self: Task, image_id: Any) -> str | None:
    result: str | None = _run(self, explain.explain_image, str(image_id))
    return result


@celery_app.task(name=tasks.EXPAND_FOLDER, bind=True, acks_late=True, ignore_result=True)
def expand_folder_task(self: Task, job_id: Any, explain: Any = False) -> int:
    summary = _run(self, folders.expand_folder, str(job_id), explain=bool(explain))
    return int(summary.items)


@celery_app.task(name=tasks.SWEEP, bind=True, acks_late=True, ignore_result=True)
def sweep_task(self: Task) -> int:
    live = sweep.ping_workers(celery_app, self.request.hostname, since=worker_started_at())
    summary = _run(self, sweep.sweep, live=live)
    return len(summary.requeued)
