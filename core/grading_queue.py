"""What the clinic's graders should grade next, and the random sample that keeps the agreement honest.

If graders grade only what the model referred, they can never find what it missed: sensitivity
measured on their grades is 100% whatever the model does (verification bias). So besides every
referred photograph, graders are asked to grade a random sample of the photographs the model did
not refer; the agreement then estimates sensitivity and specificity over all photographs from the
two strata (``core.agreement``, Begg and Greenes' correction).

The sample is drawn by a secret random number per photograph (``Image.sample_key``, set when it
is written): "key below a threshold" is a uniform random sample that SQL can select, that never
changes once drawn, and that ad-hoc grading of other photographs cannot bias (the estimate uses
the sample only). Not the id: pages show ids, and a grader who knew the rule could have told a
sampled photograph from a referral by it (the review).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, and_, exists, func, not_, or_, select
from sqlalchemy.orm import Session, aliased

from core.repository.releases import last_activated
from core.tables import SAMPLE_KEYS, GraderGrade, Image, ModelVersion, Patient, Prediction


def sample_threshold(percent: float) -> int:
    """Keys below this number are the sample: ``percent`` of all keys."""
    return min(SAMPLE_KEYS, round(SAMPLE_KEYS * percent / 100))


def in_sample(sample_key: int | None, percent: float) -> bool:
    """Python's side of :func:`sampled` (the same rule)."""
    return sample_key is not None and sample_key < sample_threshold(percent)


def sampled(percent: float) -> ColumnElement[bool]:
    threshold = sample_threshold(percent)
    if threshold >= SAMPLE_KEYS:  # every key: 2**31 itself is past PostgreSQL's integer
        return Image.sample_key.is_not(None)
    return and_(Image.sample_key.is_not(None), Image.sample_key < threshold)


def prediction_of(release: ModelVersion | None) -> ColumnElement[bool]:
    """How a photograph (Image) joins the grading it is compared with: ``release``'s, or for None
    the grading its result shows (services.views, ``repository.get_prediction``): the activated
    release's where it graded the photograph, else the newest, whichever release gave it: what
    the clinic was told. (The newest alone, after a rollback, compared graders with a grade the
    clinic no longer saw: session 31.)"""
    if release is not None:
        return and_(Prediction.image_id == Image.id, Prediction.model_version_id == release.id)
    activated = last_activated(ModelVersion.id).scalar_subquery()
    # "no newer grading of it", not "= max(id)": PostgreSQL without statistics (after a restore,
    # before autovacuum) planned the max once per row through the primary key (40,000 graded
    # photographs: 495 s, against 35 ms for this form; the review)
    other = aliased(Prediction)
    later = select(other.id).where(other.image_id == Prediction.image_id, other.id > Prediction.id)
    by_activated = select(other.id).where(
        other.image_id == Prediction.image_id, other.model_version_id == activated
    )
    newest = and_(~by_activated.correlate(Prediction).exists(), ~later.correlate(Prediction).exists())
    return and_(Prediction.image_id == Image.id, or_(Prediction.model_version_id == activated, newest))


def model_gradable() -> ColumnElement[bool]:
    """The service graded the photograph (with its grading joined, :func:`prediction_of`): that
    grading's own quality gate passed it and it has a grade, as the API reports it
    (``repository.graded_gradable``). Not ``image.gradable``: that is the latest grading's verdict,
    and after a rollback not the one of the grading shown, nor a named release's."""
    return Prediction.gradable.is_(True)


def referred() -> ColumnElement[bool]:
    """The service referred the photograph: ungradable to it, or graded referable."""
    return or_(not_(model_gradable()), Prediction.referable.is_(True))


def _graded(release: ModelVersion | None) -> Any:
    return select(Image).join_from(Image, Prediction, prediction_of(release))


def in_period(stmt: Any, clinic_id: int | None, since: datetime | None, until: datetime | None) -> Any:
    """``stmt`` (over Image) narrowed to a clinic's photographs (None: every clinic's) received in
    [since, until): the population every graders' figure is about."""
    if clinic_id is not None:
        stmt = stmt.where(Image.clinic_id == clinic_id)
    if since is not None:
        stmt = stmt.where(Image.created_at >= since)
    if until is not None:
        stmt = stmt.where(Image.created_at < until)
    return stmt


@dataclass(frozen=True)
class Strata:
    """Photographs graded by the service (``release``'s gradings only, when given), by its
    decision: the two populations the agreement's estimate scales up to."""

    referred: int
    not_referred: int


def strata(
    session: Session,
    clinic_id: int | None,
    release: ModelVersion | None,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
) -> Strata:
    stmt = _graded(release).with_only_columns(
        func.count().filter(referred()),
        func.count().filter(not_(referred())),
    )
    row = session.execute(in_period(stmt, clinic_id, since, until)).one()
    return Strata(int(row[0]), int(row[1]))


@dataclass(frozen=True)
class QueueItem:
    image: Image
    patient_id: str


def queue(
    session: Session, clinic_id: int, percent: float, *, limit: int, offset: int = 0
) -> tuple[list[QueueItem], int]:
    """The clinic's graded photographs waiting for a grader: every one its result refers and the
    sample of the others, oldest first; and how many wait in all."""
    waiting = (
        _graded(None)
        .join_from(Image, Patient, Patient.id == Image.patient_id)
        .where(
            Image.clinic_id == clinic_id,
            ~exists().where(GraderGrade.image_id == Image.id),
            or_(referred(), sampled(percent)),
        )
    )
    total = session.scalar(select(func.count()).select_from(waiting.subquery())) or 0
    rows = session.execute(
        waiting.add_columns(Patient.external_id)
        .order_by(Image.created_at, Image.id)
        .limit(limit)
        .offset(offset)
    ).all()
    return [QueueItem(image, external_id) for image, external_id in rows], int(total)
