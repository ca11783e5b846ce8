"""Folder jobs: a folder's files as job items, their counts, failures and grades."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from sqlalchemy import ColumnElement, Subquery, and_, case, false, func, literal, not_, or_, select, true
from sqlalchemy.orm import Session

from core.errors import NotFound
from core.repository._sql import _insert, in_batches
from core.repository.predictions import shown_first
from core.tables import IMAGE_STATUSES, Image, Prediction, ScoringJob, ScoringJobItem, utcnow

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


def job_items(
    session: Session, job_id: str, status: str | None = None, *, offset: int = 0, limit: int | None = None
) -> list[ScoringJobItem]:
    """The job's items in file order; ``offset``/``limit``: one page of them, cut in SQL (a page of
    a 10,000-file job's results loaded every item to keep 1,000)."""
    stmt = select(ScoringJobItem).where(ScoringJobItem.job_id == job_id).order_by(ScoringJobItem.id)
    if status is not None:
        stmt = stmt.where(ScoringJobItem.status == status)
    return list(session.scalars(stmt.offset(offset or None).limit(limit)))


def count_job_items(session: Session, job_id: str) -> int:
    stmt = select(func.count()).select_from(ScoringJobItem).where(ScoringJobItem.job_id == job_id)
    return int(session.scalar(stmt) or 0)


def job_patients(session: Session, job_id: str) -> list[tuple[str, bool]]:
    """The patients the job's files name, in the order of each one's first file, with whether any
    of their files was stored (grouped in SQL: the patients' list read every item of the job)."""
    stored = func.max(case((ScoringJobItem.image_id.is_not(None), 1), else_=0))
    rows = session.execute(
        select(ScoringJobItem.patient_external_id, stored)
        .where(ScoringJobItem.job_id == job_id, ScoringJobItem.patient_external_id.is_not(None))
        .group_by(ScoringJobItem.patient_external_id)
        .order_by(func.min(ScoringJobItem.id))
    ).all()
    return [(str(name), bool(any_stored)) for name, any_stored in rows]


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
    return jobs_failures(session, [job_id], limit)[job_id]


Failures = list[tuple[str, str]]


def jobs_failures(session: Session, job_ids: Sequence[str], limit: int = 20) -> dict[str, Failures]:
    """:func:`job_failures` of several jobs in one statement (the jobs page ran one per job)."""
    out: dict[str, Failures] = {job_id: [] for job_id in job_ids}
    unfinished, image_status = _image_status()
    # numbered per job in file order, then cut: no LIMIT for the planner to answer by walking the
    # primary key (the review: 50 jobs, 3.2 s); the images are read for the rows kept only
    rank = func.row_number().over(partition_by=ScoringJobItem.job_id, order_by=ScoringJobItem.id)
    for batch in in_batches(list(out)):
        failed = (
            select(ScoringJobItem.job_id, ScoringJobItem.path, ScoringJobItem.error, ScoringJobItem.image_id)
            .add_columns(rank.label("rank"))
            .outerjoin(unfinished, unfinished.c.id == ScoringJobItem.image_id)
            .where(ScoringJobItem.job_id.in_(batch), _failed_item(image_status))
            .subquery()
        )
        rows = session.execute(
            select(failed.c.job_id, failed.c.path, failed.c.error, Image.error)
            .outerjoin(Image, Image.id == failed.c.image_id)
            .where(failed.c.rank <= limit)
            .order_by(failed.c.job_id, failed.c.rank)
        ).all()
        for job_id, path, item_error, image_error in rows:
            out[job_id].append((path, item_error or image_error or "failed"))
    return out


def refresh_job_counts(session: Session, job_id: str) -> ScoringJob:
    """Recount total/done/failed from the items and their images; finish the job when all are.
    Counted in SQL: workers call it for every chunk they claim and write, and reading every item
    made a 10,000-file job's chunks O(n^2) inside their write transactions (the review).
    The job's row is locked before counting (PostgreSQL; SQLite serialises writers): two chunks
    written at once on two workers each counted without the other's grades, and the later write
    stored its count over the first's, leaving the job ``running`` with half its photographs
    counted (the race review). ``FOR NO KEY UPDATE``, the lock its update took at the end anyway:
    ``FOR UPDATE`` would wait for the foreign-key share locks that the writes' image rows hold on
    the job, and two such writes would deadlock."""
    job = session.get(ScoringJob, job_id, with_for_update={"key_share": True}, populate_existing=True)
    if job is None:
        raise NotFound("job not found")
    job_open = job.status in OPEN_JOB_STATES
    unfinished, image_status = _image_status()
    total, failed, done = session.execute(
        select(
            func.count(),
            func.count().filter(_failed_item(image_status)),
            func.count().filter(_item_graded(image_status, true() if job_open else false())),
        )
        .select_from(ScoringJobItem)
        .outerjoin(unfinished, unfinished.c.id == ScoringJobItem.image_id)
        .where(ScoringJobItem.job_id == job_id)
    ).one()
    job.total, job.done, job.failed = int(total), int(done), int(failed)
    if job_open and total and done + failed >= total:
        job.status = "done"
        job.finished_at = utcnow()
    elif job.status == "queued" and total:
        job.status = "running"
    session.flush()
    return job


