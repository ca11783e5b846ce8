"""The forms that record and remove a grader's grade (``PUT``/``DELETE
/v1/images/{id}/grader-grade``), posted from a result page or the blind grading page."""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import APIRouter, Form, Request
from fastapi.responses import RedirectResponse, Response
from pydantic import ValidationError
from sqlalchemy.orm import Session

from core import repository as repo
from core.errors import NotFound
from core.schemas import GraderGradeIn
from core.tables import Image
from services.deps import Principal, SessionDep
from services.routes import images as image_routes
from services.web import auth, grading, pages, results
from services.web.pages import WebPrincipal

router = APIRouter(include_in_schema=False)

#: The result pages a grader's-grade form may return to; anything else is ignored (no open redirect).
RESULT_PATH = re.compile(r"/(bundles|images)/([0-9A-Za-z_-]{1,64})")

#: A refused form's fields in words (``GraderGradeIn``'s fields).
GRADING_ERRORS = {
    "grade": "Choose the grader's grade: 0 to 4, or ungradable.",
    "grader": "Give the grader's name or initials: 1 to 100 characters on one line.",
}


def _return_to(back: str, image: Image) -> tuple[str, str]:
    """(kind, id) of the result page the form came from: ``back`` when it is the page of this
    photograph or of its visit, else the photograph's own page."""
    if back == grading.QUEUE_PATH:  # the blind grading page: back to the queue for the next one
        return "queue", ""
    match = RESULT_PATH.fullmatch(back)
    if match is not None:
        plural, page_id = match.groups()
        if plural == "images" and page_id == image.id:
            return "image", page_id
        if plural == "bundles" and page_id == image.bundle_id:
            return "bundle", page_id
    return "image", image.id


def _result_url(kind: str, page_id: str) -> str:
    return grading.QUEUE_PATH if kind == "queue" else f"/{kind}s/{page_id}"


def _grader_grade_in(grade: str, grader: str) -> GraderGradeIn | str:
    """The form's fields as the API's body, checked by the API's own model (so the page accepts
    exactly what ``PUT /v1/images/{id}/grader-grade`` does); the refusal in words otherwise."""
    value: int | str | None = grade
    if grade == "ungradable":
        value = None
    elif re.fullmatch(r"[0-9]{1,3}", grade):
        value = int(grade)  # "7" then fails the model's range, as 7 does in the API
    # anything else stays a string, which the strict model refuses (as the API refuses "2")
    try:
        return GraderGradeIn.model_validate({"grade": value, "grader": grader})
    except ValidationError as exc:
        wrong = {str(error["loc"][0]) for error in exc.errors() if error["loc"]}
        said = " ".join(text for name, text in GRADING_ERRORS.items() if name in wrong)
        return said or str(exc)  # not expected: the model has no other field


def _grading_target(
    request: Request, session: Session, principal: Principal | None, image_id: str
) -> Image | Response:
    """Both grader's-grade forms' checks: signed in, posted from this site, a photograph of the
    signed-in clinic. The photograph, or the page that refuses the form."""
    if principal is None:
        return auth.login_redirect(request)
    if not auth.same_origin(request):
        return pages.forbidden_origin(request, principal)
    if not image_id:
        message = "The form named no photograph: open its result page again."
        context = {"title": "Not saved", "message": message}
        return pages.render(request, "message.html", context, principal=principal, status_code=422)
    image = repo.get_image(session, image_id, principal.clinic_id)
    if image is None:
        return pages.not_found(request, principal, "No such photograph (or it belongs to another clinic).")
    return image


@router.post("/grader-grades")
def record_grader_grade(
    request: Request,
    session: SessionDep,
    principal: WebPrincipal,
    image_id: Annotated[str, Form()] = "",
    grade: Annotated[str, Form()] = "",
    grader: Annotated[str, Form()] = "",
    back: Annotated[str, Form()] = "",
) -> Response:
    """Record (or replace) a grader's grade, as ``PUT /v1/images/{id}/grader-grade`` does (that
    route function itself: same checks, same audit), then back to the result page."""
    image = _grading_target(request, session, principal, image_id)
    if not isinstance(image, Image):
        return image
    assert principal is not None  # refused otherwise
    kind, page_id = _return_to(back, image)
    body = _grader_grade_in(grade, grader)
    if isinstance(body, str):
        form = results.GradingForm(image_id=image.id, grade=grade, grader=grader, error=body)
        if kind == "queue":
            return grading.grading_page(request, session, principal, image, refused=form)
        show = results.bundle_result if kind == "bundle" else results.image_result
        return show(request, session, principal, page_id, grading=form)
    try:
        image_routes.put_grader_grade(image.id, body, session, principal)
    except NotFound:  # the patient was erased meanwhile
        session.rollback()
        return pages.not_found(request, principal, "No such photograph (or it belongs to another clinic).")
    session.commit()
    back_to = _result_url(kind, page_id)
    if kind != "queue":  # back at the photograph saved, which says so (the page top, silently, before)
        back_to += f"?saved={image.id}#photo-{image.id}"
    return RedirectResponse(back_to, status_code=303)


@router.post("/grader-grades/remove")
def remove_grader_grade(
    request: Request,
    session: SessionDep,
    principal: WebPrincipal,
    image_id: Annotated[str, Form()] = "",
    back: Annotated[str, Form()] = "",
) -> Response:
    """Delete a grader's grade recorded by mistake, as ``DELETE /v1/images/{id}/grader-grade``."""
    image = _grading_target(request, session, principal, image_id)
    if not isinstance(image, Image):
        return image
    assert principal is not None  # refused otherwise
    try:
        image_routes.delete_grader_grade(image.id, session, principal)
    except NotFound:  # none left to remove (removed in another tab): the page shows that
        session.rollback()
    else:
        session.commit()
    return RedirectResponse(_result_url(*_return_to(back, image)), status_code=303)
