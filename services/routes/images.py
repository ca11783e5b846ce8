"""``/v1/images``: upload one photograph, read its result, fetch its heatmap."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Annotated, Any, Literal

from fastapi import APIRouter, File, Form, Header, Query, Request, UploadFile
from fastapi.responses import JSONResponse, Response
from sqlalchemy import exc as sa_exc
from sqlalchemy import select
from sqlalchemy.orm import Session

from core import grader, retention
from core import producer as tasks_out
from core import repository as repo
from core.errors import Conflict, NotFound, Unavailable
from core.schemas import PATIENT_ID_PATTERN, Accepted, Eye, GraderGradeIn, GraderGradeOut, ImageResult
from core.store import FileStore
from core.tables import Image, Patient, as_utc, utcnow
from services import idempotency
from services.deps import ApiSettingsDep, PrincipalDep, ProducerDep, SessionDep, SettingsDep, audit
from services.errors import NotReady, error_responses
from services.formcheck import reject_unknown_fields
from services.uploads import Photo, record_photo, store_photo, validate_photo
from services.views import image_result, private_image_headers
from services.waits import WaitSlots

log = logging.getLogger(__name__)

router = APIRouter(prefix="/images", tags=["images"])

PatientIdForm = Annotated[
    str,
    Form(
        min_length=1,
        max_length=128,
        pattern=PATIENT_ID_PATTERN,
        description="the clinic's patient identifier (letters, digits, `.`, `_`, `-`)",
    ),
]
IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        description="makes a retried POST safe: the same key answers the resource created first",
    ),
]
#: Explanations asked for on demand, image id -> monotonic time (so polling does not flood the queue).
EXPLAIN_RETRY_SECONDS = 60.0
EXPLAIN_GRACE_SECONDS = 30.0


def enqueue_scoring(producer: ProducerDep, image_ids: list[str]) -> None:
    """Publish after the commit. A lost publish is not fatal: the rows stay ``queued`` and the
    workers' maintenance sweep re-queues them."""
    try:
        tasks_out.send_score_images(image_ids, app=producer)
    except Exception:
        log.warning(
            "could not queue %d image(s); the sweep will re-queue them", len(image_ids), exc_info=True
        )


def commit_and_enqueue(
    session: Session,
    principal: PrincipalDep,
    producer: ProducerDep,
    *,
    kind: Literal["image", "bundle"],
    resource_id: str,
    patient_id: int,
    image_ids: list[str],
    key: str | None,
    fingerprint: str,
    detail: dict[str, Any] | None = None,
    store: FileStore | None = None,
    photos: Sequence[Photo] = (),
) -> str:
    """Finish an accepted upload whose rows are written: audit ``{kind}.create``, remember its
    ``Idempotency-Key``, commit, and only then queue its photographs (a worker is never told about
    rows that do not exist yet). Returns the id to answer: ``resource_id``.

    ``photos`` are stored again in ``store`` once the rows are committed, when their files are
    not there: bytes another patient or clinic had stored were not written by this upload, and an
    erasure of theirs may have removed them before these rows were committed
    (core.retention.remove_unreferenced_files).

    When a concurrent request with the same key committed first (the key's unique constraint
    refuses this one), everything this request wrote is rolled back, nothing is queued, and the
    id returned is the winner's (or Conflict when the winner was a different request): the caller
    answers as a retry would. The photographs already put in the file store stay there: the store
    is content-addressed (by sha256), so they are the winner's files too or harmless leftovers."""
    audit(
        session,
        principal,
        f"{kind}.create",
        patient_id=patient_id,
        target_type=kind,
        target_id=resource_id,
        detail=detail,
    )
    try:
        if key:
            idempotency.remember(
                session,
                clinic_id=principal.clinic_id,
                kind=kind,
                key=key,
                request_fingerprint=fingerprint,
                resource_id=resource_id,
            )
        session.commit()
    except sa_exc.IntegrityError:
        session.rollback()
        # find() reads in a new transaction, which sees the winner's committed key; no key (or
        # none found): the error was about something else
        winner = key and idempotency.find(session, principal.clinic_id, kind, key, fingerprint)
        if not winner:
            raise
        log.info("%s %s not kept: a concurrent request with its Idempotency-Key won", kind, resource_id)
        return winner
    if store is not None:
        try:
            for photo in photos:
                store_photo(store, photo)  # a stat when the file is there
        except Unavailable:  # committed already: a worker finding the file missing tries again later
            log.warning("could not check the stored photographs of %s %s", kind, resource_id, exc_info=True)
    enqueue_scoring(producer, image_ids)
    return resource_id


