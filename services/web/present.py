"""What the pages show, computed from the API's own result shapes (``core.schemas``).

The referral verdict is decided here once, so every page says the same thing: REFER for a
referable grade, for an ungradable patient/eye/photograph, and for a screening that could not be
scored at all; "no referral" only for a gradable, non-referable result.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, cast

from core.schemas import Eye, GraderGradeOut, GraderReferral, ImageResult, PatientSummary

GRADE_NAMES = (
    "No DR",
    "Mild NPDR",
    "Moderate NPDR",
    "Severe NPDR",
    "Proliferative DR",
)
QUALITY_SCORES = (
    ("focus", "Focus"),
    ("exposure", "Exposure"),
    ("field_of_view", "Field of view"),
    ("fundus", "Looks like a fundus"),
)
REASON_TEXT = {
    "not_fundus": "does not look like a fundus photograph",
    "monochrome": "a black-and-white (grey or red-free) photograph: send the colour photograph",
    "poor_field_of_view": "poor field of view (retina cut off or too small)",
    "underexposed": "too dark",
    "overexposed": "too bright",
    "out_of_focus": "out of focus",
    "damaged_jpeg": (
        "the file looks damaged (part of the picture is shifted in colour or brightness): "
        "send the original again"
    ),
}
FINAL = ("done", "failed")
#: What an erasure deletes, in the words of the confirmation page (core.retention.TABLES), in the
#: order a clinic thinks of them.
ERASED_TABLES = (
    ("image", "Photographs"),
    ("prediction", "Gradings of photographs"),
    ("explanation", "Heatmaps"),
    ("grader_grade", "Graders' grades"),
    ("bundle", "Visits"),
    ("eye_result", "Eye results"),
    ("patient_result", "Patient results (history)"),
    ("scoring_job_item", "Folder-job files"),
    ("scoring_job", "Folder jobs left with no file"),
    ("idempotency_key", "Upload retry records (Idempotency-Key)"),
    ("patient", "Patient record"),
)

Tone = Literal["refer", "ok", "pending"]


def grade_label(grade: int | None) -> str:
    if grade is None:
        return "ungradable"
    if 0 <= grade < len(GRADE_NAMES):
        return f"{grade} · {GRADE_NAMES[grade]}"
    return str(grade)


#: The grader's-grade form's choices (value, label): the grades as the pages name them.
GRADE_CHOICES = (*((str(g), grade_label(g)) for g in range(len(GRADE_NAMES))), ("ungradable", "ungradable"))


def grade_choice(recorded: GraderGradeOut | None) -> str:
    """The form's value of a recorded grader's grade ("" when none is recorded)."""
    if recorded is None:
        return ""
    return "ungradable" if recorded.grade is None else str(recorded.grade)


def share_text(value: float | None) -> str:
    """A share (0..1) as a percentage; "—" when undefined (nothing to count it on)."""
    return "—" if value is None else f"{value * 100:.1f}%"


def interval_text(bounds: list[float] | None) -> str:
    """A 95% interval of a share, as the agreement page words it ("" when undefined)."""
    if not bounds:
        return ""
    low, high = bounds
    return f"95% interval {low * 100:.1f} to {high * 100:.1f}%"


def eye_state(patient: PatientSummary, name: str) -> str:
    """``gradable``, ``pending`` (its photograph is still being scored), ``not_photographed`` or
    ``ungradable``: the patient page's badge and the patient grade's words read it from here."""
    eye = patient.eyes.get(cast(Eye, name))
    if eye is not None and eye.gradable:
        return "gradable"
    if f"{name}_eye_pending" in patient.referral_reasons:
        return "pending"
    return "not_photographed" if eye is None or not eye.image_ids else "ungradable"


_EYE_STATE_TEXT = {
    "pending": "still being scored",
    "not_photographed": "not photographed",
    "ungradable": "ungradable",
}


def patient_grade_text(patient: PatientSummary) -> str:
    """The patient's grade in words. It is the worse *graded* eye's, so with the other eye
    ungradable, not photographed or still being scored a bare "grade 0 · No DR" read as a healthy
    patient (the web walkthrough): say which eye it leaves out."""
    if not patient.gradable:
        pending = [name for name in ("left", "right") if eye_state(patient, name) == "pending"]
        # "ungradable" read as final while an eye was still in the queue (the clinician's review)
        return (
            "not known yet (" + " and ".join(pending) + " eye still being scored)"
            if pending
            else "ungradable"
        )
    text = grade_label(patient.grade)
    for name in ("left", "right"):
        state = eye_state(patient, name)
        if state != "gradable":
            text += f" (graded eye only; {name} eye {_EYE_STATE_TEXT[state]})"
    return text


def reason_text(code: str) -> str:
    return REASON_TEXT.get(code, code.replace("_", " "))


@dataclass(frozen=True)
class Verdict:
    """The banner: ``tone`` picks the colour (refer = red, ok = green, pending = grey)."""

    tone: Tone
    headline: str
    detail: str
    grade: int | None = None
    ungradable: bool = False


#: Upload fields in the words of the forms.
_FIELD_TEXT = {
    "left_1": "Left eye, photograph 1",
    "left_2": "Left eye, photograph 2",
    "right_1": "Right eye, photograph 1",
    "right_2": "Right eye, photograph 2",
    "file": "Photograph",
}
#: Why a photograph was refused (ml.imageio's reasons), for clinic staff rather than a developer.
_REFUSAL_TEXT = {
    "empty": "the file is empty",
    "not_an_image": "the file is not a photograph (send a JPEG, PNG, TIFF, BMP or WebP file)",
    "unsupported_format": "this kind of image is not accepted (send a JPEG, PNG, TIFF, BMP or WebP file)",
    "truncated": "the file is incomplete (cut off on its way): send it again",
    "corrupt": "the file is damaged or unreadable: send the original again",
    "too_small": "the picture is too small to be graded",
}


def upload_error_text(message: str, detail: object) -> str:
    """An upload refusal in the form's words: the walkthrough's staff read "left_1: JPEG does not
    end with the EOI marker (FFD9)". The API keeps the technical text; the page names the field
    as the form does and the reason plainly (a size limit keeps its figure)."""
    info = detail if isinstance(detail, dict) else {}
    field, reason = str(info.get("field", "")), str(info.get("reason", ""))
    if field not in _FIELD_TEXT:
        field = message.partition(": ")[0] if message.partition(": ")[0] in _FIELD_TEXT else ""
    rest = message.removeprefix(f"{field}: ") if field else message
    text = _REFUSAL_TEXT.get(reason, rest)
    return f"{_FIELD_TEXT[field]}: {text}" if field else text


def pending_verdict(finished: int, total: int) -> Verdict:
    return Verdict("pending", "Scoring…", f"{finished} of {total} photograph(s) scored so far")


#: Said beside a decision kept while a photograph it graded is graded again (``rechecking``).
RECHECKING_TEXT = (
    "Being re-checked: a photograph of this decision is being graded again (or its new grading "
    "failed: send it again). This is the last complete decision; it stands until the new one is complete."
)


def grader_referral_text(referrals: list[GraderReferral]) -> str:
    """Graders' referring grades in words: "a grader (Dr A) graded the left eye's photograph
    3 · Severe NPDR (referable)", one per photograph."""
    parts = []
    for r in referrals:
        what = "ungradable" if r.grade is None else f"{grade_label(r.grade)} (referable)"
        parts.append(f"a grader ({r.grader}) graded the {r.eye} eye's photograph {what}")
    return "; ".join(parts)


