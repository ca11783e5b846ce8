"""Pages of the web interface (``/``), left out of the OpenAPI document (it describes ``/v1``).

Uploads, reads and graders' grades go through the ``/v1`` route functions themselves
(``services.routes.*``), called in-process with the principal of the signed-in key: the same
validation, storage, queueing, clinic isolation and audit as the JSON API, with no second code
path to drift. The key never reaches the page's scripts (the cookie is HttpOnly), so the browser
does not call ``/v1``; its only script polls a small progress route and reloads the page when the
result is complete.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Form, Query, Request, UploadFile
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.routing import APIRoute
from fastapi.templating import Jinja2Templates
from markdown_it import MarkdownIt
from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from core import db, retention
from core import repository as repo
from core.errors import Conflict, DomainError, NotFound
from core.schemas import GraderGradeIn, PatientSummary
from core.store import FileStore
from core.tables import Bundle, Image, Patient, PatientResult, ScoringJob, as_utc, utcnow
from ml.imageio import ImageDecodeError
from services.deps import (
    ApiSettingsDep,
    Principal,
    ProducerDep,
    SessionDep,
    SettingsDep,
    audit,
)
from services.errors import MAX_OFFSET, NotReady, headers_for, status_for
from services.modelinfo import active_ref, model_info, read_manifest, released_ensembles
from services.routes import agreement as agreement_routes
from services.routes import bundles as bundle_routes
from services.routes import grading_queue as queue_routes
from services.routes import images as image_routes
from services.routes import jobs as job_routes
from services.routes import patients as patient_routes
from services.views import earlier_visit_summary, patient_summary, private_image_headers
from services.web import auth, present

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
STATIC_DIR = HERE / "static"
STATIC_FILES = {"app.css": "text/css", "app.js": "text/javascript"}
#: Photographs a browser shows as they are; anything else (TIFF) is converted to PNG.
BROWSER_IMAGE_TYPES = {"jpg": "image/jpeg", "png": "image/png", "bmp": "image/bmp", "webp": "image/webp"}
RECENT_LIMIT = 12
JOBS_LIMIT = 50
#: Failed files listed under a job on the jobs page (all of them are in its results.csv).
JOB_FAILURES_SHOWN = 20
#: How long a result page waits for the heatmaps of graded photographs before showing it anyway.
HEATMAP_WAIT_SECONDS = 180.0

templates = Jinja2Templates(directory=str(HERE / "templates"))
templates.env.filters["grade_label"] = present.grade_label
templates.env.filters["patient_grade"] = present.patient_grade_text
templates.env.filters["eye_state"] = present.eye_state
templates.env.filters["metric"] = present.fmt_metric
templates.env.filters["grade_choice"] = present.grade_choice
templates.env.filters["share"] = present.share_text
templates.env.filters["interval"] = present.interval_text
templates.env.globals["grade_choices"] = present.GRADE_CHOICES
_markdown = MarkdownIt("commonmark", {"html": False}).enable("table")

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

router = APIRouter(include_in_schema=False)


def _web_principal(request: Request, session: SessionDep) -> Principal | None:
    return auth.principal_from_cookie(request, session)


WebPrincipal = Annotated[Principal | None, Depends(_web_principal)]
OptionalUpload = Annotated[UploadFile | None, File()]


def _page(
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


def _refused(page: HTMLResponse, exc: DomainError) -> HTMLResponse:
    """A form's page shown again with why the domain refused it, under the status and headers the
    JSON API gives that error: 413 too large, 409 conflict, 503 + Retry-After busy (a page saying
    "retry shortly" under 422 told browsers and proxies the request itself was wrong)."""
    page.status_code = status_for(exc)
    page.headers.update(headers_for(exc))
    return page


def _not_found(request: Request, principal: Principal | None, what: str) -> HTMLResponse:
    return _page(
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
    return _page(request, "message.html", context, principal=None, status_code=404)


def _error_text(exc: DomainError) -> str:
    return present.upload_error_text(exc.message, exc.detail)


def _given(upload: UploadFile | None) -> UploadFile | None:
    """A file input left empty arrives as a part with no file name: treat it as absent."""
    if upload is None or not upload.filename:
        return None
    return upload


def _accepted_id(response: Response) -> str:
    body: dict[str, Any] = json.loads(bytes(response.body))
    return str(body["id"])


# --------------------------------------------------------------------------------- sign in/out


@router.get("/login")
def login_form(
    request: Request, principal: WebPrincipal, next: str | None = None, unsaved: bool = False
) -> Response:
    if principal is not None:
        return RedirectResponse(auth.safe_next(next), status_code=303)
    context = {"next": auth.safe_next(next), "error": None, "unsaved": unsaved}
    return _page(request, "login.html", context, principal=None)


@router.post("/login")
def login(
    request: Request,
    session: SessionDep,
    api_key: Annotated[str, Form()] = "",
    next: Annotated[str, Form()] = "/",
) -> Response:
    if not auth.same_origin(request):
        return _page(request, "message.html", _forbidden_origin(), principal=None, status_code=403)
    key = auth.valid_key(session, api_key)
    if key is None:
        context = {"next": auth.safe_next(next), "error": "Unknown or revoked API key."}
        return _page(request, "login.html", context, principal=None, status_code=401)
    response = RedirectResponse(auth.safe_next(next), status_code=303)
    auth.sign_in(response, request, session, key)
    return response


@router.post("/logout")
def logout(request: Request, session: SessionDep) -> Response:
    if not auth.same_origin(request):  # as every other form post (another site signed staff out)
        return Response("This form was sent from another site.", status_code=403, media_type="text/plain")
    response = RedirectResponse("/login", status_code=303)
    auth.sign_out(response, request, session)
    return response


def _forbidden_origin() -> dict[str, str]:
    return {"title": "Refused", "message": "This form was sent from another site."}


# ------------------------------------------------------------------------------- home, uploads


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
    ``REFER_DAYS`` days, newest first: the day-end worklist across visits, single photographs and
    folder jobs (the clinician's review: the home page listed visits only, with no decision)."""
    since = utcnow() - timedelta(days=REFER_DAYS)
    rows = session.execute(
        select(Patient.external_id, PatientResult.grade, PatientResult.gradable, PatientResult.computed_at)
        .join(Patient, Patient.id == PatientResult.patient_id)
        .where(
            Patient.clinic_id == clinic_id,
            PatientResult.is_current.is_(True),
            PatientResult.referable.is_(True),
            PatientResult.computed_at >= since,
        )
        .order_by(PatientResult.computed_at.desc(), PatientResult.id.desc())
        .limit(REFER_LIMIT)
    ).all()
    return [{"patient_id": r[0], "grade": r[1], "gradable": r[2], "computed_at": as_utc(r[3])} for r in rows]


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
    return _page(request, "home.html", context, principal=principal, status_code=status_code)


