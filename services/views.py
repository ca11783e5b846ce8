"""Rows -> the contract's JSON shapes (``core.schemas``). Read-only; no commits here."""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from types import MappingProxyType
from typing import cast

from sqlalchemy.orm import Session

from core import grader, grader_referral
from core import repository as repo
from core.aggregation import REFERABLE_GRADE
from core.schemas import Eye, EyeSummary, GraderReferral, ImageResult, PatientHistoryEntry, PatientSummary
from core.settings import get_settings
from core.tables import EYES, Image, Patient, PatientResult


def explanation_url(image_id: str) -> str:
    return f"/v1/images/{image_id}/explanation"


def _model_ref(session: Session, model_version_id: int | None, cache: dict[int, str]) -> str | None:
    if model_version_id is None:
        return None
    if model_version_id not in cache:
        row = repo.get_model_version(session, model_version_id)
        cache[model_version_id] = row.ref if row is not None else ""
    return cache[model_version_id] or None


def image_results(
    session: Session, images: list[Image], graded_earlier: Collection[str] = ()
) -> list[ImageResult]:
    """Results of several images (one query for their predictions and one for their patients).
    ``graded_earlier``: ids of photographs a newer release is grading again whose earlier grade
    stands meanwhile (a finished job's rows): reported done with that grade, not queued."""
    preds = repo.predictions_for_images(session, [im.id for im in images])
    graders = grader.for_images(session, [im.id for im in images])
    refs: dict[int, str] = {}
    # one IN query: a job's CSV looked its 4,750 patients up one by one (the review)
    patients = repo.external_ids_of(session, [im.patient_id for im in images])
    out = []
    for im in images:
        status = "done" if im.id in graded_earlier and im.status in ("queued", "running") else im.status
        result = ImageResult(
            id=im.id,
            status=status,
            patient_id=patients.get(im.patient_id, ""),
            eye=im.eye,
            error=im.error if im.status == "failed" else None,
            created_at=im.created_at,
        )
        if im.id in graders:
            result.grader_grade = grader.as_out(graders[im.id])
        pred = preds.get(im.id)
        if status == "done":
            gradable = repo.graded_gradable(im, pred, status)
            result.gradable = gradable
            # the quality report is the latest grading's; after a rollback the grading shown may
            # be another release's, whose gate decided otherwise: its reasons would contradict it
            agrees = (im.quality or {}).get("gradable", gradable) == gradable
            result.quality = im.quality if agrees else None
            # Ungradable means "refer" for clinics, whatever the ensemble thought of the pixels.
            result.referable = True if not gradable else (pred.referable if pred is not None else None)
            if pred is not None:
                result.grade = pred.grade if gradable else None
                result.probabilities = pred.probabilities
                result.members = pred.members
                result.model_version = _model_ref(session, pred.model_version_id, refs)
            # an ungradable photograph has no heatmap (its endpoint answers 404)
            result.explanation_url = explanation_url(im.id) if gradable else None
        out.append(result)
    return out


def image_result(session: Session, image: Image) -> ImageResult:
    return image_results(session, [image])[0]


def _eyes_of(result: PatientResult) -> dict[Eye, EyeSummary]:
    """Both eyes, always (the contract's ``left``/``right``): an eye the result has no row for is
    reported as not photographed (ungradable, no image)."""
    eyes: dict[Eye, EyeSummary] = {cast(Eye, name): EyeSummary() for name in EYES}
    for e in result.eyes:
        eyes[cast(Eye, e.eye)] = EyeSummary(
            grade=e.grade, gradable=e.gradable, referable=e.referable, image_ids=[str(i) for i in e.image_ids]
        )
    return eyes


def _history(
    results: list[PatientResult], refs: dict[int, str], session: Session
) -> list[PatientHistoryEntry]:
    """One entry per screening and release: a worker may recompute a patient several times while
    the photographs of one bundle or job come in, and those partial results share a ``trigger``;
    keep the newest of each (results come newest first). A newer release grading the screening
    again recomputes it under the same trigger: that is a new entry, the earlier release's result
    stays visible (it was what the clinic was told)."""
    seen: set[tuple[str, int | None]] = set()
    entries = []
    for r in results:
        if r.trigger:
            key = (r.trigger, r.model_version_id)
            if key in seen:
                continue
            seen.add(key)
        entries.append(
            PatientHistoryEntry(
                grade=r.grade,
                referable=r.referable,
                gradable=r.gradable,
                model_version=_model_ref(session, r.model_version_id, refs),
                computed_at=r.computed_at,
                eyes=_eyes_of(r),
            )
        )
    return entries


