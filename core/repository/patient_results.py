"""Patients' eye and patient results: the latest visit's photographs pooled by the contract's
rule, recorded as the current result, earlier ones kept as history."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Iterator, Sequence
from datetime import datetime, timedelta
from typing import Protocol, TypeVar

from sqlalchemy import ColumnElement, exists, func, select, update
from sqlalchemy.orm import Session, aliased, selectinload

from core.aggregation import EyeGradeFn, GradeFn, ImageScore, PatientAggregate, aggregate_patient
from core.repository._sql import in_batches
from core.repository.images import list_patient_images
from core.repository.patients import lock_patients_for_result
from core.repository.predictions import graded_gradable, predictions_for_images
from core.settings import get_settings
from core.tables import EyeResult, Image, PatientResult, Prediction, utcnow


def record_patient_result(
    session: Session,
    patient_id: int,
    aggregate: PatientAggregate,
    *,
    model_version_id: int | None,
    trigger: str | None = None,
) -> PatientResult:
    """Store a new current result (one row per eye too); earlier rows stay as history."""
    session.execute(
        update(PatientResult)
        .where(PatientResult.patient_id == patient_id, PatientResult.is_current.is_(True))
        .values(is_current=False)
        .execution_options(synchronize_session="fetch")
    )
    session.execute(
        update(EyeResult)
        .where(EyeResult.patient_id == patient_id, EyeResult.is_current.is_(True))
        .values(is_current=False)
        .execution_options(synchronize_session="fetch")
    )
    now = utcnow()
    result = PatientResult(
        patient_id=patient_id,
        model_version_id=model_version_id,
        grade=aggregate.grade,
        gradable=aggregate.gradable,
        referable=aggregate.referable,
        trigger=trigger,
        is_current=True,
        computed_at=now,
    )
    for eye in aggregate.eyes.values():
        result.eyes.append(
            EyeResult(
                patient_id=patient_id,
                eye=eye.eye,
                model_version_id=model_version_id,
                grade=eye.grade,
                gradable=eye.gradable,
                referable=eye.referable,
                probabilities=eye.probabilities,
                image_ids=list(eye.image_ids),
                is_current=True,
                computed_at=now,
            )
        )
    session.add(result)
    session.flush()
    return result


class _Uploaded(Protocol):
    @property
    def created_at(self) -> datetime: ...


PhotoT = TypeVar("PhotoT", bound=_Uploaded)


def latest_visit(images: Sequence[PhotoT], window: timedelta) -> list[PhotoT]:
    """The images of the patient's latest screening visit: uploaded within ``window`` of the
    newest one (all of them with a zero window). Upload time stands in for the visit's date,
    which clinic software does not send; a photograph a folder job sends again keeps its first
    upload's (``Image.sent_at`` is the purge's clock, not the visit's): a clinic's export that
    holds every past visit would otherwise pool them all into today's."""
    if not images or window <= timedelta(0):
        return list(images)
    newest = max(im.created_at for im in images)
    return [im for im in images if im.created_at >= newest - window]


def same_photograph_both_eyes(photos: Iterable[tuple[str, str]]) -> set[str]:
    """The sha256 of every photograph given, as (sha256, eye), under both eyes: one eye sent as
    both, and nothing says which. A bundle doing it is refused; elsewhere neither eye counts it."""
    eyes_of: dict[str, set[str]] = {}
    for sha256, eye in photos:
        eyes_of.setdefault(sha256, set()).add(eye)
    return {sha for sha, eyes in eyes_of.items() if len(eyes) > 1}


def recompute_patient(
    session: Session,
    patient_id: int,
    *,
    model_version_id: int,
    grade_fn: GradeFn,
    trigger: str | None = None,
    visit_window: timedelta | None = None,
    eye_grade_fn: EyeGradeFn | None = None,
) -> PatientResult:
    """Apply the contract's rule to the finished images of the patient's latest visit
    (``latest_visit``; ``visit_window`` default ``DRSCREEN_VISIT_WINDOW_HOURS``) scored by that
    model version, and record the result; earlier visits' results stay in the history. Images not
    done yet, failed, or without a prediction count as ungradable. Locks the patient first
    (:func:`lock_patients_for_result`; a no-op when the caller already holds it). While a referral
    stands and a grading is unfinished, nothing is recorded (:func:`held_referral`): the current
    result is returned and stays."""
    lock_patients_for_result(session, [patient_id])
    aggregate = patient_aggregate(
        session,
        patient_id,
        model_version_id=model_version_id,
        grade_fn=grade_fn,
        visit_window=visit_window,
        eye_grade_fn=eye_grade_fn,
    )
    held = held_referral(session, patient_id, aggregate, visit_window=visit_window)
    if held is not None:
        return held
    return record_patient_result(
        session, patient_id, aggregate, model_version_id=model_version_id, trigger=trigger
    )