@router.get("/")
def home(request: Request, session: SessionDep, principal: WebPrincipal) -> Response:
    if principal is None:
        return auth.login_redirect(request)
    return _home(request, session, principal)


def _check_patient_id(patient_id: str) -> str | None:
    if not re.fullmatch(image_routes.PATIENT_ID_PATTERN, patient_id.strip()):
        return "Patient ID: 1 to 128 letters, digits, '.', '_' or '-' (starting with a letter or digit)."
    return None


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
        return _page(request, "message.html", _forbidden_origin(), principal=principal, status_code=403)
    problem = _check_patient_id(patient_id)
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
        return _refused(_home(request, session, principal, error=_error_text(exc), form=form), exc)
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
        return _page(request, "message.html", _forbidden_origin(), principal=principal, status_code=403)
    problem = _check_patient_id(patient_id)
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
        return _refused(_home(request, session, principal, error=_error_text(exc), form=form), exc)
    return RedirectResponse(f"/images/{_accepted_id(accepted)}", status_code=303)


# ---------------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Progress:
    total: int
    finished: int
    failed: int
    heatmaps_missing: int
    patient_result: bool

    @property
    def scored(self) -> bool:
        return self.finished == self.total

    @property
    def complete(self) -> bool:
        """Nothing more will change: every photograph finished, the patient aggregated (in the same
        transaction as the last grade) and every heatmap drawn."""
        return self.scored and self.heatmaps_missing == 0 and (self.patient_result or self.failed > 0)

    def as_json(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "finished": self.finished,
            "failed": self.failed,
            "heatmaps_missing": self.heatmaps_missing,
            "scored": self.scored,
            "complete": self.complete,
        }


