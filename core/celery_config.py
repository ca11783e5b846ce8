"""Celery configuration shared by the producer (core.producer) and the workers (workers.app).

Usage::

    app = Celery("drscreen")
    app.conf.update(build_celery_config(get_settings()))

Embedded mode (``DRSCREEN_BROKER_URL`` unset or ``filesystem://``) uses kombu's filesystem
transport with an atomic publish (:mod:`core.filebroker`): messages are files under
``<var_dir>/broker/queue``; a real ``drscreen worker`` process consumes them. Claiming a message
is a ``rename`` into ``<var_dir>/broker/processed`` (atomic on one filesystem, so two worker
processes never take the same file); :func:`prune_processed` deletes old claimed files (the
maintenance sweep calls it).

The database is the source of truth for status, so there is no result backend.

Time limits (a safety net: a task stuck in a system call, e.g. on a hung network share, must not
hold a pool child for ever). Every task gets a hard limit of :data:`TASK_TIME_LIMIT_S`; the pool
kills the child and the message is acknowledged, and the usual recovery takes over (the sweep
re-queues photographs left ``running`` and fails one after ``DRSCREEN_MAX_ATTEMPTS``). No global
soft limit: ``SoftTimeLimitExceeded`` would be caught by scoring's per-batch ``except Exception``
and fail a batch of good photographs while the task went on. ``jobs.expand_folder`` walks and
copies whole folders, so it gets its own limits (:data:`EXPAND_FOLDER_TIME_LIMITS`), with a soft
limit it handles (``workers.folders.expand_folder``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from core.filebroker import TRANSPORT_PATH
from core.settings import Settings
from core.tasks import ALL_QUEUES, EXPAND_FOLDER, TASK_QUEUES

#: Hard limit (seconds) of every task but ``jobs.expand_folder``. The longest of them, a
#: ``scoring.score_images`` chunk (at most 256 photographs, ``DRSCREEN_SCORE_CHUNK``, 24 by default)
#: with heatmaps, runs ~0.8 s a photograph per pool child in the slowest benchmark on record
#: (2.6 photographs/s on two children, docs/performance.md): ~3.5 min, plus a model load of at most
#: ``DRSCREEN_CHILD_START_TIMEOUT_S`` (10 min) if the child loads lazily. 55 min leaves a margin of
#: ~4x over that worst case, and stays under Redis' visibility timeout (1 h, below), so a stuck
#: task is killed and acknowledged before Redis hands its message to a second worker.
TASK_TIME_LIMIT_S = 55 * 60

#: (soft, hard) limits of ``jobs.expand_folder``. It plans the whole folder (walk, one stat per
#: file, 32 bytes of unmatched names) and then stores every photograph in committed chunks: a
#: 1000-photo job expands in seconds (folder expansion is ~6% of one child's time in the 480-photo
#: e2e job), and even 100,000 photographs at 50 ms each take ~1.5 h. A planning stopped by the soft
#: limit fails the job with a clear error (re-sending it would only plan again); a copy stopped
#: later keeps its committed chunks and the sweep re-sends it to carry on. Both stay under Redis'
#: visibility timeout (1 h), as the other tasks' limit does: a longer expansion would be handed to
#: a second worker, then a third, while the first still runs (the session 17 review).
EXPAND_FOLDER_TIME_LIMITS = (50 * 60, 55 * 60)


def broker_folders(settings: Settings) -> dict[str, Path]:
    base = settings.broker_dir
    return {
        "queue": base / "queue",
        "processed": base / "processed",
        "control": base / "control",
    }


def ensure_broker_folders(settings: Settings) -> None:
    if settings.is_embedded_broker:
        for folder in broker_folders(settings).values():
            folder.mkdir(parents=True, exist_ok=True)


def build_celery_config(settings: Settings) -> dict[str, Any]:
    """Celery settings (new lowercase names) for the configured broker."""
    conf: dict[str, Any] = {
        "broker_url": settings.broker_url,
        "result_backend": None,
        "task_ignore_result": True,
        "task_serializer": "json",
        "accept_content": ["json"],
        "task_default_queue": ALL_QUEUES[0],
        "task_routes": {name: {"queue": queue} for name, queue in TASK_QUEUES.items()},
        # At-least-once: tasks are idempotent, so acknowledge after the work is done.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "broker_connection_retry_on_startup": True,
        "worker_hijack_root_logger": False,
        "enable_utc": True,
        "timezone": "UTC",
        # Safety net, see the module doc. Per-task values are task attributes set by annotation
        # (the worker reads them; the producer app registers no tasks, so messages carry none).
        "task_time_limit": TASK_TIME_LIMIT_S,
        "task_soft_time_limit": None,
        "task_annotations": {
            EXPAND_FOLDER: {
                "soft_time_limit": EXPAND_FOLDER_TIME_LIMITS[0],
                "time_limit": EXPAND_FOLDER_TIME_LIMITS[1],
            }
        },
    }
    if settings.is_embedded_broker:
        ensure_broker_folders(settings)
        # kombu's filesystem transport with an atomic publish (core.filebroker)
        conf["broker_transport"] = TRANSPORT_PATH
        folders = broker_folders(settings)
        conf["broker_transport_options"] = {
            "data_folder_in": str(folders["queue"]),
            "data_folder_out": str(folders["queue"]),
            "store_processed": True,
            "processed_folder": str(folders["processed"]),
            "control_folder": str(folders["control"]),
            # 0.2 s left each pool child idle between chunks: 29.2 -> 31.5 images/s on a
            # 480-photo folder job at 0.05 s (scripts/e2e_cpu.py); listing a folder is cheap
            "polling_interval": 0.05,
        }
        # No remote control / events on the file broker: nothing listens and it only adds files.
        conf["worker_enable_remote_control"] = False
        conf["worker_send_task_events"] = False
        conf["task_send_sent_event"] = False
    else:
        conf["broker_transport_options"] = {"visibility_timeout": 3600}
    return conf


def prune_processed(settings: Settings, max_age_seconds: float = 3600.0) -> int:
    """Delete claimed message files of the embedded broker older than ``max_age_seconds``."""
    if not settings.is_embedded_broker:
        return 0
    folder = broker_folders(settings)["processed"]
    if not folder.is_dir():
        return 0
    cutoff = time.time() - max_age_seconds
    removed = 0
    for path in folder.iterdir():
        try:
            if path.stat().st_mtime < cutoff:
                path.unlink()
                removed += 1
        except FileNotFoundError:
            continue
    return removed