def patient_verdict(patient: PatientSummary | None, any_failed: bool) -> Verdict:
    """The patient-level decision of a finished screening, with a grader's referral
    (``PatientSummary.grader_refers``) said as the grader's: it refers a patient the model did not."""
    verdict = _model_verdict(patient, any_failed)
    if patient is None or not patient.grader_refers:
        return verdict
    grader = grader_referral_text(patient.grader_referrals)
    if verdict.tone == "refer":
        return Verdict(
            "refer", verdict.headline, f"{verdict.detail} Also: {grader}.", verdict.grade, verdict.ungradable
        )
    if verdict.tone == "pending":
        model = f"the model's decision is not final yet: {verdict.detail}"
    else:
        model = f"the model did not refer (grade {grade_label(patient.grade)}, worse eye)."
    detail = f"Refer: {grader}. This is the grader's referral, not the model's; {model}"
    return Verdict("refer", "REFER (grader)", detail, verdict.grade)


def _model_verdict(patient: PatientSummary | None, any_failed: bool) -> Verdict:
    reasons = patient.referral_reasons if patient is not None else []
    if any(r.endswith("_eye_pending") for r in reasons) and all(
        r.endswith("_eye_pending") or r == "not_graded_yet" for r in reasons
    ):
        # Referable for now (the API says so until it is in), but not a decision yet: a red REFER
        # for a photograph still in the queue read as final (the web walkthrough).
        waiting = " and ".join(r.partition("_eye_")[0] for r in reasons if r.endswith("_eye_pending"))
        whose = "eyes' photographs are" if " and " in waiting else "eye's photograph is"
        detail = f"The {waiting} {whose} still being scored: not final yet."
        return Verdict("pending", "Scoring…", detail)
    if patient is None or patient.updated_at is None:
        why = (
            "some photographs could not be scored"
            if any_failed
            else "no result of this visit is recorded yet"
        )
        return Verdict("refer", "REFER", f"Not graded: {why}. Treat as ungradable.", None, True)
    if not patient.gradable and not any(r.endswith("_eye_pending") for r in reasons):
        # (with an eye still being scored the patient may yet be graded: its causes eye by eye below)
        return Verdict(
            "refer",
            "REFER — UNGRADABLE",
            "No gradable photograph: the patient cannot be graded. Refer (or re-photograph).",
            None,
            True,
        )
    if patient.referable:
        text = referral_text(patient)
        if patient.rechecking:
            text += f" {RECHECKING_TEXT}"
        return Verdict("refer", "REFER", text, patient.grade)
    return Verdict(
        "ok",
        "No referral",
        f"Grade {grade_label(patient.grade)} (worse eye): not referable. Re-screen as usual.",
        patient.grade,
    )


