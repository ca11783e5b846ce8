"""What the clinic's graders should grade next, and the random sample that keeps the agreement honest.

If graders grade only what the model referred, they can never find what it missed: sensitivity
measured on their grades is 100% whatever the model does (verification bias). So besides every
referred photograph, graders are asked to grade a random sample of the photographs the model did
not refer; the agreement then estimates sensitivity and specificity over all photographs from the
two strata (``core.grader``, Begg and Greenes' correction).

The sample is fixed by the photograph's id: ids are random (uuid4 hex), so "id below a threshold"
is a uniform random sample that SQL can select, that never changes once drawn, and that ad-hoc
grading of other photographs cannot bias (the estimate uses the sample only).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, and_, exists, func, not_, or_, select
from sqlalchemy.orm import Session

from core.tables import GraderGrade, Image, ModelVersion, Patient, Prediction

#: Hex digits of the id compared with the threshold (the first 8 of a uuid4 are all random).
SAMPLE_DIGITS = 6


def sample_threshold(percent: float) -> str:
    """Ids below this string are the sample: ``percent`` of all ids."""
    scale = 16**SAMPLE_DIGITS
    return format(min(scale, round(scale * percent / 100)), f"0{SAMPLE_DIGITS}x")


def in_sample(image_id: str, percent: float) -> bool:
    """Python's side of :func:`sampled` (the same rule)."""
    return image_id[:SAMPLE_DIGITS] < sample_threshold(percent) if percent < 100 else True


def sampled(percent: float) -> ColumnElement[bool]:
    if percent >= 100:
        return Image.id.is_not(None)
    return func.substr(Image.id, 1, SAMPLE_DIGITS) < sample_threshold(percent)


def referred() -> ColumnElement[bool]:
    """The release referred the photograph: ungradable to the quality gate or to the release, or
    graded referable (with a prediction of the release joined)."""
    return or_(Image.gradable.is_not(True), Prediction.gradable.is_(False), Prediction.referable.is_(True))


def _graded_by_the_release(release: ModelVersion) -> Any:
    return (
        select(Image)
        .join(Prediction, and_(Prediction.image_id == Image.id, Prediction.model_version_id == release.id))
        .where(Image.status == "done")
    )


@dataclass(frozen=True)
class Strata:
    """Photographs the release graded, by its decision: all referred, and the not-referred ones
    of the random sample (the two populations the agreement's estimate scales up to)."""

    referred: int
    not_referred: int
    not_referred_in_sample: int


def strata(
    session: Session,
    clinic_id: int | None,
    release: ModelVersion,
    percent: float,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
) -> Strata:
    stmt = _graded_by_the_release(release).with_only_columns(
        func.count().filter(referred()),
        func.count().filter(not_(referred())),
        func.count().filter(and_(not_(referred()), sampled(percent))),
    )
    if clinic_id is not None:
        stmt = stmt.where(Image.clinic_id == clinic_id)
    if since is not None:
        stmt = stmt.where(Image.created_at >= since)
    if until is not None:
        stmt = stmt.where(Image.created_at < until)
    row = session.execute(stmt).one()
    return Strata(int(row[0]), int(row[1]), int(row[2]))


@dataclass(frozen=True)
class QueueItem:
    image: Image
    patient_id: str


def queue(
    session: Session, clinic_id: int, release: ModelVersion, percent: float, *, limit: int, offset: int = 0
) -> tuple[list[QueueItem], int]:
    """The clinic's photographs graded by ``release`` and waiting for a grader: every referred
    one and the sample of the others, oldest first; and how many wait in all."""
    waiting = (
        _graded_by_the_release(release)
        .join(Patient, Patient.id == Image.patient_id)
        .where(
            Image.clinic_id == clinic_id,
            ~exists().where(GraderGrade.image_id == Image.id),
            or_(referred(), sampled(percent)),
        )
    )
    total = session.scalar(waiting.with_only_columns(func.count())) or 0
    rows = session.execute(
        waiting.add_columns(Patient.external_id)
        .order_by(Image.created_at, Image.id)
        .limit(limit)
        .offset(offset)
    ).all()
    return [QueueItem(image, external_id) for image, external_id in rows], int(total)
