"""The Celery app of the workers: ``celery_app`` (run it with ``drscreen worker``).

Configured from :func:`core.celery_config.build_celery_config`, the same settings the producer
uses, plus the worker-side guarantees: late acknowledgement with prefetch 1 (a message is removed
only after its work committed; a crash redelivers it), and three queues, ``uploads`` (clinics'
photographs and bundles), ``scoring`` (folder jobs, re-scores, the sweep) and ``explain``, taken in
turn: heatmaps never wait in front of grades, nor an upload behind a whole folder job.

Process model: the parent (prefork pool master) imports no torch state; each pool child, after the
fork, drops inherited database engines, sets its torch thread count and loads the ensemble once.

Periodic sweep: the worker's main process publishes ``maintenance.sweep`` at start and every
``DRSCREEN_SWEEP_INTERVAL_S`` seconds (default 300; 0 disables) from a daemon timer. This works with
the embedded file broker and needs no separate ``celery beat`` process; ``beat_schedule`` carries
the same entry for operators who prefer beat (then set the interval to 0).
"""

from __future__ import annotations

import logging
import threading
from datetime import datetime
from typing import Any

from celery import Celery
from celery.signals import celeryd_init, worker_process_init, worker_ready, worker_shutdown

from core import retention, tasks
from core.celery_config import build_celery_config
from core.db import dispose_engines, session_scope
from core.settings import get_settings
from core.tables import utcnow
from workers import heartbeat, model
from workers.model import get_ensemble
from workers.settings import get_worker_settings

log = logging.getLogger(__name__)

__all__ = ["celery_app", "get_ensemble"]

# ``include``: the worker imports the task module at start-up (tasks import this module, so a
# plain import here would be circular).
celery_app = Celery("drscreen", include=["workers.tasks"])
celery_app.conf.update(build_celery_config(get_settings()))
celery_app.conf.update(
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    # One scoring batch can take a while on CPU; recycle children now and then to bound memory.
    worker_max_tasks_per_child=500,
    # A child reports "up" only after worker_process_init has loaded the ensemble (seconds, more on
    # a busy machine); Celery kills children that take longer than this, 4 s unless set.
    worker_proc_alive_timeout=get_worker_settings().child_start_timeout_s,
    beat_schedule={
        "sweep": {"task": tasks.SWEEP, "schedule": 300.0, "options": {"queue": tasks.QUEUE_SCORING}}
    },
)

# Concurrency and start time of this worker, noted in the parent (celeryd_init) and inherited by
# the children.
_concurrency: int | None = None
_started_at: datetime | None = None


@celeryd_init.connect
def _note_worker(options: dict[str, Any] | None = None, **_: Any) -> None:
    global _concurrency, _started_at
    value = (options or {}).get("concurrency")
    _concurrency = int(value) if value else None
    _started_at = utcnow()


def worker_started_at() -> datetime | None:
    """When this worker (its parent process) started; None outside a worker."""
    return _started_at


@worker_process_init.connect
def _init_child(**_: Any) -> None:
    # The parent's pooled connections must not be shared with a forked child.
    dispose_engines(close=False)
    from core.producer import reset_producer

    reset_producer()
    threads = model.configure_torch(_concurrency)
    ens = model.load()
    log.info("worker child ready: %s, %d torch thread(s)", ens.ref, threads)
    heartbeat.report_loaded(ens)


class _SweepTimer:
    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="drscreen-sweep", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        from core.producer import make_producer_app, send

        app = make_producer_app(get_settings())
        # The first sweep goes out at start: a worker restarted after a crash re-queues the
        # photographs its previous run left ``running`` (workers.sweep) without waiting a period.
        while True:
            try:
                send(tasks.SWEEP, [], app=app)
            except Exception:  # the broker may be down for a moment; try again next period
                log.warning("could not publish the maintenance sweep", exc_info=True)
            if self._stop.wait(self.interval):
                return


_timer: _SweepTimer | None = None


@worker_ready.connect
def _start_sweep_timer(**_: Any) -> None:
    global _timer
    interval = get_worker_settings().sweep_interval_s
    if interval > 0 and _timer is None:
        _timer = _SweepTimer(interval)
        _timer.start()


@worker_shutdown.connect
def _stop_sweep_timer(**_: Any) -> None:
    if _timer is not None:
        _timer.stop()


# Heartbeats (workers/heartbeat.py): the first one before the pool forks (celeryd_init's sender is
# the node name, celery@host), then a daemon thread of the main process, like the sweep timer
# but on whether or not the sweep is on.
@celeryd_init.connect
def _first_heartbeat(sender: Any = None, options: dict[str, Any] | None = None, **_: Any) -> None:
    value = (options or {}).get("concurrency")
    heartbeat.begin(
        str(sender), started_at=worker_started_at() or utcnow(), concurrency=int(value) if value else None
    )


@worker_ready.connect
def _start_heartbeat(**_: Any) -> None:
    heartbeat.start_beating()


@worker_ready.connect
def _seal_old_audit_rows(**_: Any) -> None:
    """Erasure audit rows written before the deployment key existed hold a plain sha256 of the
    patient id: sealed here, where the store (and so the key) is, once per start."""
    try:
        with session_scope() as session:
            sealed = retention.seal_audit_digests(session, retention.store_key())
    except Exception as exc:  # housekeeping: never in the way of the start
        log.warning("erasure audit rows not sealed: %s: %s", type(exc).__name__, str(exc)[:200])
        return
    if sealed:
        log.info("sealed the patient digests of %d erasure audit row(s) with the deployment key", sealed)


@worker_shutdown.connect
def _stop_heartbeat(**_: Any) -> None:
    heartbeat.end()