ERASED_MEANWHILE = (
    "the patient was being erased while this upload was saved, so nothing was kept; "
    "send the photograph(s) again (they start a new record of the patient)"
)


def refuse_if_erased(
    session: Session, store: FileStore, patient_id: int, created: bool, paths: Sequence[str]
) -> None:
    """Called on an IntegrityError while an upload's rows were written: raises Conflict (409)
    when the patient row is gone, i.e. an erasure of the patient (core.retention) committed
    between ``get_or_create_patient`` and the upload's INSERT, whose foreign key then failed
    (PostgreSQL; on SQLite the write lock serialises the two). Returns otherwise: another
    integrity error, which the caller re-raises.

    Not retried with a new patient row: the erasure came first, and re-creating the patient
    unasked would undo what the clinic had just asked for; a client that means it sends the
    photograph again. The photographs this upload stored go unless a row references them, as the
    erasure's own files did (workers treat heatmaps drawn for erased photographs the same way)."""
    session.rollback()  # the failed transaction; the check below reads in a new one
    if created:  # this request's own patient row: no erasure could see it, so it is another error
        return
    if session.scalar(select(Patient.id).where(Patient.id == patient_id)) is not None:
        return
    removed = retention.remove_unreferenced_files(session, store, paths)
    log.info("upload refused: its patient was erased meanwhile (%d stored file(s) removed)", removed)
    raise Conflict(ERASED_MEANWHILE)


def load_image(session: Session, principal: PrincipalDep, image_id: str) -> Image:
    image = repo.get_image(session, image_id, principal.clinic_id)
    if image is None:
        raise NotFound("no such image")
    return image


def _wait_until_finished(
    session: Session, image_id: str, seconds: float, poll: float
) -> tuple[Image | None, str | None]:
    """Re-read the row until it is done or failed, or ``seconds`` pass. Returns the finished row,
    or None and the status last read (after a timeout: "processing" rather than the "queued" of
    before the wait), or None twice when the database stops answering (the photograph is already
    saved and queued, so the caller answers 202 rather than an error that a client would retry
    with a second upload)."""
    deadline = time.monotonic() + seconds
    try:
        while True:
            session.expire_all()
            image = session.get(Image, image_id)
            if image is None:
                return None, None
            if image.status in ("done", "failed"):
                return image, image.status
            status = image.status
            # End the read transaction: the next poll sees what the worker committed since, and
            # the pooled connection goes back while this request sleeps (dozens of waiting
            # requests held one each and exhausted the pool).
            session.commit()
            if time.monotonic() >= deadline:
                return None, status
            time.sleep(min(poll, max(0.0, deadline - time.monotonic())))
    except (sa_exc.OperationalError, sa_exc.TimeoutError):
        log.warning("stopped waiting for image %s: the database did not answer", image_id)
        session.rollback()
        return None, None