def _heatmap_ready(session: Session, images: list[Image]) -> dict[str, bool]:
    return {im.id: im.status == "done" and repo.get_explanation(session, im.id) is not None for im in images}


def _heatmap_expected(image: Image) -> bool:
    """Workers draw heatmaps for graded photographs only, right after the grade; after a while
    without one, stop waiting (the page then says it is missing; the heatmap route asks again)."""
    if image.status != "done" or not image.gradable:
        return False
    finished = image.finished_at
    if finished is None:
        return True
    return (utcnow() - as_utc(finished)).total_seconds() < HEATMAP_WAIT_SECONDS


def _progress(session: Session, images: list[Image], patient_id: int) -> Progress:
    ready = _heatmap_ready(session, images)
    return Progress(
        total=len(images),
        finished=sum(im.status in present.FINAL for im in images),
        failed=sum(im.status == "failed" for im in images),
        heatmaps_missing=sum(_heatmap_expected(im) and not ready[im.id] for im in images),
        patient_result=repo.get_current_patient_result(session, patient_id) is not None,
    )


#: A result's photographs and the row id of their patient.
Photos = tuple[list[Image], int]


@dataclass(frozen=True)
class GradingForm:
    """A refused grader's-grade form: what was sent, shown again beside its photograph with why."""

    image_id: str
    grade: str
    grader: str
    error: str


def _result_page(
    request: Request, principal: Principal, context: dict[str, Any], grading: GradingForm | None
) -> HTMLResponse:
    """``result.html``; with a refused form, under 422 and without polling (the script's reload
    of the page would send the form again)."""
    if grading is None:
        return _page(request, "result.html", {**context, "grading": None}, principal=principal)
    context = {**context, "grading": grading, "progress_url": None}
    return _page(request, "result.html", context, principal=principal, status_code=422)


def _bundle_photos(session: Session, clinic_id: int, bundle_id: str) -> Photos | None:
    bundle = repo.get_bundle(session, bundle_id, clinic_id)
    return None if bundle is None else (repo.bundle_images(session, bundle.id), bundle.patient_id)


def _image_photos(session: Session, clinic_id: int, image_id: str) -> Photos | None:
    row = repo.get_image(session, image_id, clinic_id)
    return None if row is None else ([row], row.patient_id)


def _progress_response(
    session: Session,
    principal: Principal | None,
    find: Callable[[Session, int, str], Photos | None],
    result_id: str,
) -> JSONResponse:
    """What the result page's script polls: 401 when signed out, 404 when ``find`` sees no such
    result in the clinic, else the progress of its photographs (never cached)."""
    if principal is None:
        return JSONResponse({"error": "unauthorized"}, status_code=401)
    found = find(session, principal.clinic_id, result_id)
    if found is None:
        return JSONResponse({"error": "not_found"}, status_code=404)
    progress = _progress(session, *found)
    return JSONResponse(progress.as_json(), headers={"Cache-Control": "no-store"})


@router.get("/bundles/{bundle_id}")
def bundle_page(bundle_id: str, request: Request, session: SessionDep, principal: WebPrincipal) -> Response:
    if principal is None:
        return auth.login_redirect(request)
    return _bundle_result(request, session, principal, bundle_id)


def _bundle_result(
    request: Request,
    session: Session,
    principal: Principal,
    bundle_id: str,
    *,
    grading: GradingForm | None = None,
) -> HTMLResponse:
    """A visit's result page; ``grading``: a refused grader's-grade form, shown again (422)."""
    try:
        result = bundle_routes.get_bundle(bundle_id, session, principal)
    except NotFound:
        return _not_found(request, principal, "No such screening (or it belongs to another clinic).")
    rows = repo.bundle_images(session, bundle_id)
    bundle = bundle_routes.load_bundle(session, principal, bundle_id)
    progress = _progress(session, rows, bundle.patient_id)
    ready = _heatmap_ready(session, rows)
    photos = [present.photo_view(im, ready.get(im.id, False)) for im in result.images]
    # an earlier visit's page shows that visit's result; the latest's is the bundle's own patient
    patient = repo.get_patient_by_id(session, bundle.patient_id)
    earlier = None if patient is None else earlier_visit_summary(session, patient, [im.id for im in rows])
    summary = earlier or result.patient
    if progress.scored:
        verdict = present.patient_verdict(summary, progress.failed > 0)
    else:
        verdict = present.pending_verdict(progress.finished, progress.total)
    context = {
        "kind": "bundle",
        "id": bundle_id,
        "status": result.status,
        "patient": summary,
        "earlier_visit": earlier is not None,
        "verdict": verdict,
        "eyes": present.eye_views(summary if progress.scored else None, photos),
        "progress": progress,
        "progress_url": f"/bundles/{bundle_id}/progress",
    }
    return _result_page(request, principal, context, grading)


