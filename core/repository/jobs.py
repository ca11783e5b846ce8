"""Folder jobs: a folder's files as job items, their counts, failures and grades."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from core.errors import NotFound
from core.repository._sql import _insert
from core.repository.predictions import predictions_for_images
from core.tables import Image, ScoringJob, ScoringJobItem, utcnow

#: A folder job's states until it ends (``done`` or ``failed``).
OPEN_JOB_STATES = ("queued", "running")


@dataclass(frozen=True)
class JobItemSpec:
    path: str
    patient_external_id: str | None
    eye: str | None


def create_job(session: Session, clinic_id: int, folder: str, explain: bool = False) -> ScoringJob:
    row = ScoringJob(clinic_id=clinic_id, folder=folder, status="queued", explain=explain)
    session.add(row)
    session.flush()
    return row


def get_job(session: Session, job_id: str, clinic_id: int | None = None) -> ScoringJob | None:
    row = session.get(ScoringJob, job_id)
    if row is None or (clinic_id is not None and row.clinic_id != clinic_id):
        return None
    return row


#: Rows per multi-row INSERT: one statement binds 7 values a row, and SQLite allows 32,766 bound
#: values (a folder of 4,681 files failed with "too many SQL variables"), PostgreSQL 65,535.
INSERT_BATCH_ROWS = 1000


def add_job_items(session: Session, job_id: str, items: Iterable[JobItemSpec]) -> int:
    """Insert items (idempotent on (job, path): re-expanding a folder adds nothing twice)."""
    rows = [
        {
            "job_id": job_id,
            "path": it.path,
            "patient_external_id": it.patient_external_id,
            "eye": it.eye,
            "status": "pending",
            "created_at": utcnow(),
            "updated_at": utcnow(),
        }
        for it in items
    ]
    for start in range(0, len(rows), INSERT_BATCH_ROWS):
        stmt = _insert(session, ScoringJobItem).values(rows[start : start + INSERT_BATCH_ROWS])
        session.execute(stmt.on_conflict_do_nothing(index_elements=["job_id", "path"]))
    session.flush()
    return len(rows)


def job_items(session: Session, job_id: str, status: str | None = None) -> list[ScoringJobItem]:
    stmt = select(ScoringJobItem).where(ScoringJobItem.job_id == job_id).order_by(ScoringJobItem.id)
    if status is not None:
        stmt = stmt.where(ScoringJobItem.status == status)
    return list(session.scalars(stmt))


def set_job_item(
    session: Session,
    item: ScoringJobItem,
    *,
    status: str,
    image_id: str | None = None,
    error: str | None = None,
) -> ScoringJobItem:
    item.status = status
    if image_id is not None:
        item.image_id = image_id
    item.error = error[:4000] if error else None
    session.flush()
    return item


def job_failures(session: Session, job_id: str, limit: int = 20) -> list[tuple[str, str]]:
    """The first ``limit`` failed files of a job with why, as (path, reason): the file's own
    refusal, else its photograph's scoring failure (the jobs page said only "3 failed")."""
    rows = session.execute(
        select(ScoringJobItem.path, ScoringJobItem.error, Image.error)
        .outerjoin(Image, Image.id == ScoringJobItem.image_id)
        .where(
            ScoringJobItem.job_id == job_id,
            (ScoringJobItem.status == "failed") | (Image.status == "failed"),
        )
        .order_by(ScoringJobItem.id)
        .limit(limit)
    ).all()
    return [(path, item_error or image_error or "failed") for path, item_error, image_error in rows]


def refresh_job_counts(session: Session, job_id: str) -> ScoringJob:
    """Recount total/done/failed from the items and their images; finish the job when all are."""
    job = session.get(ScoringJob, job_id)
    if job is None:
        raise NotFound("job not found")
    rows = session.execute(
        select(ScoringJobItem.status, Image.status)
        .outerjoin(Image, Image.id == ScoringJobItem.image_id)
        .where(ScoringJobItem.job_id == job_id)
    ).all()
    total = len(rows)
    failed = sum(1 for item_status, img_status in rows if item_status == "failed" or img_status == "failed")
    job_open = job.status in OPEN_JOB_STATES
    done = sum(
        1 for item_status, img_status in rows if _item_graded(item_status, img_status, job_open=job_open)
    )
    job.total, job.done, job.failed = total, done, failed
    if job_open and total and done + failed >= total:
        job.status = "done"
        job.finished_at = utcnow()
    elif job.status == "queued" and total:
        job.status = "running"
    session.flush()
    return job


def _item_graded(item_status: str | None, image_status: str | None, *, job_open: bool) -> bool:
    """Whether a job item counts as done. While the job is open, once its image is done: a job
    finishes when every photograph is graded (a photograph a newer release grades again is not,
    until it is). Once finished, also when the item is done: its photograph is being graded again
    by a newer release, its earlier grade stands until then, and the job's counts keep adding up to
    its ``done``. A failure on either side wins."""
    if item_status == "failed" or image_status == "failed":
        return False
    return image_status == "done" or (not job_open and item_status == "done")


def job_grade_counts(session: Session, job_id: str) -> dict[str, int]:
    """Counts of the newest prediction's grade over the job's done items: keys "0".."4" and
    "ungradable"; they add up to the job's ``done`` (``refresh_job_counts``).

    Per item, not per image: two byte-identical files of a folder are one stored image but two
    items, and photographs first submitted by an earlier job are linked, not stored again."""
    job = session.get(ScoringJob, job_id)
    job_open = job is None or job.status in OPEN_JOB_STATES
    rows = session.execute(
        select(Image.id, ScoringJobItem.status, Image.status)
        .join(ScoringJobItem, ScoringJobItem.image_id == Image.id)
        .where(ScoringJobItem.job_id == job_id)
    ).all()
    item_images = [
        image_id
        for image_id, item_status, img_status in rows
        if _item_graded(item_status, img_status, job_open=job_open)
    ]
    counts = {str(g): 0 for g in range(5)} | {"ungradable": 0}
    preds = predictions_for_images(session, sorted(set(item_images)))
    for image_id in item_images:
        pred = preds.get(image_id)
        if pred is not None:
            counts["ungradable" if pred.grade is None else str(pred.grade)] += 1
    return counts


def count_open_jobs(session: Session) -> int:
    """Folder jobs still ``queued`` or ``running``."""
    return int(
        session.scalar(
            select(func.count()).select_from(ScoringJob).where(ScoringJob.status.in_(OPEN_JOB_STATES))
        )
        or 0
    )
