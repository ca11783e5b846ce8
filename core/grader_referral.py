"""A grader's referral: a grader's grade that refers the patient on its own.

Graders' grades are the agreement's reference (``core.agreement``) and never change the model's
result. But a grader who grades a photograph referable (2..4) or ungradable has found what a clinic
must act on: before session 32 the patient stayed off every referral list when the model had not
referred them, and only ``/metrics`` and the agreement named the miss. The patient is now referred
on the grader's word too, beside the model's decision (``PatientSummary.grader_refers``), read from
the grades when the patient is shown: a grade replaced or removed withdraws it at once, and the
model's recorded results and history stay what the clinic was told by the model.

Only the patient's latest visit counts (``repository.latest_visit``, as for the model's decision):
a grader grading an earlier visit's photograph is reviewing that visit, not today's patient.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import cast

from sqlalchemy import ColumnElement, or_, select
from sqlalchemy.orm import Session

from core import repository as repo
from core.aggregation import REFERABLE_GRADE
from core.repository._sql import in_batches
from core.schemas import Eye, GraderReferral
from core.settings import get_settings
from core.tables import GraderGrade, Image, Patient


def refers() -> ColumnElement[bool]:
    """A grader's grade refers: referable, or ungradable (clinics treat ungradable as "refer")."""
    return or_(GraderGrade.gradable.is_(False), GraderGrade.grade >= REFERABLE_GRADE)


_COLUMNS = (
    GraderGrade.image_id,
    Image.eye,
    GraderGrade.grade,
    GraderGrade.gradable,
    GraderGrade.grader,
    GraderGrade.updated_at,
)


def _referral(
    image_id: str, eye: str, grade: int | None, gradable: bool, grader: str, at: datetime
) -> GraderReferral:
    # eye: the image table's check constraint keeps it left or right
    return GraderReferral(
        image_id=image_id, eye=cast(Eye, eye), grade=grade, gradable=gradable, grader=grader, recorded_at=at
    )


def of_photographs(session: Session, image_ids: Sequence[str]) -> dict[str, GraderReferral]:
    """image id -> its grader's grade, for the photographs whose grade refers (one query per
    batch of ids, whatever the number of patients)."""
    out: dict[str, GraderReferral] = {}
    for batch in in_batches(list(dict.fromkeys(image_ids))):
        rows = session.execute(
            select(*_COLUMNS)
            .join(Image, Image.id == GraderGrade.image_id)
            .where(GraderGrade.image_id.in_(batch), refers())
        )
        out.update((row[0], _referral(*row)) for row in rows)
    return out


def in_visit(
    referrals: Mapping[str, GraderReferral], visit: Sequence[repo.VisitPhoto]
) -> list[GraderReferral]:
    """The referrals of the visit's photographs, newest grade first."""
    found = [referrals[im.id] for im in visit if im.id in referrals]
    return sorted(found, key=lambda r: (r.recorded_at, r.image_id), reverse=True)


@dataclass(frozen=True)
class Listed:
    """A patient the graders refer, for a worklist: the newest of the grades and all of them."""

    patient_id: int
    external_id: str
    recorded_at: datetime
    referrals: list[GraderReferral]


def recent(session: Session, clinic_id: int, since: datetime) -> list[Listed]:
    """The clinic's patients whose latest visit has a photograph whose grader's grade, recorded
    since ``since``, refers them; newest grade first. Two statements (and one per batch of
    patients), whatever the number of patients: the grades that refer, then the candidates'
    photographs to tell their latest visit (its window is elapsed time, computed as
    ``repository.latest_visit`` does rather than in two databases' date arithmetic)."""
    rows = session.execute(
        select(*_COLUMNS, Image.patient_id, Patient.external_id)
        .join(Image, Image.id == GraderGrade.image_id)
        .join(Patient, Patient.id == Image.patient_id)
        .where(GraderGrade.clinic_id == clinic_id, GraderGrade.updated_at >= since, refers())
    ).all()
    if not rows:
        return []
    photos = repo.visit_photos_of_patients(session, [r[6] for r in rows])
    window = get_settings().visit_window
    current = {im.id for visit in photos.values() for im in repo.latest_visit(visit, window)}
    by_patient: dict[int, tuple[str, list[GraderReferral]]] = {}
    for image_id, eye, grade, gradable, grader, at, patient_id, external_id in rows:
        if image_id in current:
            found = _referral(image_id, eye, grade, gradable, grader, at)
            by_patient.setdefault(patient_id, (external_id, []))[1].append(found)
    listed = [
        Listed(
            pid,
            name,
            max(r.recorded_at for r in refs),
            sorted(refs, key=lambda r: r.recorded_at, reverse=True),
        )
        for pid, (name, refs) in by_patient.items()
    ]
    return sorted(listed, key=lambda item: (item.recorded_at, item.patient_id), reverse=True)
