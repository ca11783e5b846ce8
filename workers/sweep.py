"""Maintenance sweep: the plain function behind ``maintenance.sweep``.

Re-queues images whose message was lost: ``queued`` rows older than ``DRSCREEN_STALE_QUEUED_MINUTES``
(committed but never published, or the message vanished) and ``running`` rows older than
``DRSCREEN_STALE_RUNNING_MINUTES`` (their worker died). Each re-queued row's ``updated_at`` is
touched, so a row still waiting behind a long queue gets at most one extra message per period;
an extra message is harmless because scoring skips ``done`` images. Folder jobs whose
``jobs.expand_folder`` message was lost (the API could not publish it, or the broker lost it) or
whose expansion died with items still ``pending`` get their expansion re-sent the same way
(expansion is idempotent). Photographs a worker of another release left for the active one
(``repository.leave_for_active_release``: their message is spent) are re-sent as soon as a worker
of the active release is live, not after the staleness limit. Also prunes the embedded broker's
claimed-message files.

Dead workers are found sooner than by staleness: each claim records the worker's Celery node name
(``image.claimed_by``), and the sweep task pings the workers first (``ping_workers``); ``running``
rows claimed more than ``CLAIM_MARGIN`` before the ping by a node that did not answer are
re-queued at once. A worker killed outright (SIGKILL, power loss) leaves its messages
unacknowledged in Redis for the visibility timeout (an hour) and its rows ``running``; with this
its photographs come back within one sweep interval instead of ``DRSCREEN_STALE_RUNNING_MINUTES``.
When the answer cannot be trusted (the broker carries no broadcasts, as the embedded file broker,
or the sweeping worker did not hear itself), only the staleness rule applies.

Schedule: each worker's main process publishes ``maintenance.sweep`` every
``DRSCREEN_SWEEP_INTERVAL_S`` seconds (see ``workers.app``); several workers sweeping is safe.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from core import repository as repo
from core import tasks
from core.celery_config import prune_processed
from core.db import session_scope
from core.settings import get_settings
from core.tables import Image, ScoringJob, ScoringJobItem, as_utc, utcnow
from workers.scoring import Enqueue, send_by_name
from workers.settings import get_worker_settings

log = logging.getLogger(__name__)


#: Claims younger than this before a ping are never treated as orphaned: a worker that started
#: after the ping, or a clock a little behind, must not lose its photographs to a second delivery.
CLAIM_MARGIN = timedelta(seconds=30)
PING_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class LiveWorkers:
    """Node names that answered a ping sent at ``asked_at``; the asking worker ``me`` has run
    since ``me_since``, so its node name's claims from before then belong to an earlier run
    (a worker restarted under the same name after a crash answers for it)."""

    names: frozenset[str]
    asked_at: datetime
    me: str | None = None
    me_since: datetime | None = None


def ping_workers(
    app: Any, me: str | None, since: datetime | None = None, timeout: float = PING_TIMEOUT_S
) -> LiveWorkers | None:
    """Ping every worker through the broker; None when the answer cannot be trusted."""
    asked_at = utcnow()
    try:
        replies = app.control.ping(timeout=timeout) or []
    except Exception:  # no broadcast support or the broker is down: fall back to staleness
        log.debug("worker ping failed", exc_info=True)
        return None
    answered = [name for reply in replies for name in reply]
    clashes = sorted({name for name in answered if answered.count(name) > 1})
    if clashes:
        # each answers for the other: if one dies, its photographs wait for the staleness limit
        log.error(
            "more than one worker answers as %s; start each with its own `drscreen worker --hostname`",
            ", ".join(clashes),
        )
    names = frozenset(answered)
    if not me or me not in names:
        return None  # the asking worker did not hear itself: broadcasts are not delivered here
    return LiveWorkers(names, asked_at, me, since)


@dataclass
class SweepSummary:
    requeued: list[str] = field(default_factory=list)
    orphaned: list[str] = field(default_factory=list)  # of requeued: claimed by a worker now gone
    declined: list[str] = field(default_factory=list)  # of requeued: left for the active release
    jobs: list[str] = field(default_factory=list)  # folder jobs whose expansion was re-sent
    pruned: int = 0


def _stale_jobs(session: Session, older_than: timedelta) -> list[ScoringJob]:
    """Unfinished jobs untouched for ``older_than`` that still need expanding: no items yet (the
    expansion message never arrived) or items still ``pending`` (the expansion stopped midway)."""
    items = select(ScoringJobItem.id).where(ScoringJobItem.job_id == ScoringJob.id)
    return list(
        session.scalars(
            select(ScoringJob).where(
                ScoringJob.status.in_(["queued", "running"]),
                ScoringJob.updated_at < utcnow() - older_than,
                or_(~items.exists(), items.where(ScoringJobItem.status == "pending").exists()),
            )
        )
    )


def _job_explain(session: Session, job_ids: set[str]) -> dict[str, bool]:
    if not job_ids:
        return {}
    rows = session.execute(select(ScoringJob.id, ScoringJob.explain).where(ScoringJob.id.in_(job_ids)))
    return {job_id: bool(explain) for job_id, explain in rows}


def sweep(
    *,
    queued_after: timedelta | None = None,
    running_after: timedelta | None = None,
    db_url: str | None = None,
    enqueue: Enqueue | None = None,
    chunk: int | None = None,
    live: LiveWorkers | None = None,
) -> SweepSummary:
    ws = get_worker_settings()
    queued_after = queued_after if queued_after is not None else timedelta(minutes=ws.stale_queued_minutes)
    running_after = (
        running_after if running_after is not None else timedelta(minutes=ws.stale_running_minutes)
    )
    send = enqueue if enqueue is not None else send_by_name
    size = chunk or ws.score_chunk
    summary = SweepSummary()

    with session_scope(db_url) as session:
        now = utcnow()
        stale = []
        for image in repo.stale_running_images(session, min(queued_after, running_after)):
            age = now - as_utc(image.updated_at)
            limit = running_after if image.status == "running" else queued_after
            if age >= limit:
                stale.append(image)
        seen = {image.id for image in stale}

        def add(images: Sequence[Image], why: list[str]) -> None:
            for image in images:
                if image.id not in seen:
                    seen.add(image.id)
                    stale.append(image)
                    why.append(image.id)

        add(repo.declined_to_resend(session, now), summary.declined)  # left for the active release
        if live is not None:
            restarted = (live.me, live.me_since) if live.me and live.me_since else None
            claimed_before = live.asked_at - CLAIM_MARGIN
            add(repo.orphaned_images(session, live.names, claimed_before, restarted), summary.orphaned)
        # Job images follow their job's explain option, as its own fan-out did; other images
        # follow the worker's default (no explicit option).
        explain_of = _job_explain(session, {i.job_id for i in stale if i.job_id})
        groups: dict[bool | None, list[str]] = {}
        for image in stale:
            image.updated_at = now
            # Until the re-sent message is claimed, only the staleness rule may send it again.
            image.claimed_by = None
            groups.setdefault(explain_of[image.job_id] if image.job_id else None, []).append(image.id)
        # Before this sweep existed for jobs, a job whose expand message was lost stayed
        # ``queued`` for ever although the API promised "the sweep will re-queue it".
        jobs = _stale_jobs(session, queued_after)
        for job in jobs:
            job.updated_at = now
        resend = [(job.id, job.explain) for job in jobs]
        session.flush()
    for job_id, job_explain in resend:
        send(tasks.EXPAND_FOLDER, [job_id], {"explain": job_explain})
        summary.jobs.append(job_id)
    # Published after the commit, like every other task.
    for explain, ids in groups.items():
        for start in range(0, len(ids), size):
            part: Sequence[str] = ids[start : start + size]
            send(tasks.SCORE_IMAGES, [list(part)], {} if explain is None else {"explain": explain})
            summary.requeued.extend(part)
    summary.pruned = prune_processed(get_settings())
    if summary.requeued or summary.jobs or summary.pruned:
        log.info(
            "sweep: re-queued %d image(s) (%d of a worker gone) and %d folder job(s), "
            "pruned %d broker file(s)",
            len(summary.requeued),
            len(summary.orphaned),
            len(summary.jobs),
            summary.pruned,
        )
    return summary
