"""``/v1/patients/{patient_id}``: the patient-level result and its history."""

from __future__ import annotations

from fastapi import APIRouter

from core import repository as repo
from core.errors import NotFound
from core.schemas import PatientSummary
from services.deps import PrincipalDep, SessionDep, audit
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
