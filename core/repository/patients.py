"""Patients: one row per clinic and external id, created race-safe."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.errors import InvalidInput
from core.repository._sql import _insert, in_batches
from core.tables import Patient, utcnow


def get_or_create_patient(session: Session, clinic_id: int, external_id: str) -> Patient:
    """Race-safe (INSERT ... ON CONFLICT DO NOTHING, then SELECT)."""
    return ensure_patient(session, clinic_id, external_id)[0]


def ensure_patient(session: Session, clinic_id: int, external_id: str) -> tuple[Patient, bool]:
    """:func:`get_or_create_patient`, and whether this transaction created the row (an erasure
    cannot delete a row it cannot see yet; services.routes.images.refuse_if_erased)."""
    external_id = external_id.strip()
    if not external_id:
        raise InvalidInput("patient_id is empty")
    stmt = _insert(session, Patient).values(clinic_id=clinic_id, external_id=external_id, created_at=utcnow())
    # RETURNING says whether a row went in (rowcount is not reliable across the two drivers)
    stmt = stmt.on_conflict_do_nothing(index_elements=["clinic_id", "external_id"]).returning(Patient.id)
    created = session.execute(stmt).first() is not None
    patient = session.scalars(
        select(Patient).where(Patient.clinic_id == clinic_id, Patient.external_id == external_id)
    ).one()
    return patient, created


def get_patient(session: Session, clinic_id: int, external_id: str) -> Patient | None:
    return session.scalars(
        select(Patient).where(Patient.clinic_id == clinic_id, Patient.external_id == external_id)
    ).one_or_none()


def get_patient_by_id(session: Session, patient_id: int) -> Patient | None:
    return session.get(Patient, patient_id)


def get_patients(session: Session, clinic_id: int, external_ids: Sequence[str]) -> dict[str, Patient]:
    """external id -> the clinic's patient, for those of ``external_ids`` it has (one query per
    thousand, not one each: a job's list of patients)."""
    out: dict[str, Patient] = {}
    for batch in in_batches(list(dict.fromkeys(external_ids))):
        stmt = select(Patient).where(Patient.clinic_id == clinic_id, Patient.external_id.in_(batch))
        out.update((p.external_id, p) for p in session.scalars(stmt))
    return out


def lock_patients_for_result(session: Session, patient_ids: Sequence[int]) -> None:
    """Hold the patients' rows until this transaction ends, before reading their photographs to
    record a result (PostgreSQL; SQLite serialises writers). Two workers recording one patient at
    once each read the patient while the other's grades were uncommitted: each counted the
    other's photographs as ungradable (a false referral) and both results stayed current (the
    race review). One statement in id order, so two batches of the same patients cannot
    deadlock; ``FOR NO KEY UPDATE`` leaves uploads for the patients (their foreign-key checks)
    unblocked, while an erasure (``FOR UPDATE``) waits for the write as it does for its
    photographs. Called after the batch's photographs are locked, the order an erasure takes."""
    ids = sorted(set(patient_ids))
    for batch in in_batches(ids):
        session.execute(
            select(Patient.id)
            .where(Patient.id.in_(batch))
            .order_by(Patient.id)
            .with_for_update(key_share=True)
        ).all()


def external_ids_of(session: Session, patient_ids: Sequence[int]) -> dict[int, str]:
    """patient id -> external id, for those that exist (a job's results named each photograph's
    patient with one query apiece)."""
    out: dict[int, str] = {}
    for batch in in_batches(list(dict.fromkeys(patient_ids))):
        rows = session.execute(select(Patient.id, Patient.external_id).where(Patient.id.in_(batch)))
        out.update((int(pid), str(ext)) for pid, ext in rows)
    return out
