"""This worker's heartbeat: its row in ``worker_heartbeat`` (read by ``drscreen status`` and
``/metrics``, see ``core/heartbeat.py``).

Written by the worker's main process, not by the sweep (which may be off, or run by ``celery
beat``): once at start, in ``celeryd_init`` before the pool forks, which also clears the runtime an
earlier run under the same node name reported (no child can have reported yet); then every
``DRSCREEN_HEARTBEAT_INTERVAL_S`` from a daemon thread; ``stopped_at`` on a warm shutdown. Each
pool child adds the runtime it loaded the model with: the main process imports no torch and
loads nothing, and OpenVINO's per-member precisions are decided only by loading.

Every write is one upsert; a failure (the database away for a moment) is logged in one line and
the next beat tries again: a heartbeat never stops a worker.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import socket
import threading
from datetime import datetime
from typing import Any

from core import deployment_key
from core import repository as repo
from core.db import session_scope
from core.heartbeat import FORGOTTEN_AFTER, shared_settings
from core.settings import get_settings
from core.tables import utcnow
from workers.settings import WorkerSettings, get_worker_settings

log = logging.getLogger(__name__)


def worker_settings(ws: WorkerSettings) -> dict[str, Any]:
    """Worker-only settings that must be alike on every worker: a photograph's attempts are
    counted in the database whichever worker claims it, and every worker sweeps with its own
    limits (the shortest one wins)."""
    return {
        "max_attempts": ws.max_attempts,
        "stale_queued_minutes": ws.stale_queued_minutes,
        "stale_running_minutes": ws.stale_running_minutes,
    }


def code_version() -> str | None:
    try:
        return importlib.metadata.version("drscreen")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree without installing
        return None


def _served_release() -> str | None:
    from workers.model import serving_ref

    try:
        return serving_ref()  # resolves the release without loading it in the main process
    except Exception:  # `drscreen worker` checked the release already; never stop a worker here
        log.warning("heartbeat: the release served is unknown", exc_info=True)
        return None


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:200] if lines else ''}"


class Heartbeat:
    """The heartbeat of one worker run (node name, main process), inherited by its pool children."""

    def __init__(
        self,
        node: str,
        *,
        started_at: datetime,
        concurrency: int | None,
        interval_s: float,
        db_url: str | None = None,
    ) -> None:
        self.node = node
        self.interval_s = interval_s
        self.db_url = db_url
        self.pid = os.getpid()  # the main process's: children report under it
        settings = get_settings()
        try:  # created now, so that every process of the deployment reports the same fingerprint
            deployment_key.deployment_key(settings.store_path)
        except (OSError, deployment_key.DeploymentKeyError) as exc:
            log.error("the store's deployment key is not usable: %s", _one_line(exc))
        #: written with every beat (a deleted row comes back whole); fixed for the run
        self.static: dict[str, Any] = {
            "host": socket.gethostname(),
            "pid": self.pid,
            "started_at": started_at,
            "interval_s": interval_s,
            "release": _served_release(),
            "concurrency": concurrency,
            "code_version": code_version(),
            "settings": shared_settings(settings) | worker_settings(get_worker_settings()),
        }
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _write(self, values: dict[str, Any], what: str) -> bool:
        try:
            with session_scope(self.db_url) as session:
                repo.record_heartbeat(session, self.node, self.static | values)
        except Exception as exc:  # the database away for a moment: the next beat tries again
            log.warning("heartbeat of %s not written (%s): %s", self.node, what, _one_line(exc))
            return False
        return True

    def beat(self, *, first: bool = False, now: datetime | None = None) -> bool:
        """Refresh ``seen_at``; ``first`` (the run's start) also clears the runtime an earlier run
        under this node name reported, and forgets workers unseen for ``FORGOTTEN_AFTER``. False
        when it could not be written (logged)."""
        now = now or utcnow()
        values: dict[str, Any] = {"seen_at": now, "stopped_at": None}
        if first:
            values |= {"runtime": None, "precisions": None}
            self._forget_old(now)
        return self._write(values, "start" if first else "beat")

    def _forget_old(self, now: datetime) -> None:
        try:
            with session_scope(self.db_url) as session:
                gone = repo.forget_workers_unseen_since(session, now - FORGOTTEN_AFTER)
        except Exception as exc:  # housekeeping only: never in the way of the start
            log.warning("old worker rows not forgotten: %s", _one_line(exc))
            return
        if gone:
            log.info("forgot %d worker(s) not seen for %s", gone, FORGOTTEN_AFTER)

    def report_runtime(
        self, runtime: str, precisions: dict[str, str] | None, now: datetime | None = None
    ) -> bool:
        """A pool child's report, once it has loaded the model."""
        values = {
            "seen_at": now or utcnow(),
            "stopped_at": None,
            "runtime": runtime,
            "precisions": precisions,
        }
        return self._write(values, "runtime")

    def stopped(self, now: datetime | None = None) -> bool:
        """A warm shutdown: marks this run's row stopped (not live, and no longer stale)."""
        try:
            with session_scope(self.db_url) as session:
                repo.mark_worker_stopped(session, self.node, self.pid, now or utcnow())
        except Exception as exc:
            log.warning("heartbeat of %s: stop not written: %s", self.node, _one_line(exc))
            return False
        return True

    # the periodic beats (main process only: threads do not survive the pool's fork)

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="drscreen-heartbeat", daemon=True)
            self._thread.start()

    def stop(self, timeout: float | None = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.beat()
            except Exception:  # beat logs its own failures; nothing may end this thread
                log.exception("heartbeat of %s failed", self.node)


_current: Heartbeat | None = None


def begin(node: str, *, started_at: datetime, concurrency: int | None) -> Heartbeat | None:
    """At the worker's start (``celeryd_init``, main process): the first beat, written now."""
    global _current
    try:
        _current = Heartbeat(
            node,
            started_at=started_at,
            concurrency=concurrency,
            interval_s=get_worker_settings().heartbeat_interval_s,
        )
    except Exception:  # a heartbeat must never keep a worker from starting
        log.exception("heartbeat of %s not set up", node)
        return None
    _current.beat(first=True)
    return _current


def start_beating() -> None:
    """Once the worker is ready (main process): beat every interval until :func:`end`."""
    if _current is not None:
        _current.start()


def report_loaded(ensemble: Any) -> None:
    """In a pool child after loading the model: the runtime (and precisions) it serves with."""
    if _current is None:
        return
    runtime = getattr(ensemble, "served_runtime", None)
    if runtime:
        _current.report_runtime(str(runtime), getattr(ensemble, "precisions", None))


def end() -> None:
    """Warm shutdown (main process): stop beating and say so."""
    if _current is not None:
        _current.stop()
        _current.stopped()
