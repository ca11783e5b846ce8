"""Photographs and their scoring lifecycle: stored, claimed by a worker, done or failed,
queued again; and the ones the sweep must look at (orphaned, stale, failed lately)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.orm import Session

from core.errors import InvalidInput
from core.repository._sql import in_batches
from core.tables import EYES, Image, utcnow


def create_image(
    session: Session,
    *,
    clinic_id: int,
    patient_id: int,
    eye: str,
    sha256: str,
    stored_path: str,
    size_bytes: int,
    width: int | None = None,
    height: int | None = None,
    filename: str | None = None,
    content_type: str | None = None,
    bundle_id: str | None = None,
    job_id: str | None = None,
) -> Image:
    if eye not in EYES:
        raise InvalidInput(f"eye must be one of {', '.join(EYES)}")
    row = Image(
        clinic_id=clinic_id,
        patient_id=patient_id,
        eye=eye,
        sha256=sha256,
        stored_path=stored_path,
        size_bytes=size_bytes,
        width=width,
        height=height,
        filename=filename,
        content_type=content_type,
        bundle_id=bundle_id,
        job_id=job_id,
        status="queued",
    )
    session.add(row)
    session.flush()
    return row


def get_image(session: Session, image_id: str, clinic_id: int | None = None) -> Image | None:
    row = session.get(Image, image_id)
    if row is None or (clinic_id is not None and row.clinic_id != clinic_id):
        return None
    return row


def get_images(session: Session, image_ids: Sequence[str]) -> list[Image]:
    if not image_ids:
        return []
    rows = {
        r.id: r
        for batch in in_batches(image_ids)  # a 100,000-file job's ids exceed a statement's parameters
        for r in session.scalars(select(Image).where(Image.id.in_(batch)))
    }
    return [rows[i] for i in image_ids if i in rows]


def list_patient_images(session: Session, patient_id: int, eye: str | None = None) -> list[Image]:
    stmt = select(Image).where(Image.patient_id == patient_id).order_by(Image.created_at, Image.id)
    if eye is not None:
        stmt = stmt.where(Image.eye == eye)
    return list(session.scalars(stmt))


@dataclass(frozen=True, slots=True)
class VisitPhoto:
    """A photograph as picking and showing a patient's latest visit reads it: a plain row, not an
    ORM one (a job's list of patients reads tens of thousands of them)."""

    id: str
    eye: str
    status: str
    created_at: datetime

    @classmethod
    def of(cls, image: Image) -> VisitPhoto:
        return cls(image.id, image.eye, image.status, image.created_at)


def visit_photos_of_patients(session: Session, patient_ids: Sequence[int]) -> dict[int, list[VisitPhoto]]:
    """patient id -> every photograph of the patient, ordered as :func:`list_patient_images`
    orders them (a job's list of patients read each one's photographs with a query apiece)."""
    out: dict[int, list[VisitPhoto]] = {}
    for batch in in_batches(list(dict.fromkeys(patient_ids))):
        rows = session.execute(
            select(Image.patient_id, Image.id, Image.eye, Image.status, Image.created_at)
            .where(Image.patient_id.in_(batch))
            .order_by(Image.patient_id, Image.created_at, Image.id)
        )
        for patient_id, image_id, eye, status, created_at in rows:
            out.setdefault(patient_id, []).append(VisitPhoto(image_id, eye, status, created_at))
    return out


def claim_image(session: Session, image_id: str, worker: str | None = None) -> Image | None:
    """Status guard for workers: move a not-yet-done image to ``running``, claimed by ``worker``
    (a Celery node name). Returns None when the image is missing or already ``done`` (a
    redelivered message then does nothing)."""
    now = utcnow()
    result = session.execute(
        update(Image)
        .where(Image.id == image_id, Image.status != "done")
        .values(
            status="running", started_at=now, updated_at=now, attempts=Image.attempts + 1, claimed_by=worker
        )
        .execution_options(synchronize_session=False)
    )
    if not getattr(result, "rowcount", 0):
        return None
    session.flush()
    row = session.get(Image, image_id)
    if row is not None:
        session.refresh(row)
    return row


def mark_image_done(
    session: Session, image: Image, *, quality: dict[str, Any] | None, gradable: bool
) -> Image:
    image.status = "done"
    image.quality = quality
    image.gradable = gradable
    image.error = None
    image.finished_at = utcnow()
    session.flush()
    return image


def requeue_image(session: Session, image: Image) -> None:
    """Queue a finished image again to be scored by another model version (a fresh scoring, not a
    retry: its attempt count starts over)."""
    image.status = "queued"
    image.attempts = 0
    image.claimed_by = None
    image.updated_at = utcnow()
    session.flush()


def return_to_queue(session: Session, image: Image, *, count_attempt: bool = True) -> None:
    """Give a claimed image back unscored; the sweep sends it again once it has been queued for
    ``stale_queued_minutes``. Its attempt counts (the claim's limit still applies) unless
    ``count_attempt`` is False: it was not tried (its worker's release stopped being the active
    one while it was graded)."""
    image.status = "queued"
    if not count_attempt:
        image.attempts = max(0, image.attempts - 1)
    image.claimed_by = None
    image.updated_at = utcnow()
    session.flush()


def mark_image_failed(session: Session, image: Image, error: str) -> Image:
    image.status = "failed"
    image.error = error[:4000]
    image.finished_at = utcnow()
    session.flush()
    return image


def orphaned_images(
    session: Session,
    live_workers: Iterable[str],
    claimed_before: datetime,
    restarted: tuple[str, datetime] | None = None,
) -> list[Image]:
    """``running`` images claimed before ``claimed_before`` by a worker not in ``live_workers``;
    with ``restarted=(node, since)`` also those ``node`` claimed before ``since`` (an earlier run
    of a worker now running again under the same name)."""
    orphaned = and_(Image.claimed_by.not_in(list(live_workers)), Image.started_at < claimed_before)
    if restarted is not None:
        node, since = restarted
        orphaned = or_(orphaned, and_(Image.claimed_by == node, Image.started_at < since))
    claimed = and_(Image.status == "running", Image.claimed_by.is_not(None))
    return list(session.scalars(select(Image).where(claimed, orphaned)))


def stale_running_images(session: Session, older_than: timedelta) -> list[Image]:
    """Images stuck in ``running`` (their worker died) or ``queued`` for longer than ``older_than``."""
    cutoff = utcnow() - older_than
    return list(
        session.scalars(
            select(Image).where(Image.status.in_(["queued", "running"]), Image.updated_at < cutoff)
        )
    )


def count_failed_images_since(session: Session, since: datetime) -> int:
    """Photographs that ended ``failed`` since ``since`` (their row last changed then)."""
    return int(
        session.scalar(
            select(func.count()).select_from(Image).where(Image.status == "failed", Image.updated_at >= since)
        )
        or 0
    )
