"""``/v1/patients/{patient_id}``: the patient-level result and its history; erasure."""

from __future__ import annotations

from fastapi import APIRouter
from sqlalchemy.orm import Session

from core import repository as repo
from core import retention
from core.errors import NotFound
from core.schemas import ErasedRows, PatientErasure, PatientSummary
from core.settings import Settings
from core.store import FileStore
from services.deps import Principal, PrincipalDep, SessionDep, SettingsDep, audit
from services.errors import error_responses
from services.views import patient_summary

router = APIRouter(prefix="/patients", tags=["patients"])


@router.get(
    "/{patient_id}",
    response_model=PatientSummary,
    summary="The patient's grade, referral, eyes and history (newest first)",
    responses=error_responses(401, 404, 429),
)
def get_patient(patient_id: str, session: SessionDep, principal: PrincipalDep) -> PatientSummary:
    patient = repo.get_patient(session, principal.clinic_id, patient_id)
    if patient is None:
        raise NotFound("no such patient")
    audit(
        session,
        principal,
        "patient.read",
        patient_id=patient.id,
        target_type="patient",
    )
    return patient_summary(session, patient)


@router.delete(
    "/{patient_id}",
    response_model=PatientErasure,
    summary="Erase the patient: every photograph, heatmap, result and history entry (cannot be undone)",
    description="Deletes everything drscreen holds about the patient of the calling clinic, in one "
    "transaction, then the stored files no other row shares. Answers the counts. 404 when the "
    "clinic has no such patient (so erasing twice answers 404 the second time); 409 while a "
    "photograph of the patient is still queued or being scored (retry once it is done). The "
    "erasure is recorded in the audit log with the counts, not the patient id.",
    responses=error_responses(401, 404, 409, 429, 503),
)
def erase_patient(
    patient_id: str, session: SessionDep, principal: PrincipalDep, settings: SettingsDep
) -> PatientErasure:
    return erase(session, principal, settings, patient_id, by="api")


def erase(
    session: Session, principal: Principal, settings: Settings, patient_id: str, *, by: str
) -> PatientErasure:
    """The erasure of ``DELETE`` and of the web interface's form (``by``: which one, in the audit
    row): NotFound for no such patient in the clinic, Conflict while one is being scored."""
    outcome = retention.erase_patient(
        session, principal.clinic_id, patient_id, api_key_id=principal.api_key_id, by=by
    )
    if not outcome.found:
        raise NotFound("no such patient")
    # the rows first: a file is removed only once nothing can roll its rows back
    session.commit()
    removed = retention.remove_unreferenced_files(session, FileStore(settings.store_path), outcome.files)
    return PatientErasure(patient_id=patient_id, rows=ErasedRows(**outcome.rows), files=removed)