@router.get("/bundles/{bundle_id}/progress")
def bundle_progress(bundle_id: str, session: SessionDep, principal: WebPrincipal) -> JSONResponse:
    return _progress_response(session, principal, _bundle_photos, bundle_id)


@router.get("/images/{image_id}")
def image_page(image_id: str, request: Request, session: SessionDep, principal: WebPrincipal) -> Response:
    if principal is None:
        return auth.login_redirect(request)
    return _image_result(request, session, principal, image_id)


def _image_result(
    request: Request,
    session: Session,
    principal: Principal,
    image_id: str,
    *,
    grading: GradingForm | None = None,
) -> HTMLResponse:
    """A single photograph's result page; ``grading`` as for :func:`_bundle_result`."""
    try:
        result = image_routes.get_image(image_id, session, principal)
    except NotFound:
        return _not_found(request, principal, "No such photograph (or it belongs to another clinic).")
    row = image_routes.load_image(session, principal, image_id)
    ready = _heatmap_ready(session, [row])
    progress = _progress(session, [row], row.patient_id)
    photo = present.photo_view(result, ready[row.id])
    patient = repo.get_patient_by_id(session, row.patient_id)
    summary = earlier = None
    if progress.scored and patient is not None:  # nothing of the patient's is computed before
        earlier = earlier_visit_summary(session, patient, [row.id])
        summary = earlier or patient_summary(session, patient)
    if summary is not None:
        # The banner is the patient's decision, as on a visit's page: this photograph alone said
        # "No referral" for a patient whose other eye was never photographed, or whose eye another
        # photograph graded 4 (the web walkthrough). The photograph keeps its own grade below.
        verdict = present.patient_verdict(summary, progress.failed > 0)
        eyes = present.eye_views(summary, [photo])
    else:
        verdict = present.image_verdict(result)
        eyes = [
            present.EyeView(
                eye=result.eye,
                grade=result.grade,
                gradable=bool(result.gradable),
                referable=result.referable is not False,
                known=progress.scored,
                photos=[photo],
            )
        ]
    context = {
        "kind": "image",
        "id": image_id,
        "status": result.status,
        "patient": summary,
        "earlier_visit": earlier is not None,
        "patient_id": result.patient_id,
        "verdict": verdict,
        "eyes": eyes,
        "progress": progress,
        "progress_url": f"/images/{image_id}/progress",
    }
    return _result_page(request, principal, context, grading)


@router.get("/images/{image_id}/progress")
def image_progress(image_id: str, session: SessionDep, principal: WebPrincipal) -> JSONResponse:
    return _progress_response(session, principal, _image_photos, image_id)


@router.get("/images/{image_id}/photo")
def original_photo(
    image_id: str, request: Request, session: SessionDep, settings: SettingsDep, principal: WebPrincipal
) -> Response:
    """The uploaded photograph itself (the API serves only its heatmap)."""
    if principal is None:
        return Response("sign in first", status_code=401, media_type="text/plain")
    row = repo.get_image(session, image_id, principal.clinic_id)
    store = FileStore(settings.store_path)
    if row is None or not store.exists(row.stored_path):
        return Response("no such photograph", status_code=404, media_type="text/plain")
    data = store.read_bytes(row.stored_path)
    ext = row.stored_path.rsplit(".", 1)[-1].lower()
    media_type = BROWSER_IMAGE_TYPES.get(ext)
    if media_type is None:  # e.g. TIFF: browsers cannot show it
        try:
            data, media_type = _as_png(data, settings.max_image_pixels), "image/png"
        except ImageDecodeError as exc:
            why = f"the photograph cannot be shown: {exc}"
            return Response(why, status_code=422, media_type="text/plain")
    audit(session, principal, "photo.read", patient_id=row.patient_id, target_type="image", target_id=row.id)
    return Response(data, media_type=media_type, headers=private_image_headers())