_EYE_REASONS = {
    "referable_dr": "referable diabetic retinopathy, grade {grade}",
    "photograph_referable": (
        "one photograph is referable on its own, though the eye's photographs together grade {grade}"
        " (a lesion seen in one field only): examine"
    ),
    "ungradable": "ungradable: no photograph could be graded (examine or re-photograph)",
    "not_photographed": "not photographed in this screening (must be examined)",
    "pending": "still being scored",
}


def referral_text(patient: PatientSummary) -> str:
    """The causes of a referral in words, eye by eye (``PatientSummary.referral_reasons``)."""
    parts = []
    for code in patient.referral_reasons:
        eye, _, cause = code.partition("_eye_")
        if cause not in _EYE_REASONS:
            continue
        summary = patient.eyes.get(cast(Eye, eye))
        grade = grade_label(summary.grade if summary is not None else None)
        parts.append(f"{eye.capitalize()} eye: " + _EYE_REASONS[cause].format(grade=grade))
    if not parts:  # not expected: a referable patient always has a cause
        return f"Referable: grade {grade_label(patient.grade)} (worse eye)."
    return "; ".join(parts) + "."


def image_verdict(image: ImageResult) -> Verdict:
    """The decision for one photograph on its own (the single-photograph page)."""
    if image.status not in FINAL:
        return Verdict("pending", "Scoring…", f"the photograph is {image.status}")
    if image.status == "failed":
        return Verdict(
            "refer", "REFER", f"Not graded: scoring failed ({image.error or 'error'}).", None, True
        )
    if not image.gradable:
        reasons = ", ".join(reason_text(r) for r in (image.quality or {}).get("reasons", []))
        return Verdict(
            "refer",
            "REFER — UNGRADABLE",
            f"This photograph cannot be graded{': ' + reasons if reasons else ''}.",
            None,
            True,
        )
    if image.referable:
        return Verdict(
            "refer",
            "REFER",
            f"Referable diabetic retinopathy: grade {grade_label(image.grade)}.",
            image.grade,
        )
    return Verdict("ok", "No referral", f"Grade {grade_label(image.grade)}: not referable.", image.grade)


@dataclass(frozen=True)
class Bar:
    label: str
    value: float  # 0..1
    highlight: bool = False

    @property
    def percent(self) -> float:
        return round(max(0.0, min(1.0, self.value)) * 100, 1)


@dataclass
class PhotoView:
    image: ImageResult
    probabilities: list[Bar] = field(default_factory=list)
    quality: list[Bar] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    heatmap_ready: bool = False
    heatmap_old_scale: bool = False  # drawn before heatmaps shared one colour scale

    @property
    def final(self) -> bool:
        return self.image.status in FINAL


def photo_view(image: ImageResult, heatmap_ready: bool, heatmap_old_scale: bool = False) -> PhotoView:
    view = PhotoView(image=image, heatmap_ready=heatmap_ready, heatmap_old_scale=heatmap_old_scale)
    if image.probabilities and image.gradable is not False:  # an ungradable one's decide nothing
        view.probabilities = [
            Bar(f"{g} {GRADE_NAMES[g]}", float(p), highlight=(g == image.grade))
            for g, p in enumerate(image.probabilities[: len(GRADE_NAMES)])
        ]
    quality: dict[str, Any] = image.quality or {}
    view.quality = [
        Bar(label, float(quality[key]))
        for key, label in QUALITY_SCORES
        if isinstance(quality.get(key), int | float)
    ]
    view.reasons = [reason_text(str(r)) for r in quality.get("reasons", [])]
    return view


@dataclass
class EyeView:
    eye: str
    grade: int | None
    gradable: bool
    referable: bool
    known: bool
    photos: list[PhotoView]


def eye_views(patient: PatientSummary | None, photos: list[PhotoView]) -> list[EyeView]:
    """Left then right, each with this screening's photographs of that eye."""
    out = []
    graded = patient is not None and patient.updated_at is not None
    for eye in ("left", "right"):
        mine = [p for p in photos if p.image.eye == eye]
        summary = patient.eyes.get(eye) if patient is not None else None
        # an eye without photographs on this page is shown (as "not photographed") only when the
        # patient's visit has none of it either; one photographed outside this bundle is not
        if not mine and (not graded or (summary is not None and summary.image_ids)):
            continue
        known = (summary is not None and graded) or not mine
        out.append(
            EyeView(
                eye=eye,
                grade=summary.grade if summary is not None else None,
                gradable=summary.gradable if summary is not None else False,
                referable=summary.referable if summary is not None else True,
                known=known,
                photos=mine,
            )
        )
    return out


def fmt_metric(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return "—" if value is None else str(value)
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def erasure_rows(rows: dict[str, int], files: int) -> list[tuple[str, str, int]]:
    """(key, label, count) per table an erasure deletes from, then the stored files."""
    listed = [(table, label, rows.get(table, 0)) for table, label in ERASED_TABLES]
    return [*listed, ("files", "Stored files (photographs and heatmaps no other record shares)", files)]