def grades_visit(result: PatientResult, visit: Collection[repo.VisitPhoto]) -> bool:
    """Whether ``result`` grades ``visit`` (the patient's latest): every photograph it holds is one
    of the visit's. While a follow-up's first photographs wait for a worker, the current result is
    still the previous visit's; with a sliding window it may share some photographs with today's
    (A 30 h ago and B 10 h ago graded together, C now: the visit is B and C)."""
    graded = {str(i) for eye in result.eyes for i in eye.image_ids}
    return graded <= {im.id for im in visit}


def patient_summary(session: Session, patient: Patient) -> PatientSummary:
    """The latest visit's aggregate with the history (newest first). Until a result of that visit
    exists the patient is reported ungradable (grade null, referable true) with the image ids
    received so far: an earlier visit's result, shown beside today's waiting photographs, read as
    today's grade (it stays in the history)."""
    refs: dict[int, str] = {}
    results = repo.patient_history(session, patient.id)
    images = [repo.VisitPhoto.of(im) for im in repo.list_patient_images(session, patient.id)]
    regrading = repo.regrading_photo_ids(session, [patient.id]).get(patient.id, set())
    referrals = grader_referral.of_photographs(session, [im.id for im in images])
    summary = _current_summary(
        patient,
        results[0] if results else None,
        images,
        lambda v: _model_ref(session, v, refs),
        regrading,
        referrals,
    )
    if results:
        summary.history = _history(results, refs, session)
    return summary


def patient_summaries(session: Session, patients: Sequence[Patient]) -> dict[int, PatientSummary]:
    """patient id -> :func:`patient_summary` without its history, for several patients in a few
    queries (a job's list of who to refer ran five per patient: 47 s for 4,750 patients)."""
    ids = [p.id for p in patients]
    newest = repo.newest_patient_results(session, ids)
    images = repo.visit_photos_of_patients(session, ids)
    regrading = repo.regrading_photo_ids(session, ids)
    referrals = grader_referral.of_photographs(session, [im.id for v in images.values() for im in v])
    refs: dict[int, str] = {}  # the request's: a release's ref is read once, not once a patient
    return {
        p.id: _current_summary(
            p,
            newest.get(p.id),
            images.get(p.id, []),
            lambda v: _model_ref(session, v, refs),
            regrading.get(p.id, set()),
            referrals,
        )
        for p in patients
    }


def _current_summary(
    patient: Patient,
    newest: PatientResult | None,
    images: Sequence[repo.VisitPhoto],
    model_ref: Callable[[int | None], str | None],
    regrading: Collection[str] = (),
    referrals: Mapping[str, GraderReferral] = MappingProxyType({}),
) -> PatientSummary:
    """:func:`patient_summary` without the history, from the patient's newest result and every
    photograph of theirs (oldest first). ``regrading``: the ids of the patient's photographs graded
    before whose new grading is under way or failed (``repository.regrading_photo_ids``).
    ``referrals``: graders' grades that refer, by photograph (``grader_referral.of_photographs``);
    those of the latest visit refer the patient beside the model's decision, which they leave as
    it is (the contract's ``referable`` is the model's rule)."""
    summary = PatientSummary(patient_id=patient.external_id)
    visit = repo.latest_visit(images, get_settings().visit_window)
    summary.grader_referrals = grader_referral.in_visit(referrals, visit)
    summary.grader_refers = bool(summary.grader_referrals)
    if newest is not None and grades_visit(newest, visit):
        summary.grade = newest.grade
        summary.referable = newest.referable
        summary.gradable = newest.gradable
        summary.eyes = _eyes_of(newest)
        summary.model_version = model_ref(newest.model_version_id)
        summary.updated_at = newest.computed_at
        # A photograph this decision graded is being graded again (or its re-grade failed): the
        # decision is the last complete one, kept until the new one is (repository.held_referral)
        summary.rechecking = repo.grades_regrading(
            (i for eye in newest.eyes for i in eye.image_ids), regrading
        )
    # Eyes whose photographs arrived after the last result (or before any) still list them; only
    # the latest visit's, as the result (repository.latest_visit).
    pending = {im.eye for im in visit if im.status in ("queued", "running")}
    if pending and summary.updated_at is not None and not summary.referable:
        # Not final: a photograph of the visit is still being scored, and it may show what the
        # graded ones do not. "No referral" waits for it (the operator walkthrough: a second
        # photograph of a graded eye was queued and the patient read "not referable").
        summary.referable = True
        summary.referral_reasons = [f"{eye}_eye_pending" for eye in EYES if eye in pending]
    else:
        # from the result's own eyes (a photograph not in it yet is "pending", not "not photographed")
        summary.referral_reasons = referral_reasons(summary, pending)
    for name in EYES:  # both eyes, always, as a graded result has them (an empty one: none yet)
        eye = cast(Eye, name)
        ids = [im.id for im in visit if im.eye == eye]
        known = summary.eyes.get(eye)
        if known is None:
            summary.eyes[eye] = EyeSummary(image_ids=ids)
        else:
            known.image_ids = known.image_ids + [i for i in ids if i not in known.image_ids]
    return summary


