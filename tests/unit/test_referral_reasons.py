"""Why a patient is referred is stated eye by eye, in the API and on the results page."""

from __future__ import annotations

from datetime import UTC, datetime

from core.schemas import EyeSummary, ImageResult, PatientSummary
from services.views import referral_reasons
from services.web.present import eye_views, patient_grade_text, patient_verdict, photo_view

NOW = datetime(2026, 12, 6, tzinfo=UTC)


def _eye(grade: int | None, *, photos: int = 1) -> EyeSummary:
    gradable = grade is not None
    return EyeSummary(
        grade=grade,
        gradable=gradable,
        referable=not gradable or grade >= 2,  # type: ignore[operator]
        image_ids=[f"im{i}" for i in range(photos)],
    )


def _patient(
    left: EyeSummary | None, right: EyeSummary | None, grade: int | None, referable: bool
) -> PatientSummary:
    eyes = {name: eye for name, eye in (("left", left), ("right", right)) if eye is not None}
    summary = PatientSummary(
        patient_id="P1",
        grade=grade,
        referable=referable,
        gradable=grade is not None,
        eyes=eyes,
        updated_at=NOW,
    )
    summary.referral_reasons = referral_reasons(summary)
    return summary


def test_not_referable_has_no_reason() -> None:
    assert _patient(_eye(0), _eye(1), 1, False).referral_reasons == []


def test_each_cause_is_named_by_eye() -> None:
    assert _patient(_eye(2), _eye(0), 2, True).referral_reasons == ["left_eye_referable_dr"]
    assert _patient(_eye(0), _eye(None), 0, True).referral_reasons == ["right_eye_ungradable"]
    assert _patient(_eye(0), None, 0, True).referral_reasons == ["right_eye_not_photographed"]
    assert _patient(_eye(3), _eye(None, photos=0), 3, True).referral_reasons == [
        "left_eye_referable_dr",
        "right_eye_not_photographed",
    ]


def test_an_eye_referred_for_one_photograph_says_so() -> None:
    """An eye whose pooled grade is below 2 is referable when one of its photographs alone is
    graded >= 2 (core.aggregation): the reason and the banner say it, not "retinopathy grade 0"."""
    pooled = EyeSummary(grade=0, gradable=True, referable=True, image_ids=["a", "b"])
    patient = _patient(pooled, _eye(0), 0, True)
    assert patient.referral_reasons == ["left_eye_photograph_referable"]
    verdict = patient_verdict(patient, any_failed=False)
    assert (
        verdict.headline == "REFER" and "Left eye: one photograph is referable on its own" in verdict.detail
    )


def test_an_ungradable_eye_beside_one_still_being_scored_is_not_called_ungradable_patient() -> None:
    """The clinician's review: the left eye ungradable, the right still in the queue, and the banner
    read "REFER — UNGRADABLE: No gradable photograph: the patient cannot be graded"."""
    summary = PatientSummary(
        patient_id="P1", grade=None, referable=True, gradable=False, eyes={"left": _eye(None)}, updated_at=NOW
    )
    summary.referral_reasons = referral_reasons(summary, pending={"right"})
    assert summary.referral_reasons == ["left_eye_ungradable", "right_eye_pending"]
    verdict = patient_verdict(summary, any_failed=False)
    assert verdict.headline == "REFER" and "cannot be graded" not in verdict.detail
    assert "Left eye: ungradable" in verdict.detail and "Right eye: still being scored" in verdict.detail
    assert patient_grade_text(summary) == "not known yet (right eye still being scored)"


def test_no_result_yet() -> None:
    assert referral_reasons(PatientSummary(patient_id="P1")) == ["not_graded_yet"]


def test_banner_gives_the_eye_that_causes_the_referral_not_a_grade_0_as_retinopathy() -> None:
    verdict = patient_verdict(_patient(_eye(0), _eye(None), 0, True), any_failed=False)
    assert verdict.headline == "REFER"
    assert "Right eye: ungradable" in verdict.detail and "retinopathy" not in verdict.detail
    missing = patient_verdict(_patient(_eye(0), None, 0, True), any_failed=False)
    assert "Right eye: not photographed" in missing.detail
    dr = patient_verdict(_patient(_eye(0), _eye(2), 2, True), any_failed=False)
    assert dr.detail == "Right eye: referable diabetic retinopathy, grade 2 · Moderate NPDR."


def test_an_eye_without_photographs_is_shown_once_graded() -> None:
    image = ImageResult(id="im0", status="done", patient_id="P1", eye="left", grade=0, gradable=True,
                        referable=False, probabilities=[0.9, 0.1, 0, 0, 0])  # fmt: skip
    photos = [photo_view(image, heatmap_ready=True)]
    views = eye_views(_patient(_eye(0), None, 0, True), photos)
    assert [(v.eye, len(v.photos), v.known, v.gradable) for v in views] == [
        ("left", 1, True, True),
        ("right", 0, True, False),
    ]
    # before any result only the eyes with photographs are listed
    assert [v.eye for v in eye_views(None, photos)] == ["left"]


def test_an_eye_still_being_scored_is_pending_not_missing_or_ungradable() -> None:
    """The review: while a right-eye photograph was queued the API said the right eye was 'not
    photographed' (before any result of it) or 'ungradable' (counted so while queued)."""
    left_only = _patient(_eye(0), None, 0, True)
    assert referral_reasons(left_only, pending={"right"}) == ["right_eye_pending"]
    queued_as_ungradable = _patient(_eye(0), _eye(None), 0, True)
    assert referral_reasons(queued_as_ungradable, pending={"right"}) == ["right_eye_pending"]
    # a graded referable eye stays what it is while another photograph of it is scored
    assert referral_reasons(_patient(_eye(0), _eye(3), 3, True), pending={"right"}) == [
        "right_eye_referable_dr"
    ]
    pending = _patient(_eye(0), None, 0, True)
    pending.referral_reasons = referral_reasons(pending, pending={"right"})
    # not a final REFER while it waits (the web walkthrough): a pending banner naming the eye
    verdict = patient_verdict(pending, any_failed=False)
    assert verdict.tone == "pending" and "right eye's photograph is still being scored" in verdict.detail


def test_an_eye_photographed_outside_this_bundle_is_not_called_missing() -> None:
    """The review: a bundle with only a left photograph, for a patient whose right eye was graded
    in the same visit, said the right eye was 'not photographed'."""
    image = ImageResult(id="im0", status="done", patient_id="P1", eye="left", grade=0, gradable=True,
                        referable=False, probabilities=[0.9, 0.1, 0, 0, 0])  # fmt: skip
    views = eye_views(_patient(_eye(0), _eye(0), 0, False), [photo_view(image, heatmap_ready=True)])
    assert [v.eye for v in views] == ["left"]


def test_updated_at_keeps_its_utc_offset_when_assigned() -> None:
    """SQLite returns naive timestamps; assigned to the summary they skipped the UTC validator."""
    summary = PatientSummary(patient_id="P1")
    summary.updated_at = datetime(2026, 12, 6, 3, 0)  # naive, as SQLite gives it
    assert summary.updated_at.tzinfo is not None
    assert summary.model_dump(mode="json")["updated_at"].endswith(("Z", "+00:00"))
