"""Folder jobs: the clinic's jobs with their progress, starting one, and their CSV files."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlalchemy import select
from sqlalchemy.orm import Session

from core import repository as repo
from core.errors import DomainError, NotFound
from core.tables import ScoringJob
from services.deps import ApiSettingsDep, Principal, ProducerDep, SessionDep, SettingsDep
from services.routes import jobs as job_routes
from services.web import auth, pages
from services.web.pages import WebPrincipal

router = APIRouter(include_in_schema=False)

JOBS_LIMIT = 50
#: Failed files listed under a job on the jobs page (all of them are in its results.csv).
JOB_FAILURES_SHOWN = 20


def _jobs(session: Session, clinic_id: int) -> list[dict[str, Any]]:
    """The clinic's latest folder jobs with fresh counts (the listing only this page needs)."""
    jobs = session.scalars(
        select(ScoringJob)
        .where(ScoringJob.clinic_id == clinic_id)
        .order_by(ScoringJob.created_at.desc())
        .limit(JOBS_LIMIT)
    ).all()
    jobs = [
        repo.refresh_job_counts(session, job.id) if job.status in repo.OPEN_JOB_STATES else job
        for job in jobs
    ]
    # every listed job's grades and failures in one statement each (two per job took 8 s)
    grades = repo.jobs_grade_counts(session, [job.id for job in jobs])
    failures = repo.jobs_failures(session, [job.id for job in jobs if job.failed], JOB_FAILURES_SHOWN)
    out = []
    for job in jobs:
        finished = job.done + job.failed
        out.append(
            {
                "job": job,
                "finished": finished,
                "percent": round(100 * finished / job.total, 1) if job.total else 0.0,
                "grades": grades[job.id],
                "failures": failures.get(job.id, []),
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
        # a page answering a refused POST does not refresh itself: its reload sent the form again
        # every 5 s (the session-30 review: 6 POSTs in 27 s)
        "active": error is None and any(j["job"].status in ("queued", "running") for j in listed),
        "roots": [str(p) for p in repo.import_roots_of(session, principal.clinic_id, settings)],
        "error": error,
        "folder": folder,
    }
    return pages.render(request, "jobs.html", context, principal=principal, status_code=status_code)


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
        return pages.forbidden_origin(request, principal)
    folder = folder.strip()
    if not folder or len(folder) > 4096:
        return _jobs_page(request, session, principal, settings, error="Give a folder path.", status_code=422)
    try:
        job_routes.create_job(
            job_routes.JobRequest(folder=folder, explain=explain), session, principal, settings, producer
        )
    except DomainError as exc:
        session.rollback()
        page = _jobs_page(request, session, principal, settings, error=pages.error_text(exc), folder=folder)
        return pages.refused(page, exc)
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