@router.post(
    "",
    status_code=202,
    response_model=Accepted,
    summary="Upload one photograph for screening",
    responses={
        200: {"model": ImageResult, "description": "with `wait`: the finished result"},
        **error_responses(401, 409, 413, 422, 429),
    },
    dependencies=[reject_unknown_fields("file", "patient_id", "eye")],
)
def create_image(
    request: Request,
    session: SessionDep,
    principal: PrincipalDep,
    settings: SettingsDep,
    api: ApiSettingsDep,
    producer: ProducerDep,
    file: Annotated[UploadFile, File(description="the photograph (JPEG, PNG, TIFF, BMP or WebP)")],
    patient_id: PatientIdForm,
    eye: Annotated[Eye, Form(description="`left` or `right`")],
    idempotency_key: IdempotencyKey = None,
    wait: Annotated[
        float | None, Query(ge=0, le=30, description="seconds (<= 30) to wait for the result")
    ] = None,
) -> Any:
    key = idempotency.check_key(idempotency_key)
    photo = validate_photo(
        file, "file", max_bytes=settings.max_upload_bytes, max_pixels=settings.max_image_pixels
    )
    fingerprint = idempotency.fingerprint(patient_id, eye, photo.sha256)
    existing = key and idempotency.find(session, principal.clinic_id, "image", key, fingerprint)
    if existing:
        image = load_image(session, principal, existing)
    else:
        store = FileStore(settings.store_path)
        stored = store_photo(store, photo)
        patient, created = repo.ensure_patient(session, principal.clinic_id, patient_id)
        patient_row_id = patient.id
        try:
            image = record_photo(
                session,
                clinic_id=principal.clinic_id,
                patient_id=patient_row_id,
                eye=eye,
                photo=photo,
                stored=stored,
            )
            image_id = image.id
            answered = commit_and_enqueue(
                session,
                principal,
                producer,
                kind="image",
                resource_id=image_id,
                patient_id=patient_row_id,
                image_ids=[image_id],
                key=key,
                fingerprint=fingerprint,
                store=store,
                photos=[photo],
            )
        except sa_exc.IntegrityError:
            refuse_if_erased(session, store, patient_row_id, created, [stored.relpath])
            raise
        if answered == image_id:
            log.info("image %s queued", image_id)
        else:  # a concurrent request with the same key won: answer its image, as to a retry
            image = load_image(session, principal, answered)

    accepted = Accepted(id=image.id, status=image.status)
    if wait:
        slots: WaitSlots = request.app.state.wait_slots
        with slots.slot(principal.api_key_id) as may_wait:
            finished, status = (
                _wait_until_finished(
                    session, image.id, min(wait, api.max_wait_seconds), api.wait_poll_seconds
                )
                if may_wait
                else (None, None)  # every slot taken: answer at once, the client polls (services/waits.py)
            )
        if finished is not None:
            return JSONResponse(image_result(session, finished).model_dump(mode="json"), status_code=200)
        if status is not None:
            accepted = Accepted(id=image.id, status=status)
    return JSONResponse(accepted.model_dump(mode="json"), status_code=202)


@router.get(
    "/{image_id}",
    response_model=ImageResult,
    summary="Status and result of one photograph",
    responses=error_responses(401, 404, 429),
)
def get_image(image_id: str, session: SessionDep, principal: PrincipalDep) -> ImageResult:
    image = load_image(session, principal, image_id)
    audit(
        session,
        principal,
        "image.read",
        patient_id=image.patient_id,
        target_type="image",
        target_id=image.id,
    )
    return image_result(session, image)


