"""The home page (the clinic's recent visits and patients to refer) and its two upload forms,
a visit of up to four photographs and a single photograph (``POST /v1/bundles``, ``/v1/images``)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import timedelta
from typing import Annotated, Any

from fastapi import APIRouter, File, Form, Request, UploadFile
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlalchemy import select
from sqlalchemy.orm import Session

from core import grader_referral
from core import repository as repo
from core.errors import DomainError
from core.tables import Bundle, EyeResult, Patient, PatientResult, as_utc, refers_now, utcnow
from services.deps import ApiSettingsDep, Principal, ProducerDep, SessionDep, SettingsDep
from services.routes import bundles as bundle_routes
from services.routes import images as image_routes
from services.web import auth, pages
from services.web.pages import WebPrincipal

router = APIRouter(include_in_schema=False)

RECENT_LIMIT = 12

OptionalUpload = Annotated[UploadFile | None, File()]


def _given(upload: UploadFile | None) -> UploadFile | None:
    """A file input left empty arrives as a part with no file name: treat it as absent."""
    if upload is None or not upload.filename:
        return None
    return upload


def _accepted_id(response: Response) -> str:
    body: dict[str, Any] = json.loads(bytes(response.body))
    return str(body["id"])


def _recent_screenings(session: Session, clinic_id: int) -> list[dict[str, Any]]:
    """The clinic's latest bundles (a read only this page needs, so it lives here)."""
    rows = session.execute(
        select(Bundle.id, Bundle.status, Bundle.created_at, Patient.external_id)
        .join(Patient, Patient.id == Bundle.patient_id)
        .where(Bundle.clinic_id == clinic_id)
        .order_by(Bundle.created_at.desc())
        .limit(RECENT_LIMIT)
    ).all()
    return [{"id": r[0], "status": r[1], "created_at": r[2], "patient_id": r[3]} for r in rows]


#: How far back the home page's "patients to refer" reaches (results recorded since), and how many.
REFER_DAYS, REFER_LIMIT = 7, 50


def _to_refer(session: Session, clinic_id: int) -> list[dict[str, Any]]:
    """The clinic's patients whose current result refers them, recorded in the last
    ``REFER_DAYS`` days, and those a grader's grade recorded in that time refers
    (``core.grader_referral``), newest first: the day-end worklist across visits, single photographs and
    folder jobs (the clinician's review: the home page listed visits only, with no decision).
    Read from the partial index of :func:`core.tables.refers_now` (its predicate, as written here),
    not from every result of the history."""
    since = utcnow() - timedelta(days=REFER_DAYS)
    rows = session.execute(
        select(
            Patient.external_id,
            PatientResult.grade,
            PatientResult.gradable,
            PatientResult.computed_at,
            PatientResult.id,
            PatientResult.patient_id,
        )
        .join(Patient, Patient.id == PatientResult.patient_id)
        .where(
            Patient.clinic_id == clinic_id,
            refers_now(),
            PatientResult.computed_at >= since,
        )
        .order_by(PatientResult.computed_at.desc(), PatientResult.id.desc())
        .limit(REFER_LIMIT)
    ).all()
    rechecking = _rechecking(session, [(r[4], r[5]) for r in rows])
    listed: dict[str, dict[str, Any]] = {
        r[0]: {
            "patient_id": r[0],
            "grade": r[1],
            "gradable": r[2],
            "computed_at": as_utc(r[3]),
            "rechecking": r[4] in rechecking,
            "model_refers": True,
            "grader_referrals": [],
        }
        for r in rows
    }
    # A grader's referral (a referable or ungradable grade of a photograph of the latest visit)
    # lists the patient too, marked as the grader's: before, a patient the model did not refer
    # stayed off this list whatever the grader found (core.grader_referral).
    for found in grader_referral.recent(session, clinic_id, since):
        row = listed.setdefault(
            found.external_id,
            {"patient_id": found.external_id, "computed_at": found.recorded_at, "model_refers": False},
        )
        row["grader_referrals"] = found.referrals
        row["computed_at"] = max(row["computed_at"], found.recorded_at)
    newest_first = sorted(listed.values(), key=lambda r: r["computed_at"], reverse=True)
    return newest_first[:REFER_LIMIT]