def _image_status() -> tuple[Subquery, ColumnElement[str | None]]:
    """A job item's image status without reading every item's image: the photographs not done
    (queued, running or failed: the queue and the failures, by ix_image_status), to outer-join on
    ``image_id``, and the status it gives; any other image an item names is done (``image_id`` is
    a foreign key, set NULL with its image, and a status is one of four). Joining the image table
    itself read all of it to recount a 10,000-file job (115 ms, for every chunk a worker wrote)."""
    not_done = [status for status in IMAGE_STATUSES if status != "done"]
    unfinished = select(Image.id, Image.status).where(Image.status.in_(not_done))
    sub = unfinished.subquery("unfinished")
    named = case((ScoringJobItem.image_id.is_not(None), literal("done")))
    return sub, func.coalesce(sub.c.status, named)


def _failed_item(image_status: ColumnElement[str | None]) -> ColumnElement[bool]:
    """A job item failed: the file was refused, or its photograph could not be scored."""
    return or_(ScoringJobItem.status == "failed", image_status == "failed")


def _item_graded(
    image_status: ColumnElement[str | None], job_open: ColumnElement[bool]
) -> ColumnElement[bool]:
    """Whether a job item counts as done. While the job is open, once its image is done: a job
    finishes when every photograph is graded (a photograph a newer release grades again is not,
    until it is). Once finished, also when the item is done: its photograph is being graded again
    by a newer release, its earlier grade stands until then, and the job's counts keep adding up to
    its ``done``. A failure on either side wins."""
    not_failed = and_(
        ScoringJobItem.status != "failed", or_(image_status.is_(None), image_status != "failed")
    )
    graded = or_(image_status == "done", and_(not_(job_open), ScoringJobItem.status == "done"))
    return and_(not_failed, graded)


GRADE_KEYS = (*(str(g) for g in range(5)), "ungradable")


def job_grade_counts(session: Session, job_id: str) -> dict[str, int]:
    """Counts of the grade shown (``get_prediction``) over the job's done items: keys "0".."4" and
    "ungradable"; they add up to the job's ``done`` (``refresh_job_counts``).

    Per item, not per image: two byte-identical files of a folder are one stored image but two
    items, and photographs first submitted by an earlier job are linked, not stored again."""
    return jobs_grade_counts(session, [job_id])[job_id]


def jobs_grade_counts(session: Session, job_ids: Sequence[str]) -> dict[str, dict[str, int]]:
    """:func:`job_grade_counts` of several jobs, counted in SQL: a poll of a 10,000-file job
    loaded every prediction with its members' probabilities (1.5 s), the jobs page once per job."""
    out = {job_id: dict.fromkeys(GRADE_KEYS, 0) for job_id in job_ids}
    if not out:
        return out
    unfinished, image_status = _image_status()
    # each item's predictions, the one shown first (get_prediction's rule); the rest are cut
    rank = func.row_number().over(partition_by=ScoringJobItem.id, order_by=shown_first(session))
    for batch in in_batches(list(out)):
        shown = (
            select(ScoringJobItem.job_id, Prediction.grade, rank.label("rank"))
            .join(ScoringJob, ScoringJob.id == ScoringJobItem.job_id)
            .outerjoin(unfinished, unfinished.c.id == ScoringJobItem.image_id)
            .join(Prediction, Prediction.image_id == ScoringJobItem.image_id)
            .where(
                ScoringJobItem.job_id.in_(batch),
                _item_graded(image_status, ScoringJob.status.in_(OPEN_JOB_STATES)),
            )
            .subquery()
        )
        rows = session.execute(
            select(shown.c.job_id, shown.c.grade, func.count())
            .where(shown.c.rank == 1)
            .group_by(shown.c.job_id, shown.c.grade)
        ).all()
        for job_id, grade, n in rows:
            out[job_id]["ungradable" if grade is None else str(grade)] += int(n)
    return out


def count_open_jobs(session: Session) -> int:
    """Folder jobs still ``queued`` or ``running``."""
    return int(
        session.scalar(
            select(func.count()).select_from(ScoringJob).where(ScoringJob.status.in_(OPEN_JOB_STATES))
        )
        or 0
    )