@router.get(
    "/{image_id}/explanation",
    response_class=Response,
    summary="Grad-CAM heatmap over the photograph (PNG, the photograph's size)",
    responses={
        200: {"content": {"image/png": {}}, "description": "the heatmap overlaid on the photograph"},
        **error_responses(401, 404, 409, 429),
    },
)
def get_explanation(
    request: Request,
    image_id: str,
    session: SessionDep,
    principal: PrincipalDep,
    settings: SettingsDep,
    producer: ProducerDep,
) -> Response:
    image = load_image(session, principal, image_id)
    row = repo.current_explanation(session, image.id)  # of the grade shown, not an older release's
    if row is None:
        if image.status == "failed":
            raise NotFound("the photograph could not be scored, so it has no explanation")
        if image.status == "done" and not repo.graded_gradable(image, repo.get_prediction(session, image.id)):
            raise NotFound("the photograph is ungradable, so it has no explanation")
        if image.status == "done":
            _request_explanation(request, producer, image)
        raise NotReady("the explanation is not ready yet; retry shortly")
    store = FileStore(settings.store_path)
    if not store.exists(row.stored_path):
        raise NotFound("the explanation file is missing from the store")
    if not repo.on_current_scale(row):
        # drawn before heatmaps shared one scale: served (its release may no longer be served
        # anywhere), and drawn again on the current scale where a worker of its release can
        _request_explanation(request, producer, image, grace=False)
    audit(
        session,
        principal,
        "explanation.read",
        patient_id=image.patient_id,
        target_type="image",
        target_id=image.id,
    )
    png = store.read_bytes(row.stored_path)
    return Response(png, media_type="image/png", headers=private_image_headers())


@router.put(
    "/{image_id}/grader-grade",
    response_model=GraderGradeOut,
    summary="Record a human grader's grade of the photograph (replaces an earlier one)",
    description="The reference the model is compared against in production (`GET /v1/agreement`). "
    "`grade` 0..4, or null when the grader found the photograph ungradable; `grader` names who "
    "graded. Recording another grade replaces it, audited with the grade it replaced; the same "
    "grade by the same grader again changes nothing (a retry is harmless, its time stays). The "
    "model's grade of the photograph is not changed.",
    responses=error_responses(401, 404, 422, 429),
)
def put_grader_grade(
    image_id: str, body: GraderGradeIn, session: SessionDep, principal: PrincipalDep
) -> GraderGradeOut:
    image = load_image(session, principal, image_id)
    done = grader.record(
        session, image, grade=body.grade, grader=body.grader, api_key_id=principal.api_key_id
    )
    if done is None:  # erased while this request ran
        raise NotFound("no such image")
    if done.changed:
        audit(
            session,
            principal,
            "grader_grade.record",
            patient_id=image.patient_id,
            target_type="image",
            target_id=image.id,
            detail={"grade": grader.label(done.row), "previous": done.previous},
        )
    return grader.as_out(done.row)


@router.delete(
    "/{image_id}/grader-grade",
    status_code=204,
    response_class=Response,
    summary="Delete the grader's grade of the photograph (recorded by mistake)",
    responses=error_responses(401, 404, 429),
)
def delete_grader_grade(image_id: str, session: SessionDep, principal: PrincipalDep) -> Response:
    image = load_image(session, principal, image_id)
    previous = grader.remove(session, image.id)
    if previous is None:
        raise NotFound("the photograph has no grader's grade")
    audit(
        session,
        principal,
        "grader_grade.delete",
        patient_id=image.patient_id,
        target_type="image",
        target_id=image.id,
        detail={"previous": previous},
    )
    return Response(status_code=204)


def _request_explanation(request: Request, producer: ProducerDep, image: Image, grace: bool = True) -> None:
    """Workers draw heatmaps on their own after scoring (except for folder jobs that did not ask);
    when one is still missing a while after the grade, ask for it, at most once a minute.
    ``grace=False``: no waiting for the worker's own drawing (there is a heatmap, to be redrawn)."""
    finished = image.finished_at
    recent = finished is not None and (utcnow() - as_utc(finished)).total_seconds() < EXPLAIN_GRACE_SECONDS
    if grace and recent:
        return
    asked: dict[str, float] = request.app.state.explain_requested
    now = time.monotonic()
    if now - asked.get(image.id, -1e9) < EXPLAIN_RETRY_SECONDS:
        return
    asked[image.id] = now
    try:
        tasks_out.send_explain_image(image.id, app=producer)
    except Exception:
        log.warning("could not queue an explanation", exc_info=True)