def _rechecking(session: Session, results: Sequence[tuple[int, int]]) -> set[int]:
    """The ids of the given (result id, patient id) whose decision is being re-checked: a
    photograph it graded is graded again, or its re-grade failed (the decision is the last complete
    one, listed until the new one is: repository.held_referral). The patient page's and the API's
    rule (services.views): marked from any photograph of the patient, a re-grade of an earlier
    visit's marked today's referral here, for good if it failed, while the patient page said not."""
    regrading = repo.regrading_photo_ids(session, [patient_id for _, patient_id in results])
    if not regrading:
        return set()
    patient_of = {result_id: patient_id for result_id, patient_id in results if patient_id in regrading}
    graded = session.execute(
        select(EyeResult.patient_result_id, EyeResult.image_ids).where(
            EyeResult.patient_result_id.in_(patient_of)
        )
    )
    return {
        result_id
        for result_id, image_ids in graded
        if repo.grades_regrading(image_ids or (), regrading[patient_of[result_id]])
    }


def _home(
    request: Request,
    session: Session,
    principal: Principal,
    *,
    error: str | None = None,
    status_code: int = 200,
    form: dict[str, str] | None = None,
) -> HTMLResponse:
    """The home page; ``form``: what a refused upload's form held (its patient id and eye), put back
    so staff do not type it again (only the files must be chosen again: browsers allow no less)."""
    context = {
        "form": form or {},
        "error": error,
        "recent": _recent_screenings(session, principal.clinic_id),
        "to_refer": _to_refer(session, principal.clinic_id),
        "refer_days": REFER_DAYS,
        "slots": bundle_routes.SLOTS,
        "patient_pattern": image_routes.PATIENT_ID_PATTERN,
    }
    return pages.render(request, "home.html", context, principal=principal, status_code=status_code)


@router.get("/")
def home(request: Request, session: SessionDep, principal: WebPrincipal) -> Response:
    if principal is None:
        return auth.login_redirect(request)
    return _home(request, session, principal)


@router.post("/screenings/bundle")
def upload_bundle(
    request: Request,
    session: SessionDep,
    principal: WebPrincipal,
    settings: SettingsDep,
    producer: ProducerDep,
    patient_id: Annotated[str, Form()] = "",
    left_1: OptionalUpload = None,
    left_2: OptionalUpload = None,
    right_1: OptionalUpload = None,
    right_2: OptionalUpload = None,
) -> Response:
    if principal is None:
        return auth.login_redirect(request)
    if not auth.same_origin(request):
        return pages.forbidden_origin(request, principal)
    problem = pages.check_patient_id(patient_id)
    form = {"bundle_patient": patient_id}
    if problem:
        return _home(request, session, principal, error=problem, status_code=422, form=form)
    try:
        accepted = bundle_routes.create_bundle(
            session,
            principal,
            settings,
            producer,
            patient_id.strip(),
            left_1=_given(left_1),
            left_2=_given(left_2),
            right_1=_given(right_1),
            right_2=_given(right_2),
            idempotency_key=None,
        )
    except DomainError as exc:
        session.rollback()
        return pages.refused(_home(request, session, principal, error=pages.error_text(exc), form=form), exc)
    return RedirectResponse(f"/bundles/{_accepted_id(accepted)}", status_code=303)


@router.post("/screenings/image")
def upload_image(
    request: Request,
    session: SessionDep,
    principal: WebPrincipal,
    settings: SettingsDep,
    api: ApiSettingsDep,
    producer: ProducerDep,
    patient_id: Annotated[str, Form()] = "",
    eye: Annotated[str, Form()] = "",
    file: OptionalUpload = None,
) -> Response:
    if principal is None:
        return auth.login_redirect(request)
    if not auth.same_origin(request):
        return pages.forbidden_origin(request, principal)
    problem = pages.check_patient_id(patient_id)
    if eye not in ("left", "right"):
        problem = problem or "Choose the eye (left or right)."
    upload = _given(file)
    if upload is None:
        problem = problem or "Choose a photograph."
    form = {"image_patient": patient_id, "image_eye": eye}
    if problem or upload is None:
        return _home(request, session, principal, error=problem, status_code=422, form=form)
    try:
        accepted = image_routes.create_image(
            request,
            session,
            principal,
            settings,
            api,
            producer,
            upload,
            patient_id.strip(),
            "left" if eye == "left" else "right",
            idempotency_key=None,
            wait=None,
        )
    except DomainError as exc:
        session.rollback()
        return pages.refused(_home(request, session, principal, error=pages.error_text(exc), form=form), exc)
    return RedirectResponse(f"/images/{_accepted_id(accepted)}", status_code=303)
