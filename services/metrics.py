"""Prometheus metrics of one app instance (its own registry, so tests can build many apps).

Request count and latency are measured as requests pass; queue depth, images scored, grade counts
and the model version are read from the broker, the database and ``models/`` when scraped (they
describe the whole system, which every API process can see, not this process's traffic).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from core import agreement as agreement_of
from core import heartbeat
from core import repository as repo
from core.celery_config import broker_folders
from core.settings import Settings
from core.tables import Image, Prediction, as_utc, utcnow
from core.tasks import ALL_QUEUES
from services.modelinfo import active_ref

log = logging.getLogger(__name__)

#: prometheus_client's multiprocess mode: set by ``drscreen serve --workers N`` (N > 1) to a fresh
#: folder before the processes start (the client reads it when it is first imported).
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def queue_depths(settings: Settings) -> dict[str, int]:
    """Messages waiting per queue: Redis LLEN, or message files of the embedded broker."""
    if settings.is_embedded_broker:
        folder = broker_folders(settings)["queue"]
        names = [p.name for p in folder.iterdir()] if folder.is_dir() else []
        return {q: sum(1 for n in names if n.endswith(f".{q}.msg")) for q in ALL_QUEUES}
    if settings.broker_url.startswith(("redis://", "rediss://")):
        import redis

        client = redis.Redis.from_url(settings.broker_url, socket_connect_timeout=1, socket_timeout=1)
        try:
            return {q: int(client.llen(q)) for q in ALL_QUEUES}
        finally:
            client.close()
    return {}


def image_counts(session: Session) -> tuple[dict[str, int], dict[int | None, int], datetime | None]:
    """Photographs by status, predictions by grade (None: ungradable), and since when the
    longest-waiting queued photograph waits (None: none). Whole-table counts only the metrics and
    `drscreen status` need; kept here rather than in the repository."""
    by_status = dict(session.execute(select(Image.status, func.count()).group_by(Image.status)).all())
    by_grade = dict(session.execute(select(Prediction.grade, func.count()).group_by(Prediction.grade)).all())
    since = session.scalar(select(func.min(Image.updated_at)).where(Image.status == "queued"))
    return by_status, by_grade, since


#: The windows of the recent counts below (fixed: the alert rules in deploy/prometheus name them).
FAILED_WINDOW = timedelta(hours=1)
GRADED_WINDOW = timedelta(hours=6)


def recent_counts(session: Session, now: datetime) -> tuple[int, dict[int | None, int]]:
    """Photographs that ended ``failed`` in the last hour, and gradings by grade (None:
    ungradable) of the last 6 hours. Counted over a window in the database rather than left to
    PromQL's ``delta`` of the totals: an erasure or a purge lowers a total, and a delta then
    hides failures, or turns a normal ungradable share into an alarming one (the review)."""
    failed = repo.count_failed_images_since(session, now - FAILED_WINDOW)
    graded = session.execute(
        select(Prediction.grade, func.count())
        .where(Prediction.created_at >= now - GRADED_WINDOW)
        .group_by(Prediction.grade)
    ).all()
    return failed, {grade: int(n) for grade, n in graded}


#: How far back the graders' agreement gauges look (graders grade days or weeks after screening).
GRADER_WINDOW = timedelta(days=30)
#: The estimate needs the random sample's few graded photographs: a longer window.
ESTIMATE_WINDOW = timedelta(days=90)


class SystemCollector(Collector):
    """Reads the system's state at scrape time; attached to the database in the app's lifespan."""

    def __init__(self) -> None:
        self.settings: Settings | None = None
        self.sessions: sessionmaker[Session] | None = None

    def _grader_agreement(self) -> Iterator[GaugeMetricFamily]:
        """The grades the results report (what clinics were told) against the graders', every
        clinic: counts of the last 30 days' grades, and the estimate over 90 days' photographs."""
        families = {
            "graded": GaugeMetricFamily(
                "drscreen_grader_graded_last_30d",
                "photographs with a grader's grade recorded in the last 30 days and a grade of the service",
            ),
            "referable": GaugeMetricFamily(
                "drscreen_grader_referable_last_30d", "of them, photographs the grader refers (grade >= 2)"
            ),
            "missed": GaugeMetricFamily(
                "drscreen_grader_missed_referable_last_30d",
                "of those, photographs whose result did not refer them: missed disease",
            ),
        }
        newest_miss = GaugeMetricFamily(
            "drscreen_grader_newest_miss_timestamp_seconds",
            "Unix time at which the newest grader's grade of the last 30 days that refers a "
            "photograph its result did not refer was recorded; absent when there is none",
        )
        estimated = GaugeMetricFamily(
            "drscreen_grader_estimated_sensitivity_last_90d",
            "referral sensitivity over all photographs received in the last 90 days, estimated from "
            "the graders' grades of the referred ones and of the random sample of the others "
            "(GET /v1/agreement, 'estimated'); absent while it cannot be estimated",
        )
        strata = GaugeMetricFamily(
            "drscreen_grader_stratum_graded_last_90d",
            "photographs of the last 90 days graded by a grader, by the service's decision "
            "(not_referred: in the random sample only): what the estimate rests on",
            labels=["stratum"],
        )
        assert self.sessions is not None and self.settings is not None
        try:
            now = utcnow()
            with self.sessions() as session:
                counts = agreement_of.recent_counts(session, now - GRADER_WINDOW)
                e = agreement_of.estimate_since(
                    session, now - ESTIMATE_WINDOW, self.settings.grader_sample_percent
                )
            for name, family in families.items():
                family.add_metric([], getattr(counts, name))
            if counts.newest_missed is not None:
                newest_miss.add_metric([], counts.newest_missed.timestamp())
            if e.sensitivity is not None:
                estimated.add_metric([], e.sensitivity)
            # always both series (0 before anything was graded): the alert's selectors name them
            strata.add_metric(["referred"], e.referred.graded)
            strata.add_metric(["not_referred"], e.not_referred.graded)
        except Exception as exc:
            log.warning("graders' counts unavailable: %s: %s", type(exc).__name__, str(exc).splitlines()[:1])
        yield from families.values()
        yield newest_miss
        yield estimated
        yield strata

    def collect(self) -> Iterator[GaugeMetricFamily]:
        if self.settings is None or self.sessions is None:
            return
        depth = GaugeMetricFamily(
            "drscreen_queue_depth", "messages waiting in a broker queue", labels=["queue"]
        )
        try:
            for queue, n in queue_depths(self.settings).items():
                depth.add_metric([queue], n)
        except Exception as exc:  # a scrape every few seconds: one line each, not a traceback
            log.warning("queue depth unavailable: %s: %s", type(exc).__name__, str(exc).splitlines()[:1])
        yield depth

        images = GaugeMetricFamily("drscreen_images", "photographs by status", labels=["status"])
        grades = GaugeMetricFamily(
            "drscreen_predictions_by_grade",
            "gradings by grade (ungradable: no grade), one per photograph and release that graded it: "
            "a photograph a new release grades again counts once per release",
            labels=["grade"],
        )
        scored = GaugeMetricFamily("drscreen_images_scored", "photographs scored (status done)")
        failed_recent = GaugeMetricFamily(
            "drscreen_images_failed_last_hour", "photographs that ended failed in the last hour"
        )
        graded_recent = GaugeMetricFamily(
            "drscreen_predictions_last_6h_by_grade",
            "gradings of the last 6 hours by grade (ungradable: no grade)",
            labels=["grade"],
        )
        oldest = GaugeMetricFamily(
            "drscreen_oldest_queued_seconds",
            "age of the longest-waiting queued photograph (since it was queued or last returned to "
            "the queue); 0 when none waits. Growing: no worker takes the work",
        )
        try:
            now = utcnow()
            with self.sessions() as session:
                by_status, by_grade, since = image_counts(session)
                failed, graded = recent_counts(session, now)
            for status in ("queued", "running", "done", "failed"):
                images.add_metric([status], int(by_status.get(status, 0)))
            scored.add_metric([], int(by_status.get("done", 0)))
            for grade in range(5):
                grades.add_metric([str(grade)], int(by_grade.get(grade, 0)))
            grades.add_metric(["ungradable"], int(by_grade.get(None, 0)))
            oldest.add_metric([], (now - as_utc(since)).total_seconds() if since else 0.0)
            failed_recent.add_metric([], failed)
            for grade in range(5):
                graded_recent.add_metric([str(grade)], graded.get(grade, 0))
            graded_recent.add_metric(["ungradable"], graded.get(None, 0))
        except Exception as exc:
            log.warning("database counts unavailable: %s: %s", type(exc).__name__, str(exc).splitlines()[:1])
        yield images
        yield scored
        yield grades
        yield oldest
        yield failed_recent
        yield graded_recent

        recent = GaugeMetricFamily(
            "drscreen_recent_release_predictions",
            "releases that wrote the newest 1000 predictions (more than one: workers serve different "
            "releases, or a rolling upgrade); value: Unix time of each one's newest prediction",
            labels=["version"],
        )
        try:
            with self.sessions() as session:
                for version, at in repo.recent_releases(session).items():
                    recent.add_metric([version], as_utc(at).timestamp())
        except Exception as exc:
            log.warning("recent releases unavailable: %s: %s", type(exc).__name__, str(exc).splitlines()[:1])
        yield recent
        yield from self._grader_agreement()

        live = GaugeMetricFamily(
            "drscreen_workers_live",
            f"workers whose heartbeat was seen within {heartbeat.LIVE_INTERVALS} of their heartbeat "
            "intervals (drscreen status lists them)",
        )
        mismatch = GaugeMetricFamily(
            "drscreen_worker_settings_mismatch",
            "1 when a setting that must be alike (README, More machines) differs between live workers "
            "or between a live worker and this API; drscreen status names it",
        )
        serving = GaugeMetricFamily(
            "drscreen_workers_live_on_active_release",
            "live workers serving the activated release (all live workers when none is activated); "
            "0 while photographs wait: nothing can grade them (the workers serve another release)",
        )
        try:
            with self.sessions() as session:
                alive = heartbeat.live_workers(repo.worker_heartbeats(session), utcnow())
                differ = heartbeat.settings_mismatches(alive, heartbeat.shared_settings(self.settings))
                activated = repo.active_release(session)
            live.add_metric([], len(alive))
            mismatch.add_metric([], 1 if differ else 0)
            serving.add_metric([], sum(1 for w in alive if activated is None or w.release == activated))
        except Exception as exc:
            log.warning(
                "worker heartbeats unavailable: %s: %s", type(exc).__name__, str(exc).splitlines()[:1]
            )
        yield live
        yield mismatch
        yield serving

        info = GaugeMetricFamily("drscreen_model_info", "the active released ensemble", labels=["version"])
        ref = active_ref(self.settings)
        if ref:
            info.add_metric([ref], 1)
        yield info


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "drscreen_http_requests",
            "HTTP requests handled",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "drscreen_http_request_duration_seconds",
            "HTTP request latency",
            ["method", "route"],
            registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )
        self.system = SystemCollector()
        self.registry.register(self.system)

    def attach(self, settings: Settings, sessions: sessionmaker[Session]) -> None:
        self.system.settings = settings
        self.system.sessions = sessions

    def render(self) -> Response:
        registry = self.registry
        if os.environ.get(MULTIPROC_ENV):
            # `drscreen serve --workers N`: one scrape reaches one process, and each process
            # counted only its own requests (a scrape read whichever answered: counters that went
            # up and down, read by rate() as resets; the review). prometheus_client's multiprocess
            # mode sums every process's counts from the folder they share.
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            registry.register(self.system)
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


def route_template(scope: Scope) -> str:
    """The matched route's full template. Routes of an included router know only their own part
    (``/images/{image_id}``), so the prefix is recovered from the concrete path."""
    route = scope.get("route")
    own = getattr(route, "path", None)
    if not own:
        # Starlette's plain routes (/openapi.json, /docs) set the endpoint but not the route; with
        # no path parameters their path is their template
        if scope.get("endpoint") is not None and not scope.get("path_params"):
            return str(scope.get("path", "unmatched"))
        return "unmatched"
    path = str(scope.get("path", ""))
    try:
        rendered = own.format(**{k: str(v) for k, v in (scope.get("path_params") or {}).items()})
    except (KeyError, IndexError, ValueError):
        return str(own)
    return path[: len(path) - len(rendered)] + own if path.endswith(rendered) else str(own)


class MetricsMiddleware:
    """Counts and times every HTTP request by its route *template* (``/v1/images/{image_id}``),
    never the concrete path, which would carry ids and blow up the label space."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = {"code": 500}

        async def _send(message: Any) -> None:
            if message["type"] == "http.response.start":
                status["code"] = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, _send)
        finally:
            template = route_template(scope)
            method = Request(scope).method
            self.metrics.requests.labels(method, template, str(status["code"])).inc()
            self.metrics.latency.labels(method, template).observe(time.perf_counter() - start)