def _as_png(data: bytes, max_pixels: int) -> bytes:
    """``max_pixels``: the uploads' limit (the decoder's own default, 40 M, is lower: a 46-M-pixel
    TIFF accepted at upload answered 500 here; the security review)."""
    import io

    from PIL import Image as PILImage

    from ml.imageio import decode_image
    from services.uploads import decode_slot

    buf = io.BytesIO()
    # bounded like an upload's check: Unavailable, answered 503 + Retry-After (services.errors)
    with decode_slot("too many photographs are being decoded at once; retry shortly"):
        PILImage.fromarray(decode_image(data, max_pixels=max_pixels)).save(buf, format="PNG")
    return buf.getvalue()


@router.get("/images/{image_id}/heatmap")
def heatmap(
    image_id: str,
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    producer: ProducerDep,
    principal: WebPrincipal,
) -> Response:
    """``GET /v1/images/{id}/explanation`` for the signed-in key."""
    if principal is None:
        return Response("sign in first", status_code=401, media_type="text/plain")
    try:
        png = image_routes.get_explanation(request, image_id, session, principal, settings, producer)
    except NotReady:
        return Response(
            "not ready yet", status_code=409, media_type="text/plain", headers={"Retry-After": "2"}
        )
    except NotFound as exc:
        return Response(exc.message, status_code=404, media_type="text/plain")
    png.headers.update(private_image_headers())
    return png


# --------------------------------------------------------------------------- graders' grades

#: The result pages a grader's-grade form may return to; anything else is ignored (no open redirect).
RESULT_PATH = re.compile(r"/(bundles|images)/([0-9A-Za-z_-]{1,64})")
QUEUE_PATH = "/grading-queue"
#: Photographs listed per page of the grading queue.
QUEUE_PAGE = 50
#: A refused form's fields in words (``GraderGradeIn``'s fields).
GRADING_ERRORS = {
    "grade": "Choose the grader's grade: 0 to 4, or ungradable.",
    "grader": "Give the grader's name or initials: 1 to 100 characters on one line.",
}


def _return_to(back: str, image: Image) -> tuple[str, str]:
    """(kind, id) of the result page the form came from: ``back`` when it is the page of this
    photograph or of its visit, else the photograph's own page."""
    if back == QUEUE_PATH:  # the blind grading page: back to the queue for the next one
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
    return QUEUE_PATH if kind == "queue" else f"/{kind}s/{page_id}"


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
        return _page(request, "message.html", _forbidden_origin(), principal=principal, status_code=403)
    if not image_id:
        message = "The form named no photograph: open its result page again."
        context = {"title": "Not saved", "message": message}
        return _page(request, "message.html", context, principal=principal, status_code=422)
    image = repo.get_image(session, image_id, principal.clinic_id)
    if image is None:
        return _not_found(request, principal, "No such photograph (or it belongs to another clinic).")
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
        form = GradingForm(image_id=image.id, grade=grade, grader=grader, error=body)
        if kind == "queue":
            return _grading_page(request, session, principal, image, refused=form)
        show = _bundle_result if kind == "bundle" else _image_result
        return show(request, session, principal, page_id, grading=form)
    try:
        image_routes.put_grader_grade(image.id, body, session, principal)
    except NotFound:  # the patient was erased meanwhile
        session.rollback()
        return _not_found(request, principal, "No such photograph (or it belongs to another clinic).")
    session.commit()
    return RedirectResponse(_result_url(kind, page_id), status_code=303)


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


# ---------------------------------------------------------------------------------- patients


@router.get("/patients")
def patient_form(request: Request, principal: WebPrincipal, erased: str | None = None) -> Response:
    """``?erased=1``: where an erasure redirects (the patient id stays out of the URL)."""
    if principal is None:
        return auth.login_redirect(request)
    context = {"query": "", "summary": None, "error": None, "erased": erased == "1"}
    return _page(request, "patient.html", context, principal=principal)


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
        return _page(request, "message.html", _forbidden_origin(), principal=principal, status_code=403)
    query = patient_id.strip()
    summary: PatientSummary | None = None
    error = _check_patient_id(query)
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
    return _page(request, "patient.html", context, principal=principal, status_code=200 if summary else 404)


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
    return _page(request, "erase.html", context, principal=principal, status_code=status_code)


