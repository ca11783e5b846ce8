"""Send tasks by name. Configured only for sending; never imports ``workers``.

The caller commits the database rows before calling any ``send_*`` (the database is the source of
truth; the task only carries ids).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

from celery import Celery

from core import tasks
from core.celery_config import build_celery_config
from core.settings import Settings, get_settings

log = logging.getLogger(__name__)


def make_producer_app(settings: Settings | None = None) -> Celery:
    """A Celery app object used only to publish messages (no task registered on it)."""
    settings = settings or get_settings()
    app = Celery("drscreen-producer", set_as_current=False)
    app.conf.update(build_celery_config(settings))
    return app


@lru_cache(maxsize=1)
def get_producer_app() -> Celery:
    return make_producer_app()


def reset_producer() -> None:
    """Forget the cached producer (after settings change, or in a forked child)."""
    get_producer_app.cache_clear()


def send(
    name: str,
    args: Sequence[Any] = (),
    kwargs: dict[str, Any] | None = None,
    *,
    app: Celery | None = None,
    countdown: float | None = None,
    queue: str | None = None,
) -> str:
    """Publish task ``name`` on its queue (``queue``, default the name's); returns the task id."""
    app = app or get_producer_app()
    result = app.send_task(
        name,
        args=list(args),
        kwargs=kwargs or {},
        queue=queue or tasks.queue_for(name),
        countdown=countdown,
    )
    log.debug("sent %s %s -> %s", name, args, result.id)
    return str(result.id)


def send_score_images(image_ids: Sequence[str], *, app: Celery | None = None) -> str:
    """A clinic's upload (a photograph, a bundle): on the ``uploads`` queue, taken in turn with
    folder-job chunks rather than after them."""
    return send(tasks.SCORE_IMAGES, [list(image_ids)], app=app, queue=tasks.QUEUE_UPLOADS)


def send_explain_image(image_id: str, *, app: Celery | None = None) -> str:
    return send(tasks.EXPLAIN_IMAGE, [image_id], app=app)


def send_expand_folder(job_id: str, *, app: Celery | None = None) -> str:
    return send(tasks.EXPAND_FOLDER, [job_id], app=app)


def send_sweep(*, app: Celery | None = None) -> str:
    return send(tasks.SWEEP, [], app=app)


def broker_reachable(timeout: float = 2.0, *, app: Celery | None = None) -> bool:
    """True when a connection to the broker can be opened (for ``/readyz``)."""
    app = app or get_producer_app()
    try:
        with app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=timeout)
        return True
    except Exception as exc:  # any transport error means "not ready"
        # one line per probe (a traceback every few seconds buried the log during an outage)
        log.warning("broker not reachable: %s: %s", type(exc).__name__, exc)
        log.debug("broker not reachable", exc_info=True)
        return False
