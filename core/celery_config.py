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
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from core.filebroker import TRANSPORT_PATH
from core.settings import Settings
from core.tasks import ALL_QUEUES, TASK_QUEUES


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