def _erase_preview(
    request: Request, session: Session, principal: Principal, patient_id: str, error: str | None = None
) -> HTMLResponse:
    """Run the erasure and roll it back, as ``drscreen data erase`` previews: the counts shown
    are the real run's. Refused (409) while a photograph of the patient is being scored."""
    try:
        outcome = retention.erase_patient(session, principal.clinic_id, patient_id, by="web")
    except Conflict as exc:
        session.rollback()
        return _refused(_erase_page(request, principal, patient_id, outcome=None, error=exc.message), exc)
    session.rollback()  # a preview: nothing deleted, nothing audited as an erasure
    patient = repo.get_patient(session, principal.clinic_id, patient_id) if outcome.found else None
    if patient is None:
        return _not_found(request, principal, "No patient with this ID in your clinic.")
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
        return _page(request, "message.html", _forbidden_origin(), principal=principal, status_code=403)
    if _check_patient_id(patient_id.strip()) is not None:
        return _not_found(request, principal, "No patient with this ID in your clinic.")
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
        return _not_found(request, principal, "No patient with this ID in your clinic.")
    except DomainError as exc:  # Conflict: a photograph is still being scored
        session.rollback()
        page = _erase_page(request, principal, patient_id, outcome=None, error=_error_text(exc))
        return _refused(page, exc)
    return RedirectResponse("/patients?erased=1", status_code=303)


# -------------------------------------------------------------------------------------- jobs


def _jobs(session: Session, clinic_id: int) -> list[dict[str, Any]]:
    """The clinic's latest folder jobs with fresh counts (the listing only this page needs)."""
    jobs = session.scalars(
        select(ScoringJob)
        .where(ScoringJob.clinic_id == clinic_id)
        .order_by(ScoringJob.created_at.desc())
        .limit(JOBS_LIMIT)
    ).all()
    out = []
    for job in jobs:
        if job.status in ("queued", "running"):
            job = repo.refresh_job_counts(session, job.id)
        finished = job.done + job.failed
        out.append(
            {
                "job": job,
                "finished": finished,
                "percent": round(100 * finished / job.total, 1) if job.total else 0.0,
                "grades": repo.job_grade_counts(session, job.id),
                "failures": repo.job_failures(session, job.id, JOB_FAILURES_SHOWN) if job.failed else [],
            }
        )
    return out


def _jobs_page(
    request: Request,
    session: Session,
    principal: Principal,
    settings: SettingsDep,
    *,
    error: str | None = None,
    folder: str = "",
    status_code: int = 200,
) -> HTMLResponse:
    listed = _jobs(session, principal.clinic_id)
    context = {
        "jobs": listed,
        "active": any(j["job"].status in ("queued", "running") for j in listed),
        "roots": [str(p) for p in repo.import_roots_of(session, principal.clinic_id, settings)],
        "error": error,
        "folder": folder,
    }
    return _page(request, "jobs.html", context, principal=principal, status_code=status_code)


@router.get("/jobs")
def jobs_page(
    request: Request, session: SessionDep, settings: SettingsDep, principal: WebPrincipal
) -> Response:
    if principal is None:
        return auth.login_redirect(request)
    return _jobs_page(request, session, principal, settings)


@router.post("/jobs")
def start_job(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    producer: ProducerDep,
    principal: WebPrincipal,
    folder: Annotated[str, Form()] = "",
    explain: Annotated[bool, Form()] = False,
) -> Response:
    if principal is None:
        return auth.login_redirect(request)
    if not auth.same_origin(request):
        return _page(request, "message.html", _forbidden_origin(), principal=principal, status_code=403)
    folder = folder.strip()
    if not folder or len(folder) > 4096:
        return _jobs_page(request, session, principal, settings, error="Give a folder path.", status_code=422)
    try:
        job_routes.create_job(
            job_routes.JobRequest(folder=folder, explain=explain), session, principal, settings, producer
        )
    except DomainError as exc:
        session.rollback()
        page = _jobs_page(request, session, principal, settings, error=_error_text(exc), folder=folder)
        return _refused(page, exc)
    return RedirectResponse("/jobs", status_code=303)


@router.get("/jobs/{job_id}/results.csv")
def job_csv(job_id: str, session: SessionDep, api: ApiSettingsDep, principal: WebPrincipal) -> Response:
    """``GET /v1/jobs/{id}/results?format=csv`` for the signed-in key."""
    return _job_csv(job_routes.get_job_results, job_id, session, api, principal)