#: A photograph's statuses while its grading is under way.
UNFINISHED = ("queued", "running")


def _graded_before() -> ColumnElement[bool]:
    return exists().where(Prediction.image_id == Image.id)


def _regrade_failed() -> ColumnElement[bool]:
    """Failed after an earlier grading (a re-grade by a new release, or of a photograph sent
    again, that failed: the photograph was seen, its new grade never came), and not graded since
    under another row (the clinic sent the same file for the same eye again: that grading stands)."""
    again = aliased(Image)
    graded_again = exists().where(
        again.patient_id == Image.patient_id,
        again.eye == Image.eye,
        again.sha256 == Image.sha256,
        again.status == "done",
        again.id != Image.id,
    )
    return (Image.status == "failed") & _graded_before() & ~graded_again


def _unfinished() -> ColumnElement[bool]:
    """A photograph whose grading is not complete: queued or running, or its re-grade failed."""
    return Image.status.in_(UNFINISHED) | _regrade_failed()


def unfinished_gradings(
    session: Session, patient_id: int, visit_window: timedelta | None = None
) -> list[Image]:
    """The photographs of the patient's latest visit whose grading is not complete
    (:func:`_unfinished`)."""
    if visit_window is None:
        visit_window = get_settings().visit_window
    visit = {im.id for im in latest_visit(list_patient_images(session, patient_id), visit_window)}
    if not visit:
        return []
    rows = session.scalars(select(Image).where(Image.patient_id == patient_id, _unfinished()))
    return [im for im in rows if im.id in visit]


def _regrading() -> ColumnElement[bool]:
    return (Image.status.in_(UNFINISHED) & _graded_before()) | _regrade_failed()


def regrading_photo_ids(session: Session, patient_ids: Sequence[int]) -> dict[int, set[str]]:
    """patient id -> the ids of their photographs (every visit) graded before whose new grading
    is under way or failed, for the patients that have some (a first grading under way is
    "pending", not a re-check)."""
    out: dict[int, set[str]] = {}
    regrading = _regrading()
    for batch in in_batches(list(dict.fromkeys(patient_ids))):
        rows = session.execute(
            select(Image.patient_id, Image.id).where(Image.patient_id.in_(batch), regrading)
        )
        for patient_id, image_id in rows:
            out.setdefault(patient_id, set()).add(image_id)
    return out


def grades_regrading(image_ids: Iterable[object], regrading: Collection[str]) -> bool:
    """Whether a decision that graded ``image_ids`` is being re-checked: one of them is among
    ``regrading`` (:func:`regrading_photo_ids`). The patient page, the API and the home page's
    list use this one rule."""
    return any(str(i) in regrading for i in image_ids)


def held_referral(
    session: Session,
    patient_id: int,
    aggregate: PatientAggregate,
    *,
    visit_window: timedelta | None = None,
) -> PatientResult | None:
    """The patient's current result when it is a referral that must stand instead of
    ``aggregate``, else None (record ``aggregate``): while a photograph of the visit is queued or
    running, a referral stays as it is until the gradings are in (the last complete decision is
    shown, not a partial one); a failed re-grade (:func:`unfinished_gradings`) never withdraws one.

    An unfinished photograph counts as ungradable in ``aggregate``, and an eye with another
    photograph is graded from that one alone: while a photograph that referred the patient was
    graded again (a new release, a photograph sent again, the sweep sending it again), the stored
    result said "no referral" and the patient left the home page's list, for good if the re-grade
    failed (session 32). A first decision, and any while no referral stands, is recorded at once
    as before (a pending photograph counts as ungradable, so referable)."""
    current = get_current_patient_result(session, patient_id)
    if current is None or not current.referable:
        return None
    unfinished = unfinished_gradings(session, patient_id, visit_window)
    if any(im.status in UNFINISHED for im in unfinished):
        return current
    if unfinished and not aggregate.referable:
        return current
    return None


