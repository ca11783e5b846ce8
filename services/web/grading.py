"""The graders' pages: agreement of the clinic's results with its graders, the grading queue
and the blind grading page of one photograph."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, Response
from sqlalchemy.orm import Session

from core import repository as repo
from core.tables import Image, as_utc
from services.deps import Principal, SessionDep, SettingsDep
from services.errors import MAX_OFFSET
from services.routes import agreement as agreement_routes
from services.routes import grading_queue as queue_routes
from services.routes import images as image_routes
from services.web import auth, pages, present, results
from services.web.pages import WebPrincipal

router = APIRouter(include_in_schema=False)

#: The grading queue's page, where the blind grading page's form returns.
QUEUE_PATH = "/grading-queue"
#: Photographs listed per page of the grading queue.
QUEUE_PAGE = 50


@router.get("/agreement")
def agreement_page(
    request: Request, session: SessionDep, principal: WebPrincipal, settings: SettingsDep
) -> Response:
    """``GET /v1/agreement`` for the signed-in clinic (the grades its results reported against its
    graders')."""
    if principal is None:
        return auth.login_redirect(request)
    figures = agreement_routes.get_agreement(session, principal, settings)
    context = {"figures": figures, "grade_names": present.GRADE_NAMES}
    return pages.render(request, "agreement.html", context, principal=principal)


@router.get(QUEUE_PATH)
def grading_queue_page(
    request: Request,
    session: SessionDep,
    principal: WebPrincipal,
    settings: SettingsDep,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
) -> Response:
    """``GET /v1/grading-queue`` for the signed-in clinic: what its graders should grade next."""
    if principal is None:
        return auth.login_redirect(request)
    queue = queue_routes.get_grading_queue(session, principal, settings, limit=QUEUE_PAGE, offset=offset)
    return pages.render(request, "grading_queue.html", {"queue": queue}, principal=principal)


def grading_page(
    request: Request,
    session: Session,
    principal: Principal,
    image: Image,
    *,
    refused: results.GradingForm | None = None,
) -> HTMLResponse:
    """One photograph to grade, blind: the photograph and the form, not the model's grade."""
    patient = repo.get_patient_by_id(session, image.patient_id)
    result = image_routes.get_image(image.id, session, principal)  # audited as a read, as the page is
    context = {
        "image": result,
        "patient_id": patient.external_id if patient is not None else "",
        "received_at": as_utc(image.created_at),
        "refused": refused,
        "back": QUEUE_PATH,
    }
    return pages.render(
        request, "grade.html", context, principal=principal, status_code=422 if refused else 200
    )


@router.get("/grade/{image_id}")
def grade_page(request: Request, session: SessionDep, principal: WebPrincipal, image_id: str) -> Response:
    if principal is None:
        return auth.login_redirect(request)
    image = repo.get_image(session, image_id, principal.clinic_id)
    if image is None:
        return pages.not_found(request, principal, "No such photograph (or it belongs to another clinic).")
    return grading_page(request, session, principal, image)
