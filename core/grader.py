"""Human graders' grades of photographs, recorded by the clinics.

A screening programme does not take its automated grades on trust: graders grade the referred
patients and a sample of the others (``core.grading_queue``), and the programme watches the
agreement (``core.agreement``), above all the referable disease the service missed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.repository._sql import in_batches
from core.retention import lock_image
from core.schemas import GraderGradeOut
from core.tables import GraderGrade, Image, utcnow

#: A grade as the audit log and the answers name it: 0..4, or "ungradable".
GradeLabel = int | str


def label(row: GraderGrade) -> GradeLabel:
    return row.grade if row.gradable and row.grade is not None else "ungradable"


@dataclass(frozen=True)
class Recorded:
    row: GraderGrade
    previous: GradeLabel | None  # None: the photograph had no grader's grade
    changed: bool  # False: the same grade by the same grader again (nothing written)


def record(
    session: Session, image: Image, *, grade: int | None, grader: str, api_key_id: int | None
) -> Recorded | None:
    """Record (or replace) the grader's grade of ``image``; None when the photograph was erased
    meanwhile. The image row is locked before the previous grade is read, so concurrent grades of
    one photograph follow each other (each audit row names the grade it replaced) and an erasure
    either waits for this write (and deletes it too) or has already run. The same grade by the
    same grader again writes nothing (its time stays: a retry must not look like a new grade).
    The caller commits."""
    if not lock_image(session, image.id):
        return None
    before = get(session, image.id)
    previous = label(before) if before is not None else None
    if before is not None and before.grade == grade and before.grader == grader:
        return Recorded(before, previous, changed=False)
    # a plain insert or update: every writer of this row holds the photograph's lock first
    now = utcnow()
    row = before or GraderGrade(image_id=image.id, clinic_id=image.clinic_id, created_at=now)
    row.grade, row.gradable, row.grader = grade, grade is not None, grader
    row.api_key_id, row.updated_at = api_key_id, now
    session.add(row)
    session.flush()
    return Recorded(row, previous, changed=True)


def remove(session: Session, image_id: str) -> GradeLabel | None:
    """Delete the grader's grade of the photograph (recorded by mistake): the grade it had, or
    None when it had none (or the photograph is gone). Locked as :func:`record`."""
    if not lock_image(session, image_id):
        return None
    before = get(session, image_id)
    if before is None:
        return None
    session.delete(before)
    session.flush()
    return label(before)


def get(session: Session, image_id: str) -> GraderGrade | None:
    return session.scalar(select(GraderGrade).where(GraderGrade.image_id == image_id))


def for_images(session: Session, image_ids: Sequence[str]) -> dict[str, GraderGrade]:
    if not image_ids:
        return {}
    return {
        row.image_id: row
        for batch in in_batches(image_ids)  # a 100,000-file job's ids exceed a statement's parameters
        for row in session.scalars(select(GraderGrade).where(GraderGrade.image_id.in_(batch)))
    }


def as_out(row: GraderGrade) -> GraderGradeOut:
    return GraderGradeOut(
        grade=row.grade, gradable=row.gradable, grader=row.grader, recorded_at=row.updated_at
    )