def patient_aggregate(
    session: Session,
    patient_id: int,
    *,
    model_version_id: int,
    grade_fn: GradeFn,
    visit_window: timedelta | None = None,
    eye_grade_fn: EyeGradeFn | None = None,
) -> PatientAggregate:
    """What :func:`recompute_patient` would record, without recording it."""
    if visit_window is None:
        visit_window = get_settings().visit_window
    images = latest_visit(list_patient_images(session, patient_id), visit_window)
    preds = predictions_for_images(session, [im.id for im in images], model_version_id)
    scores = []
    counted: set[tuple[str, str]] = set()
    both_eyes = same_photograph_both_eyes((im.sha256, im.eye) for im in images)
    for im in images:
        pred = preds.get(im.id)
        graded = pred is not None and graded_gradable(im, pred)
        # One photograph sent as the left and the right eye shows one eye, and nothing says which:
        # graded for both, the other eye was never screened and read "no referral". It is pooled
        # into neither eye; its own grade still refers both (it is referable, whichever eye it is).
        usable = graded and im.sha256 not in both_eyes
        if usable:
            # The same bytes sent twice for one eye (a retry without Idempotency-Key) are one
            # photograph: counted twice they would outweigh the eye's other photographs.
            if (im.eye, im.sha256) in counted:
                continue
            counted.add((im.eye, im.sha256))
        scores.append(
            ImageScore(
                image_id=im.id,
                eye=im.eye,
                gradable=usable,
                probabilities=pred.probabilities if (usable and pred is not None) else None,
                members=pred.members if (usable and pred is not None) else None,
                grade=pred.grade if (graded and pred is not None) else None,
            )
        )
    return aggregate_patient(scores, grade_fn, eye_grade_fn=eye_grade_fn)


#: A patient's results, the one recorded last first: by id, which grows with each result recorded
#: (a result marks every earlier one not current, so the last one recorded is the current one).
#: Not by ``computed_at``: that is the recording worker's wall clock, and a worker host whose clock
#: is behind another's, or one NTP stepped back, made an older "no referral" the newest result while
#: the current one referred the patient (the time review, session 32).
RECORDED_NEWEST_FIRST = (PatientResult.id.desc(),)


def get_current_patient_result(session: Session, patient_id: int) -> PatientResult | None:
    return session.scalars(
        select(PatientResult)
        .where(PatientResult.patient_id == patient_id)
        .order_by(*RECORDED_NEWEST_FIRST)
        .limit(1)
    ).first()


def newest_patient_results(session: Session, patient_ids: Sequence[int]) -> dict[int, PatientResult]:
    """patient id -> its newest result (:func:`patient_history`'s first), with its eyes, for the
    patients that have one: a job's list of patients read each one's 100 newest with their eyes to
    keep the first."""
    newest = func.row_number().over(
        partition_by=PatientResult.patient_id,
        order_by=RECORDED_NEWEST_FIRST,
    )
    out: dict[int, PatientResult] = {}
    for batch in in_batches(list(dict.fromkeys(patient_ids))):
        ranked = (
            select(PatientResult.id, newest.label("rank"))
            .where(PatientResult.patient_id.in_(batch))
            .subquery()
        )
        stmt = select(PatientResult).join(ranked, ranked.c.id == PatientResult.id).where(ranked.c.rank == 1)
        out.update((r.patient_id, r) for r in session.scalars(stmt))
    return out


def patient_history(session: Session, patient_id: int, limit: int | None = 100) -> list[PatientResult]:
    """Results newest first (the current one included); ``limit=None``: all of them."""
    return list(
        session.scalars(
            select(PatientResult)
            .where(PatientResult.patient_id == patient_id)
            .order_by(*RECORDED_NEWEST_FIRST)
            .limit(limit)
        )
    )


def iter_patient_history(session: Session, patient_id: int, batch: int = 50) -> Iterator[PatientResult]:
    """Results newest first, read ``batch`` at a time with their eyes: a reader that stops at the
    first it wants reads no further (a patient with hundreds of results, folder-job chunks and
    re-grades each adding one, was read whole with every eye for one earlier visit's page)."""
    stmt = (
        select(PatientResult)
        .where(PatientResult.patient_id == patient_id)
        .order_by(*RECORDED_NEWEST_FIRST)
        .options(selectinload(PatientResult.eyes))
        .execution_options(yield_per=batch)
    )
    results = session.scalars(stmt)
    try:
        yield from results
    finally:
        results.close()  # stopped early: the cursor is let go