@router.get("/jobs/{job_id}/patients.csv")
def job_patients_csv(
    job_id: str, session: SessionDep, api: ApiSettingsDep, principal: WebPrincipal
) -> Response:
    """``GET /v1/jobs/{id}/patients?format=csv`` for the signed-in key: who to refer."""
    return _job_csv(job_routes.get_job_patients, job_id, session, api, principal)


def _job_csv(
    route: Any, job_id: str, session: SessionDep, api: ApiSettingsDep, principal: Principal | None
) -> Response:
    if principal is None:
        return Response("sign in first", status_code=401, media_type="text/plain")
    try:
        response: Response = route(job_id, session, principal, api, offset=0, limit=1, format="csv")
    except NotFound:
        return Response("no such job", status_code=404, media_type="text/plain")
    response.headers["Cache-Control"] = "no-store"
    return response


# ------------------------------------------------------------------------------------- model


def _metric_rows(card: dict[str, Any]) -> list[dict[str, Any]]:
    chosen = card.get("chosen_rule")
    rows = []
    for name, splits in (card.get("metrics") or {}).items():
        if not isinstance(splits, dict):
            continue
        rows.append(
            {
                "name": name,
                "chosen": name == f"rule:{chosen}",
                "validation": splits.get("validation") or {},
                "test": splits.get("test") or {},
            }
        )
    return rows


@router.get("/model")
def model_page(request: Request, settings: SettingsDep, principal: WebPrincipal) -> Response:
    if principal is None:
        return auth.login_redirect(request)
    info = model_info(settings)
    ref = active_ref(settings)
    manifest = read_manifest(settings, ref) if ref else None
    card: dict[str, Any] = (manifest or {}).get("card") or {}
    card_html = None
    if ref is not None:
        card_path = released_ensembles(settings.models_dir)[ref].parent / "MODEL_CARD.md"
        if card_path.is_file():
            card_html = _markdown.render(card_path.read_text(encoding="utf-8"))
    rows = _metric_rows(card)
    chosen = next((r for r in rows if r["chosen"]), None)
    context = {
        "info": info,
        "card": card,
        "rows": rows,
        "chosen": chosen,
        "grade_names": present.GRADE_NAMES,
        "card_html": card_html,
        "combination": (manifest or {}).get("combination") or {},
    }
    return _page(request, "model.html", context, principal=principal)


# -------------------------------------------------------------------------------- agreement


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
    return _page(request, "agreement.html", context, principal=principal)


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
    return _page(request, "grading_queue.html", {"queue": queue}, principal=principal)


def _grading_page(
    request: Request,
    session: Session,
    principal: Principal,
    image: Image,
    *,
    refused: GradingForm | None = None,
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
    return _page(request, "grade.html", context, principal=principal, status_code=422 if refused else 200)


@router.get("/grade/{image_id}")
def grade_page(request: Request, session: SessionDep, principal: WebPrincipal, image_id: str) -> Response:
    if principal is None:
        return auth.login_redirect(request)
    image = repo.get_image(session, image_id, principal.clinic_id)
    if image is None:
        return _not_found(request, principal, "No such photograph (or it belongs to another clinic).")
    return _grading_page(request, session, principal, image)


# ------------------------------------------------------------------------------------ static


@router.get("/static/{name}")
def static(name: str) -> Response:
    media_type = STATIC_FILES.get(name)
    if media_type is None:
        return Response("not found", status_code=404, media_type="text/plain")
    return FileResponse(
        STATIC_DIR / name, media_type=media_type, headers={"Cache-Control": "public, max-age=300"}
    )


# ------------------------------------------------------------------------------------ forms

#: Form posts a signed-out browser may send.
SIGNED_OUT_FORMS = frozenset({"/login", "/logout"})
#: Every other form post needs a live session: the API edge checks it before reading the body.
SIGNED_IN_FORMS = frozenset(
    route.path
    for route in router.routes
    if isinstance(route, APIRoute) and "POST" in (route.methods or ()) and route.path not in SIGNED_OUT_FORMS
)
#: The forms that carry photographs; the others are a few fields (``services.app.max_body_bytes``).
UPLOAD_FORMS = frozenset({"/screenings/bundle", "/screenings/image"})
