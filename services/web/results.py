"""The result pages of a visit (``/bundles/{id}``) and of a single photograph (``/images/{id}``),
and the progress their script polls until the result is complete."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from sqlalchemy.orm import Session

from core import repository as repo
from core.errors import NotFound
from core.tables import Explanation, Image, Prediction, as_utc, utcnow
from services.deps import Principal, SessionDep
from services.routes import bundles as bundle_routes
from services.routes import images as image_routes
from services.views import earlier_visit_summary, patient_summary
from services.web import auth, pages, present
from services.web.pages import WebPrincipal

router = APIRouter(include_in_schema=False)

#: How long a result page waits for the heatmaps of graded photographs before showing it anyway.
HEATMAP_WAIT_SECONDS = 180.0


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


def _heatmaps(session: Session, images: list[Image]) -> dict[str, Explanation | None]:
    """Each photograph's heatmap of the grade shown (not an older release's), if drawn."""
    return {im.id: repo.current_explanation(session, im.id) if im.status == "done" else None for im in images}


def _old_scale(heatmaps: dict[str, Explanation | None]) -> dict[str, bool]:
    return {k: row is not None and not repo.on_current_scale(row) for k, row in heatmaps.items()}


def _heatmap_expected(image: Image, prediction: Prediction | None) -> bool:
    """Workers draw heatmaps for graded photographs only, right after the grade; after a while
    without one, stop waiting (the page then says it is missing; the heatmap route asks again)."""
    if not repo.graded_gradable(image, prediction):
        return False
    finished = image.finished_at
    if finished is None:
        return True
    return (utcnow() - as_utc(finished)).total_seconds() < HEATMAP_WAIT_SECONDS


def _progress(
    session: Session,
    images: list[Image],
    patient_id: int,
    heatmaps: dict[str, Explanation | None] | None = None,
) -> Progress:
    """``heatmaps``: ``_heatmaps`` of ``images`` when the caller has read them already (a page)."""
    heatmaps = _heatmaps(session, images) if heatmaps is None else heatmaps
    shown = repo.predictions_for_images(session, [im.id for im in images])
    return Progress(
        total=len(images),
        finished=sum(im.status in present.FINAL for im in images),
        failed=sum(im.status == "failed" for im in images),
        heatmaps_missing=sum(
            _heatmap_expected(im, shown.get(im.id)) and heatmaps[im.id] is None for im in images
        ),
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
    # ?saved=<image id>: back from saving a grader's grade, that photograph's box says so
    context = {**context, "saved": request.query_params.get("saved")}
    if grading is None:
        return pages.render(request, "result.html", {**context, "grading": None}, principal=principal)
    context = {**context, "grading": grading, "progress_url": None}
    return pages.render(request, "result.html", context, principal=principal, status_code=422)


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
    return bundle_result(request, session, principal, bundle_id)


def bundle_result(
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
        return pages.not_found(request, principal, "No such screening (or it belongs to another clinic).")
    rows = repo.bundle_images(session, bundle_id)
    bundle = bundle_routes.load_bundle(session, principal, bundle_id)
    heatmaps = _heatmaps(session, rows)
    progress = _progress(session, rows, bundle.patient_id, heatmaps)
    old = _old_scale(heatmaps)
    photos = [
        present.photo_view(im, heatmaps.get(im.id) is not None, old.get(im.id, False)) for im in result.images
    ]
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
    return image_result(request, session, principal, image_id)


def image_result(
    request: Request,
    session: Session,
    principal: Principal,
    image_id: str,
    *,
    grading: GradingForm | None = None,
) -> HTMLResponse:
    """A single photograph's result page; ``grading`` as for :func:`bundle_result`."""
    try:
        result = image_routes.get_image(image_id, session, principal)
    except NotFound:
        return pages.not_found(request, principal, "No such photograph (or it belongs to another clinic).")
    row = image_routes.load_image(session, principal, image_id)
    heatmaps = _heatmaps(session, [row])
    progress = _progress(session, [row], row.patient_id, heatmaps)
    photo = present.photo_view(result, heatmaps[row.id] is not None, _old_scale(heatmaps)[row.id])
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