def earlier_visit_summary(
    session: Session, patient: Patient, image_ids: Collection[str]
) -> PatientSummary | None:
    """The patient's decision for a screening made of ``image_ids`` (a visit's or one photograph's
    page) when it is an earlier visit, else None (the caller's ``patient_summary`` is its
    decision). An earlier visit's page showed today's result as its own (the web walkthrough):
    it gets the newest result that graded one of its photographs, as recorded then (later results
    grade later visits only: ``repository.recompute_patient``)."""
    visit = repo.latest_visit(repo.list_patient_images(session, patient.id), get_settings().visit_window)
    wanted = set(image_ids)
    if not wanted or wanted & {im.id for im in visit}:
        return None
    summary = PatientSummary(patient_id=patient.external_id)
    refs: dict[int, str] = {}
    # every result if need be, not the history's newest 100: folder-job chunks and re-grades each
    # add one, and a visit further back read "not graded" (the review); read in batches, newest
    # first, until the visit's
    for result in repo.iter_patient_history(session, patient.id):
        eyes = _eyes_of(result)
        if not any(wanted & set(eye.image_ids) for eye in eyes.values()):
            continue
        summary.grade, summary.referable, summary.gradable = result.grade, result.referable, result.gradable
        summary.eyes = eyes
        summary.model_version = _model_ref(session, result.model_version_id, refs)
        summary.updated_at = result.computed_at
        break
    summary.referral_reasons = referral_reasons(summary)
    return summary


def referral_reasons(summary: PatientSummary, pending: Collection[str] = ()) -> list[str]:
    """Why a patient is referable, eye by eye (``PatientSummary.referral_reasons``): a clinic must
    not read a "refer" next to a grade-0 eye as a grade-0 patient's referral for retinopathy.
    ``pending``: eyes with a photograph still being scored (their cause is not known yet)."""
    if summary.updated_at is None:
        return ["not_graded_yet", *(f"{name}_eye_pending" for name in EYES if name in pending)]
    if not summary.referable:
        return []
    reasons = []
    for name in EYES:
        eye = summary.eyes.get(cast(Eye, name))
        if name in pending and (eye is None or not eye.gradable):
            reasons.append(f"{name}_eye_pending")
        elif eye is None or not eye.image_ids:
            reasons.append(f"{name}_eye_not_photographed")
        elif not eye.gradable:
            reasons.append(f"{name}_eye_ungradable")
        elif eye.referable and eye.grade is not None and eye.grade < REFERABLE_GRADE:
            reasons.append(f"{name}_eye_photograph_referable")  # one field's lesion (core.aggregation)
        elif eye.referable:
            reasons.append(f"{name}_eye_referable_dr")
    return reasons


def private_image_headers() -> dict[str, str]:
    """Headers for a patient's photograph or heatmap: never cached by a proxy, never sniffed."""
    return {"Cache-Control": "private, no-store", "X-Content-Type-Options": "nosniff"}
