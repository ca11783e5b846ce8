"""``/v1/jobs``: score a folder on the server (under the configured import roots)."""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, StrictBool

from core import producer as tasks_out
from core import repository as repo
from core import tasks
from core.csvcells import csv_cell
from core.errors import Forbidden, InvalidInput, NotFound
from core.schemas import Accepted, EyeSummary, JobStatus, PatientSummary
from core.tables import ScoringJob
from services.deps import ApiSettingsDep, PrincipalDep, ProducerDep, SessionDep, SettingsDep, audit
from services.errors import MAX_OFFSET, error_responses
from services.views import image_results, patient_summaries

log = logging.getLogger(__name__)

router = APIRouter(prefix="/jobs", tags=["jobs"])


class JobRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    folder: str = Field(
        min_length=1, max_length=4096, description="absolute folder path under an import root"
    )
    # strict: "yes" or 1 is refused rather than read as true (a typo must not start heatmaps)
    explain: StrictBool = Field(default=False, description="also draw Grad-CAM heatmaps for every photograph")


class JobResultRow(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    file: str
    status: str
    image_id: str | None = None
    patient_id: str | None = None
    eye: str | None = None
    grade: int | None = None
    referable: bool | None = None
    gradable: bool | None = None
    probabilities: list[float] | None = None
    quality_reasons: list[str] | None = Field(
        default=None, description="why the quality gate found the photograph ungradable (empty when gradable)"
    )
    model_version: str | None = None
    error: str | None = None


class JobResultsPage(BaseModel):
    job_id: str
    total: int
    offset: int
    limit: int
    next_offset: int | None
    items: list[JobResultRow]


def resolve_import_folder(raw: str, roots: list[Path]) -> Path:
    """The real folder ``raw`` names, refused unless it lies under one of ``roots`` (the calling
    clinic's import roots: ``repository.import_roots_of``).

    ``..`` is refused outright, and the containment check is made on the fully resolved path, so a
    symlink inside a root that points elsewhere is refused too. Paths outside the roots get the
    same answer whether or not they exist (no probing of the server's filesystem)."""
    if not roots:
        raise Forbidden("folder jobs are disabled: no import roots are configured (DRSCREEN_IMPORT_ROOTS)")
    if "\x00" in raw:
        raise InvalidInput("folder contains a NUL character")
    try:
        path = Path(raw).expanduser()
    except RuntimeError:  # "~name" of a user this server does not have (the fuzzer's "~0": a 500)
        raise InvalidInput("folder names the home folder of an unknown user") from None
    if not path.is_absolute():
        raise InvalidInput("folder must be an absolute path")
    if ".." in path.parts:
        raise Forbidden("folder must not contain '..'")
    try:
        resolved = path.resolve()
    except (RuntimeError, OSError):  # a symlink loop (RuntimeError before Python 3.13)
        raise InvalidInput("folder cannot be resolved (a symbolic link loop?)") from None
    if not any(resolved == root or resolved.is_relative_to(root) for root in roots):
        raise Forbidden("folder is outside the import roots")
    if not resolved.is_dir():
        raise InvalidInput("folder does not exist or is not a folder")
    return resolved


@router.post(
    "",
    status_code=202,
    response_model=Accepted,
    summary="Score every photograph of a folder on the server",
    description=(
        "`folder` must lie under one of the server's import roots (`DRSCREEN_IMPORT_ROOTS`; with "
        "`DRSCREEN_IMPORT_PER_CLINIC`, under `<root>/<clinic name>/`), else 403. Every image file "
        "in it and its subfolders is matched to a patient and an eye by its name, without the "
        "extension, case-insensitive: EyePACS `<patient>_<left|right>[<suffix>]` (`10_left.jpeg`, "
        "`10_left_2.jpg`) or DeepDRiD `<patient>_<l|r><n>` (`317_l1.jpg`). A `manifest.csv` in the "
        "folder wins over names: columns `image` (also `file`, `filename` or `path`; the path "
        "relative to the folder), `patient_id` (or `patient`) and `eye` (or `laterality`: `left`, "
        "`right`, `l`, `r`, `OS`, `OD`). A file that matches nothing is a failed item of the job, "
        "with the reason; the others are scored. Poll `GET /v1/jobs/{id}` and read "
        "`GET /v1/jobs/{id}/results`."
    ),
    responses=error_responses(401, 403, 422, 429),
)
def create_job(
    body: JobRequest,
    session: SessionDep,
    principal: PrincipalDep,
    settings: SettingsDep,
    producer: ProducerDep,
) -> JSONResponse:
    roots = repo.import_roots_of(session, principal.clinic_id, settings)
    if settings.import_per_clinic and settings.import_root_paths and not roots:
        raise Forbidden(
            "folder jobs: this clinic's name cannot be a folder name (DRSCREEN_IMPORT_PER_CLINIC "
            "reads <root>/<clinic name>/; a name with '/' or '\\' has none)"
        )
    folder = resolve_import_folder(body.folder, roots)
    job = repo.create_job(session, principal.clinic_id, str(folder), explain=body.explain)
    audit(
        session,
        principal,
        "job.create",
        target_type="job",
        target_id=job.id,
        detail={"explain": body.explain},
    )
    session.commit()
    try:
        tasks_out.send(tasks.EXPAND_FOLDER, [job.id], {"explain": body.explain}, app=producer)
    except Exception:
        log.warning("could not queue job %s; the sweep will re-queue it", job.id, exc_info=True)
    return JSONResponse(Accepted(id=job.id, status="queued").model_dump(mode="json"), 202)


def load_job(session: SessionDep, principal: PrincipalDep, job_id: str) -> ScoringJob:
    job = repo.get_job(session, job_id, principal.clinic_id)
    if job is None:
        raise NotFound("no such job")
    return job


@router.get(
    "/{job_id}",
    response_model=JobStatus,
    summary="Progress of a folder job and its counts per grade",
    responses=error_responses(401, 404, 429),
)
def get_job(job_id: str, session: SessionDep, principal: PrincipalDep) -> JobStatus:
    job = load_job(session, principal, job_id)
    if job.status in ("queued", "running"):
        job = repo.refresh_job_counts(session, job.id)
    audit(
        session,
        principal,
        "job.read",
        target_type="job",
        target_id=job.id,
    )
    return JobStatus(
        id=job.id,
        status=job.status,
        folder=job.folder,
        total=job.total,
        done=job.done,
        failed=job.failed,
        grades=repo.job_grade_counts(session, job.id),
        error=job.error,
        created_at=job.created_at,
        finished_at=job.finished_at,
    )


def _rows(
    session: SessionDep, job: ScoringJob, offset: int, limit: int | None
) -> tuple[int, list[JobResultRow]]:
    # the page is cut in SQL, in file order (every item was read to keep a page of them)
    page = repo.job_items(session, job.id, offset=offset, limit=limit)
    total = len(page) if limit is None and not offset else repo.count_job_items(session, job.id)
    # A finished job keeps its rows' grades while a newer release grades a photograph again
    # (its counts do too: repository.jobs._item_graded); the rows read "queued" with no grade.
    finished = job.status not in repo.OPEN_JOB_STATES
    standing = {i.image_id for i in page if finished and i.status == "done" and i.image_id}
    images = repo.get_images(session, [i.image_id for i in page if i.image_id])
    results = {r.id: r for r in image_results(session, images, graded_earlier=standing)}
    rows = []
    for item in page:
        res = results.get(item.image_id) if item.image_id else None
        row = JobResultRow(
            file=item.path,
            status=res.status if res is not None and item.status != "failed" else item.status,
            image_id=item.image_id,
            patient_id=item.patient_external_id,
            eye=item.eye,
            error=item.error or (res.error if res is not None else None),
        )
        if res is not None:
            row.grade, row.referable, row.gradable = res.grade, res.referable, res.gradable
            row.probabilities, row.model_version = res.probabilities, res.model_version
            if res.quality is not None:
                row.quality_reasons = list(res.quality.get("reasons") or [])
        rows.append(row)
    return total, rows


CSV_COLUMNS = ["file", "image_id", "patient_id", "eye", "status", "grade", "referable", "gradable"]


def _csv(rows: list[JobResultRow]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow([*CSV_COLUMNS, "p0", "p1", "p2", "p3", "p4", "quality_reasons", "model_version", "error"])
    for r in rows:
        probs: list[Any] = [f"{p:.6f}" for p in r.probabilities] if r.probabilities else [None] * 5
        reasons = None if r.quality_reasons is None else ";".join(r.quality_reasons)
        values = [getattr(r, c) for c in CSV_COLUMNS] + probs + [reasons, r.model_version, r.error]
        writer.writerow([csv_cell(v) for v in values])
    return buf.getvalue()


OffsetQuery = Annotated[int, Query(ge=0, le=MAX_OFFSET)]
# a whole typical job in one answer (the contract says "per-image results"): paging is for folders
# of thousands
LimitQuery = Annotated[
    int,
    Query(
        ge=1, le=1000, description="rows per page (at most DRSCREEN_MAX_PAGE_SIZE); `next_offset` continues"
    ),
]
FormatQuery = Annotated[Literal["json", "csv"], Query(description="`csv`: every row, no paging")]


PAGE_OR_CSV: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/csv": {}}, "description": "JSON page, or CSV with `format=csv`"},
    **error_responses(401, 404, 422, 429),
}


class JobPatientsPage(BaseModel):
    job_id: str
    total: int = Field(description="patients named by the job's files")
    offset: int
    limit: int
    next_offset: int | None
    items: list[PatientSummary] = Field(
        description="each patient's current decision, as `GET /v1/patients/{id}` gives it (without "
        "`history`), in the order of the job's files"
    )


def _patient_rows(
    session: SessionDep, job: ScoringJob, offset: int, limit: int | None
) -> tuple[int, list[PatientSummary]]:
    """The job's patients (first file first) and their current decisions. A patient none of whose
    files in the job could be stored is reported not graded (referable): its current result, if
    any, is an earlier screening's, and "no referral" from it cleared a patient whose photographs
    of today all failed (the session-29 review)."""
    names = repo.job_patients(session, job.id)
    page = names[offset : None if limit is None else offset + limit]
    # the page's patients, results and photographs in a few queries, not five per patient
    patients = repo.get_patients(session, job.clinic_id, [name for name, stored in page if stored])
    summaries = patient_summaries(session, list(patients.values()))
    rows = []
    for name, stored in page:
        patient = patients.get(name) if stored else None
        if patient is None:
            summary = PatientSummary(patient_id=name, referral_reasons=["not_graded_yet"])
            summary.eyes = {"left": EyeSummary(), "right": EyeSummary()}
        else:
            summary = summaries[patient.id]
        summary.history = []
        rows.append(summary)
    return len(names), rows


# grader_refers last: an addition, so a reader of the columns by position still works
PATIENT_CSV_COLUMNS = [
    "patient_id", "referable", "grade", "gradable", "left_grade", "left_referable", "right_grade",
    "right_referable", "referral_reasons", "model_version", "updated_at", "grader_refers",
]  # fmt: skip


def _patients_csv(rows: list[PatientSummary]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(PATIENT_CSV_COLUMNS)
    for r in rows:
        eyes = [
            (r.eyes[e].grade, r.eyes[e].referable) if e in r.eyes else (None, True) for e in ("left", "right")
        ]
        updated = r.updated_at.isoformat() if r.updated_at is not None else None
        values = [r.patient_id, r.referable, r.grade, r.gradable, *eyes[0], *eyes[1]]
        values += [";".join(r.referral_reasons), r.model_version, updated, r.grader_refers]
        writer.writerow([csv_cell(v) for v in values])
    return buf.getvalue()


@router.get(
    "/{job_id}/patients",
    response_model=JobPatientsPage,
    summary="Each patient of a folder job and their referral decision (JSON pages, or CSV)",
    description=(
        "What a clinic acts on after a folder job: one row per patient named by the job's files, "
        "with the patient-level rule applied (the worse eye; an eye ungradable, not photographed "
        "or with one referable photograph refers). The decision is the patient's current one, so "
        "it also counts photographs sent outside the job for the same visit."
    ),
    responses=PAGE_OR_CSV,
)
def get_job_patients(
    job_id: str,
    session: SessionDep,
    principal: PrincipalDep,
    api: ApiSettingsDep,
    offset: OffsetQuery = 0,
    limit: LimitQuery = 1000,
    format: FormatQuery = "json",
) -> Any:
    job = load_job(session, principal, job_id)
    audit(session, principal, "job.patients.read", target_type="job", target_id=job.id)
    return _page_or_csv(
        job, session, api, (offset, limit, format), _patient_rows, _patients_csv, JobPatientsPage, "-patients"
    )


def _page_or_csv(
    job: ScoringJob,
    session: SessionDep,
    api: ApiSettingsDep,
    query: tuple[int, int, str],
    rows_of: Callable[[SessionDep, ScoringJob, int, int | None], tuple[int, list[Any]]],
    to_csv: Callable[[list[Any]], str],
    page: type[JobResultsPage] | type[JobPatientsPage],
    suffix: str,
) -> Any:
    """Every row as CSV (``format=csv``), or one JSON page of at most DRSCREEN_MAX_PAGE_SIZE rows."""
    offset, limit, format = query
    if format == "csv":
        _, rows = rows_of(session, job, 0, None)
        return Response(
            to_csv(rows),
            media_type="text/csv",
            headers={"Content-Disposition": f'attachment; filename="job-{job.id}{suffix}.csv"'},
        )
    limit = min(limit, api.max_page_size)
    total, rows = rows_of(session, job, offset, limit)
    next_offset = offset + limit if offset + limit < total else None
    return page(job_id=job.id, total=total, offset=offset, limit=limit, next_offset=next_offset, items=rows)


@router.get(
    "/{job_id}/results",
    response_model=JobResultsPage,
    summary="Per-photograph results (JSON pages, or all of them as CSV)",
    responses=PAGE_OR_CSV,
)
def get_job_results(
    job_id: str,
    session: SessionDep,
    principal: PrincipalDep,
    api: ApiSettingsDep,
    offset: OffsetQuery = 0,
    limit: LimitQuery = 1000,
    format: FormatQuery = "json",
) -> Any:
    job = load_job(session, principal, job_id)
    audit(session, principal, "job.results.read", target_type="job", target_id=job.id)
    return _page_or_csv(job, session, api, (offset, limit, format), _rows, _csv, JobResultsPage, "")
