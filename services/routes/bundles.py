"""``/v1/bundles``: one patient's screening visit (up to two photographs per eye)."""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, File, UploadFile
from fastapi.responses import JSONResponse
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import Session

from core import repository as repo
from core.errors import InvalidInput, NotFound
from core.schemas import Accepted, BundleResult
from core.store import FileStore
from core.tables import Bundle
from services import idempotency
from services.deps import PrincipalDep, ProducerDep, SessionDep, SettingsDep, audit
from services.errors import error_responses
from services.formcheck import reject_unknown_fields
from services.routes.images import IdempotencyKey, PatientIdForm, commit_and_enqueue, refuse_if_erased
from services.uploads import Photo, record_photo, store_photos, validate_photo
from services.views import image_results, patient_summary

log = logging.getLogger(__name__)

router = APIRouter(prefix="/bundles", tags=["bundles"])

SLOTS = ("left_1", "left_2", "right_1", "right_2")
OptionalPhoto = Annotated[UploadFile | None, File(description="a photograph of that eye (optional)")]


def load_bundle(session: Session, principal: PrincipalDep, bundle_id: str) -> Bundle:
    bundle = repo.get_bundle(session, bundle_id, principal.clinic_id)
    if bundle is None:
        raise NotFound("no such bundle")
    return bundle


def _answer_existing(session: Session, principal: PrincipalDep, bundle_id: str) -> JSONResponse:
    """The answer to a retry: the bundle created first with the request's Idempotency-Key."""
    found = load_bundle(session, principal, bundle_id)
    return JSONResponse(Accepted(id=found.id, status=found.status).model_dump(mode="json"), 202)


def _refuse_one_photograph_as_both_eyes(photos: list[Photo]) -> None:
    """The same file as a left and a right photograph is one eye sent twice (a slip in the clinic's
    software): graded as both, the other eye would read "screened" without ever being seen."""
    both = repo.same_photograph_both_eyes((p.sha256, p.field.split("_", 1)[0]) for p in photos)
    if both:
        raise InvalidInput(
            "the same photograph was sent as the left and the right eye: send each eye's own photograph",
            {"fields": [p.field for p in photos if p.sha256 in both]},
        )


@router.post(
    "",
    status_code=202,
    response_model=Accepted,
    summary="Upload a patient's photographs (up to two per eye) for screening",
    responses=error_responses(401, 409, 413, 422, 429),
    dependencies=[reject_unknown_fields("patient_id", *SLOTS)],
)
def create_bundle(
    session: SessionDep,
    principal: PrincipalDep,
    settings: SettingsDep,
    producer: ProducerDep,
    patient_id: PatientIdForm,
    left_1: OptionalPhoto = None,
    left_2: OptionalPhoto = None,
    right_1: OptionalPhoto = None,
    right_2: OptionalPhoto = None,
    idempotency_key: IdempotencyKey = None,
) -> JSONResponse:
    key = idempotency.check_key(idempotency_key)
    uploads = dict(zip(SLOTS, (left_1, left_2, right_1, right_2), strict=True))
    if not any(uploads.values()):
        raise InvalidInput("a bundle needs at least one photograph", {"fields": list(SLOTS)})
    # Every file is validated before anything is stored or written: one bad photograph refuses the
    # whole bundle, so a visit is never half-recorded.
    photos: list[Photo] = [
        validate_photo(up, slot, max_bytes=settings.max_upload_bytes, max_pixels=settings.max_image_pixels)
        for slot, up in uploads.items()
        if up is not None
    ]
    _refuse_one_photograph_as_both_eyes(photos)
    fingerprint = idempotency.fingerprint(patient_id, *(f"{p.field}={p.sha256}" for p in photos))
    existing = key and idempotency.find(session, principal.clinic_id, "bundle", key, fingerprint)
    if existing:
        return _answer_existing(session, principal, existing)

    store = FileStore(settings.store_path)
    stored = list(zip(photos, store_photos(store, photos), strict=True))
    patient, created = repo.ensure_patient(session, principal.clinic_id, patient_id)
    patient_row_id = patient.id
    try:
        bundle = repo.create_bundle(session, principal.clinic_id, patient_row_id)
        image_ids = []
        for photo, file in stored:
            image = record_photo(
                session,
                clinic_id=principal.clinic_id,
                patient_id=patient_row_id,
                eye=photo.field.split("_", 1)[0],
                photo=photo,
                stored=file,
                bundle_id=bundle.id,
            )
            image_ids.append(image.id)
        bundle_id = bundle.id
        # One task for the whole visit: the worker scores the photographs as one batch.
        answered = commit_and_enqueue(
            session,
            principal,
            producer,
            kind="bundle",
            resource_id=bundle_id,
            patient_id=patient_row_id,
            image_ids=image_ids,
            key=key,
            fingerprint=fingerprint,
            detail={"images": image_ids},
            store=store,
            photos=photos,
        )
    except sa_exc.IntegrityError:  # 409 when an erasure of the patient won the race
        refuse_if_erased(session, store, patient_row_id, created, [file.relpath for _, file in stored])
        raise
    if answered != bundle_id:  # a concurrent request with the same key won: answer as to a retry
        return _answer_existing(session, principal, answered)
    log.info("bundle %s queued with %d photograph(s)", bundle_id, len(image_ids))
    return JSONResponse(Accepted(id=bundle_id, status="queued").model_dump(mode="json"), 202)


@router.get(
    "/{bundle_id}",
    response_model=BundleResult,
    summary="Status, per-photograph results and the patient's aggregate",
    responses=error_responses(401, 404, 429),
)
def get_bundle(bundle_id: str, session: SessionDep, principal: PrincipalDep) -> BundleResult:
    bundle = load_bundle(session, principal, bundle_id)
    images = repo.bundle_images(session, bundle.id)
    patient = repo.get_patient_by_id(session, bundle.patient_id)
    audit(
        session,
        principal,
        "bundle.read",
        patient_id=bundle.patient_id,
        target_type="bundle",
        target_id=bundle.id,
    )
    # Status from the images themselves: the bundle row may lag behind the worker by a moment.
    status = repo.combined_status(im.status for im in images)
    return BundleResult(
        id=bundle.id,
        status=status,
        images=image_results(session, images),
        patient=patient_summary(session, patient) if patient is not None else None,
    )
