"""Looking a patient up by id, and erasing a patient in two steps (what would be deleted, then
the id typed again)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlalchemy.orm import Session

from core import repository as repo
from core import retention
from core.errors import Conflict, DomainError, NotFound
from core.schemas import PatientSummary
from services.deps import Principal, SessionDep, SettingsDep, audit
from services.routes import patients as patient_routes
from services.web import auth, pages, present
from services.web.pages import WebPrincipal

router = APIRouter(include_in_schema=False)


@router.get("/patients")
def patient_form(request: Request, principal: WebPrincipal, erased: str | None = None) -> Response:
    """``?erased=1``: where an erasure redirects (the patient id stays out of the URL)."""
    if principal is None:
        return auth.login_redirect(request)
    context = {"query": "", "summary": None, "error": None, "erased": erased == "1"}
    return pages.render(request, "patient.html", context, principal=principal)


@router.post("/patients")
def patient_lookup(
    request: Request,
    session: SessionDep,
    principal: WebPrincipal,
    patient_id: Annotated[str, Form()] = "",
) -> Response:
    """A POST, so patient identifiers stay out of URLs, browser history and access logs."""
    if principal is None:
        return auth.login_redirect(request)
    if not auth.same_origin(request):
        return pages.forbidden_origin(request, principal)
    query = patient_id.strip()
    summary: PatientSummary | None = None
    error = pages.check_patient_id(query)
    if error is None:
        try:
            summary = patient_routes.get_patient(query, session, principal)
        except NotFound:
            error = "No patient with this ID in your clinic."
    context = {
        "query": query,
        "summary": summary,
        "error": error,
        "verdict": present.patient_verdict(summary, False) if summary is not None else None,
    }
    return pages.render(
        request, "patient.html", context, principal=principal, status_code=200 if summary else 404
    )


# ---------------------------------------------------------------------------------- erasure


def _erase_page(
    request: Request,
    principal: Principal,
    patient_id: str,
    *,
    outcome: retention.Outcome | None,
    error: str | None = None,
    status_code: int = 200,
) -> HTMLResponse:
    """The confirmation step: what an erasure would delete (``outcome``, a rolled-back run) and
    the form that asks for the patient id typed again; with ``outcome`` None, only ``error``."""
    rows = [] if outcome is None else present.erasure_rows(outcome.rows, len(outcome.files))
    context = {"patient_id": patient_id, "rows": rows, "error": error}
    return pages.render(request, "erase.html", context, principal=principal, status_code=status_code)


def _erase_preview(
    request: Request, session: Session, principal: Principal, patient_id: str, error: str | None = None
) -> HTMLResponse:
    """Run the erasure and roll it back, as ``drscreen data erase`` previews: the counts shown
    are the real run's. Refused (409) while a photograph of the patient is being scored."""
    try:
        outcome = retention.erase_patient(session, principal.clinic_id, patient_id, by="web")
    except Conflict as exc:
        session.rollback()
        return pages.refused(
            _erase_page(request, principal, patient_id, outcome=None, error=exc.message), exc
        )
    session.rollback()  # a preview: nothing deleted, nothing audited as an erasure
    patient = repo.get_patient(session, principal.clinic_id, patient_id) if outcome.found else None
    if patient is None:
        return pages.not_found(request, principal, "No patient with this ID in your clinic.")
    # the page names the patient and counts their records: a read, audited like the lookup's
    detail = {"view": "erase-confirmation"}
    audit(session, principal, "patient.read", patient_id=patient.id, target_type="patient", detail=detail)
    status_code = 200 if error is None else 422
    return _erase_page(request, principal, patient_id, outcome=outcome, error=error, status_code=status_code)


def _refuse_erase_form(request: Request, principal: Principal | None, patient_id: str) -> Response | None:
    """Both erasure steps' checks: signed in, posted from this site, a well-formed patient id."""
    if principal is None:
        return auth.login_redirect(request)
    if not auth.same_origin(request):
        return pages.forbidden_origin(request, principal)
    if pages.check_patient_id(patient_id.strip()) is not None:
        return pages.not_found(request, principal, "No patient with this ID in your clinic.")
    return None


@router.post("/patients/erase")
def erase_confirmation(
    request: Request,
    session: SessionDep,
    principal: WebPrincipal,
    patient_id: Annotated[str, Form()] = "",
) -> Response:
    """Step 1 of an erasure (the patient page's button): what would be deleted, and the form to
    confirm it. Deletes nothing."""
    refused = _refuse_erase_form(request, principal, patient_id)
    if refused is not None:
        return refused
    assert principal is not None  # refused otherwise
    return _erase_preview(request, session, principal, patient_id.strip())


@router.post("/patients/erase/confirm")
def erase(
    request: Request,
    session: SessionDep,
    principal: WebPrincipal,
    settings: SettingsDep,
    patient_id: Annotated[str, Form()] = "",
    confirm: Annotated[str, Form()] = "",
) -> Response:
    """Step 2: erase, as ``DELETE /v1/patients/{id}`` does (one transaction, the files after the
    commit, audited with the key's id and ``by: web``), once the patient id was typed again."""
    refused = _refuse_erase_form(request, principal, patient_id)
    if refused is not None:
        return refused
    assert principal is not None  # refused otherwise
    patient_id = patient_id.strip()
    if confirm.strip() != patient_id:
        problem = "Type the patient ID exactly as shown to confirm the erasure. Nothing was erased."
        return _erase_preview(request, session, principal, patient_id, error=problem)
    try:
        patient_routes.erase(session, principal, settings, patient_id, by="web")
    except NotFound:
        session.rollback()
        return pages.not_found(request, principal, "No patient with this ID in your clinic.")
    except DomainError as exc:  # Conflict: a photograph is still being scored
        session.rollback()
        page = _erase_page(request, principal, patient_id, outcome=None, error=pages.error_text(exc))
        return pages.refused(page, exc)
    return RedirectResponse("/patients?erased=1", status_code=303)
