"""What every page of the web interface shares: the templates, the headers of a page, the
signed-in key as a dependency, and the answers the forms give when they refuse (another site's
form, a malformed patient id, a domain error, not found)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.responses import HTMLResponse
from fastapi.templating import Jinja2Templates
from sqlalchemy.exc import SQLAlchemyError

from core import db
from core.errors import DomainError
from core.tables import utcnow
from services.deps import Principal, SessionDep
from services.errors import headers_for, status_for
from services.routes import images as image_routes
from services.web import auth, present

HERE = Path(__file__).resolve().parent

templates = Jinja2Templates(directory=str(HERE / "templates"))
templates.env.filters["grade_label"] = present.grade_label
templates.env.filters["patient_grade"] = present.patient_grade_text
templates.env.filters["eye_state"] = present.eye_state
templates.env.filters["metric"] = present.fmt_metric
templates.env.filters["grade_choice"] = present.grade_choice
templates.env.filters["grader_referral"] = present.grader_referral_text
templates.env.filters["share"] = present.share_text
templates.env.filters["interval"] = present.interval_text
templates.env.globals["grade_choices"] = present.GRADE_CHOICES

#: Pages show patient data: never cached, never framed, nothing loaded from elsewhere.
PAGE_HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
        "frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}


def _web_principal(request: Request, session: SessionDep) -> Principal | None:
    return auth.principal_from_cookie(request, session)


WebPrincipal = Annotated[Principal | None, Depends(_web_principal)]


def render(
    request: Request,
    name: str,
    context: dict[str, Any],
    *,
    principal: Principal | None,
    status_code: int = 200,
) -> HTMLResponse:
    # pages are never cached, so the time they were made is the time they are printed
    printed_at = utcnow().strftime("%Y-%m-%d %H:%M")
    base = {"signed_in": principal is not None, "printed_at": printed_at}
    response = templates.TemplateResponse(request, name, {**base, **context}, status_code=status_code)
    response.headers.update(PAGE_HEADERS)
    return response


def refused(page: HTMLResponse, exc: DomainError) -> HTMLResponse:
    """A form's page shown again with why the domain refused it, under the status and headers the
    JSON API gives that error: 413 too large, 409 conflict, 503 + Retry-After busy (a page saying
    "retry shortly" under 422 told browsers and proxies the request itself was wrong)."""
    page.status_code = status_for(exc)
    page.headers.update(headers_for(exc))
    return page


def not_found(request: Request, principal: Principal | None, what: str) -> HTMLResponse:
    return render(
        request, "message.html", {"title": "Not found", "message": what}, principal=principal, status_code=404
    )


def not_found_page(request: Request) -> HTMLResponse:
    """A page address the interface does not have (``services.errors`` answers it for browsers),
    with the header of a signed-in page when the cookie holds a valid key."""
    try:
        with db.session_scope(request.app.state.settings.database_url) as session:
            signed_in = auth.signed_in(request, session)
    except SQLAlchemyError:  # the page still answers; the header then offers signing in
        signed_in = False
    context = {
        "title": "Not found",
        "message": "There is no such page. Start again from the screening page.",
        "signed_in": signed_in,  # the header's; no principal: no rate-limit token spent on a 404
    }
    return render(request, "message.html", context, principal=None, status_code=404)


def error_text(exc: DomainError) -> str:
    return present.upload_error_text(exc.message, exc.detail)


def forbidden_origin(request: Request, principal: Principal | None) -> HTMLResponse:
    """A form sent from another site's page, refused (403)."""
    context = {"title": "Refused", "message": "This form was sent from another site."}
    return render(request, "message.html", context, principal=principal, status_code=403)


def check_patient_id(patient_id: str) -> str | None:
    if not re.fullmatch(image_routes.PATIENT_ID_PATTERN, patient_id.strip()):
        return "Patient ID: 1 to 128 letters, digits, '.', '_' or '-' (starting with a letter or digit)."
    return None
