"""Pydantic schemas shared by the API, the workers and the CLI (the JSON shapes of the contract)."""

from __future__ import annotations

import unicodedata
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from core.tables import as_utc

#: A clinic's patient identifier, wherever it comes from (upload field, folder file name,
#: manifest): it appears in URLs (``/v1/patients/{patient_id}``).
PATIENT_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"

Eye = Literal["left", "right"]
Status = Literal["queued", "running", "done", "failed"]


#: A timestamp always written with its UTC offset (naive database values are UTC).
UtcDatetime = Annotated[datetime, AfterValidator(as_utc)]
Probabilities = Annotated[
    list[float],
    Field(
        min_length=5,
        max_length=5,
        description="the model's scores for grades 0..4 (sum 1): averaged softmax outputs, not "
        "calibrated clinical probabilities",
    ),
]


class ErrorBody(BaseModel):
    error: str = Field(description="machine-readable error code, e.g. not_found, invalid_image")
    detail: Any = Field(default=None, description="human-readable explanation or field errors")


class Accepted(BaseModel):
    id: str
    status: Status


#: Unicode categories a grader's name may not hold: controls (C0 and C1), format characters
#: (a right-to-left override turns "Dr A" around on a page), line and paragraph separators,
#: surrogates, private use and unassigned code points. It is shown on pages and in CSV files.
_NOT_IN_NAMES = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn"})


#: Letters that draw nothing (Hangul fillers) and the blank Braille pattern.
_BLANK_LETTERS = frozenset("\u115f\u1160\u3164\uffa0\u2800")


def _printable_name(value: str) -> str:
    name = value.strip()
    if not name:
        raise ValueError("the grader's name is empty")
    if any(unicodedata.category(ch) in _NOT_IN_NAMES for ch in name):
        raise ValueError("the grader's name holds a control or invisible character")
    if not any(unicodedata.category(ch)[0] in "LNPS" and ch not in _BLANK_LETTERS for ch in name):
        raise ValueError("the grader's name shows nothing: give a name or initials")
    return name


class GraderGradeIn(BaseModel):
    """A human grader's grade of one photograph (``PUT /v1/images/{id}/grader-grade``)."""

    # strict: "2" or 2.0 is a client's bug, not a grade
    model_config = ConfigDict(extra="forbid", strict=True)

    grade: int | None = Field(
        ge=0,
        le=4,
        description="the grader's ICDR grade 0..4, or null when the grader found the photograph "
        'ungradable (required: an omitted grade is an error, not "ungradable")',
    )
    grader: Annotated[str, AfterValidator(_printable_name)] = Field(
        min_length=1,
        max_length=100,
        description="who graded: a name or initials the clinic chooses (staff, never the patient); "
        "surrounding spaces are dropped",
    )


class GraderGradeOut(BaseModel):
    grade: int | None = Field(description="0..4; null when the grader found it ungradable")
    gradable: bool
    grader: str
    recorded_at: UtcDatetime = Field(description="when it was last recorded")


class GraderReferral(GraderGradeOut):
    """A grader's grade that refers the patient: referable (2..4) or ungradable, of a photograph of
    the patient's latest visit (``core.grader_referral``)."""

    image_id: str
    eye: Eye


class ImageResult(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    id: str
    status: Status
    patient_id: str
    eye: Eye
    error: str | None = None
    grade: int | None = Field(
        default=None,
        ge=0,
        le=4,
        description="the screening decision: the expected grade under the probabilities, cut at "
        "points fitted for referral sensitivity (the model card's operating point); it can differ "
        "from the most probable grade, erring towards referral. Null when ungradable",
    )
    probabilities: Probabilities | None = Field(
        default=None,
        description="the ensemble's combined probabilities, once done (null before, and for a "
        "photograph that failed). An ungradable photograph has them too (5 floats whenever done), "
        "but they decide nothing: its grade is null, it is referable, and no eye or patient "
        "result counts it",
    )
    referable: bool | None = None
    gradable: bool | None = None
    quality: dict[str, Any] | None = None
    model_version: str | None = None
    members: dict[str, Probabilities] | None = Field(
        default=None, description="each member's probabilities by name@version; null as probabilities"
    )
    explanation_url: str | None = Field(
        default=None, description="the heatmap's URL once done and gradable (null otherwise)"
    )
    created_at: UtcDatetime | None = None
    grader_grade: GraderGradeOut | None = Field(
        default=None,
        description="a human grader's grade of the photograph, when the clinic recorded one "
        "(`PUT /v1/images/{id}/grader-grade`); the model's grade above is unchanged by it",
    )


class EyeSummary(BaseModel):
    grade: int | None = None
    gradable: bool = False
    referable: bool = True
    image_ids: list[str] = Field(default_factory=list)


class PatientHistoryEntry(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    grade: int | None
    referable: bool
    gradable: bool
    model_version: str | None = None
    computed_at: UtcDatetime
    eyes: dict[Eye, EyeSummary] = Field(default_factory=dict)


class PatientSummary(BaseModel):
    # validated on assignment too: services.views fills it field by field, and an assigned naive
    # SQLite timestamp skipped UtcDatetime (updated_at came out without its offset)
    model_config = ConfigDict(protected_namespaces=(), validate_assignment=True)

    patient_id: str
    grade: int | None = None
    referable: bool = True
    gradable: bool = False
    eyes: dict[Eye, EyeSummary] = Field(default_factory=dict)
    model_version: str | None = None
    updated_at: UtcDatetime | None = None
    referral_reasons: list[str] = Field(
        default_factory=list,
        description="why the patient is referable, one code per cause: `<eye>_eye_referable_dr` "
        "(that eye's grade >= 2), `<eye>_eye_photograph_referable` (the eye's pooled grade is below 2 "
        "but one of its photographs alone is graded >= 2), `<eye>_eye_ungradable`, "
        "`<eye>_eye_not_photographed`, "
        "`<eye>_eye_pending` (a photograph of that eye is still being scored), or "
        "`not_graded_yet` (no result of the latest visit yet; with the pending eyes); "
        "empty when not referable",
    )
    rechecking: bool = Field(
        False,
        description="true while a photograph this decision graded is being graded again (a new "
        "release, a photograph sent again) or its new grading failed: the decision shown is the last "
        "complete one, kept until the new one is complete (a referral is never withdrawn by a "
        "photograph whose grading is unfinished; a failed one is sent again to finish it)",
    )
    grader_refers: bool = Field(
        False,
        description="true when a grader's grade of a photograph of the patient's latest visit (the "
        "visit `eyes` shows) is referable (2..4) or ungradable: the patient is to be referred on the "
        "grader's word, whatever the model decided. An addition: `referable`, `grade` and "
        "`referral_reasons` stay the model's decision (the contract's rule); refer when either is true. "
        "The latest grade of a photograph counts (a later grade below 2 withdraws it); earlier "
        "visits' photographs do not count, as for the model's decision",
    )
    grader_referrals: list[GraderReferral] = Field(
        default_factory=list,
        description="the grades that make `grader_refers` true, one per photograph, newest first",
    )
    history: list[PatientHistoryEntry] = Field(default_factory=list)


class ErasedRows(BaseModel):
    """Rows deleted by an erasure, per table (core.retention)."""

    explanation: int = Field(description="heatmap records")
    prediction: int
    scoring_job_item: int = Field(description="folder-job files of the patient")
    idempotency_key: int
    eye_result: int
    patient_result: int
    grader_grade: int = Field(description="human graders' grades of the photographs")
    image: int = Field(description="photographs")
    bundle: int
    patient: int
    scoring_job: int = Field(description="folder jobs left with no file")


class PatientErasure(BaseModel):
    patient_id: str
    rows: ErasedRows
    files: int = Field(
        description="stored files removed (photographs and heatmaps that no other row shares: "
        "the store keeps identical bytes once)"
    )


class BundleResult(BaseModel):
    id: str
    status: Status
    images: list[ImageResult]
    patient: PatientSummary | None = None


class JobCreate(BaseModel):
    folder: str = Field(min_length=1, description="folder on the server, under an import root")


class JobStatus(BaseModel):
    id: str
    status: Status
    folder: str
    total: int
    done: int
    failed: int
    grades: dict[str, int] = Field(
        default_factory=dict, description='counts per grade "0".."4", "ungradable"'
    )
    error: str | None = None
    created_at: UtcDatetime | None = None
    finished_at: UtcDatetime | None = None


class ModelMember(BaseModel):
    ref: str
    metrics: dict[str, Any] = Field(default_factory=dict)


class ModelInfo(BaseModel):
    version: str
    members: list[ModelMember]
    metrics: dict[str, Any] = Field(default_factory=dict)


class Readiness(BaseModel):
    status: Literal["ready", "unavailable"]
    checks: dict[str, bool] = Field(
        description="database, schema (at the newest migration this code ships), broker, model, store "
        "(the photograph store can be written, with room for one photograph): ok or not"
    )
    error: str | None = Field(default=None, description="`unavailable` when not ready")
    detail: str | None = None


class ReferableAgreement(BaseModel):
    """Referral (grade >= 2) against the grader's, over photographs the grader found gradable.
    The model's "ungradable" counts as a referral (clinics refer it)."""

    true_positive: int = Field(description="both refer")
    false_negative: int = Field(description="the grader refers, the model does not: missed")
    true_negative: int
    false_positive: int
    sensitivity: float | None = Field(description="null when the grader referred none")
    sensitivity_ci95: list[float] | None = Field(description="Wilson score interval")
    specificity: float | None
    specificity_ci95: list[float] | None


class UngradableAgreement(BaseModel):
    both: int
    grader_only: int = Field(description="the grader could not grade it, the model graded it")
    model_only: int = Field(description="the model found it ungradable, the grader graded it")


class Stratum(BaseModel):
    photographs: int = Field(description="photographs the release graded in the period")
    graded: int = Field(description="of them, graded by a grader (the sample only, for `not_referred`)")


class EstimatedAgreement(BaseModel):
    """Referral agreement over ALL the release's photographs, corrected for verification bias
    (Begg and Greenes, 1983): each of the two strata (referred / not referred by the release) is
    scaled up from its graded photographs; the not-referred stratum from its random sample only
    (``GET /v1/grading-queue``). Null where a stratum with photographs has none graded."""

    sensitivity: float | None
    sensitivity_ci95: list[float] | None = Field(
        default=None,
        description="95% interval: each stratum's share drawn from its Jeffreys posterior, the "
        "figure recomputed per draw (wide with a small sample, as it should be)",
    )
    specificity: float | None
    specificity_ci95: list[float] | None = None
    referred: Stratum
    not_referred: Stratum
    sample_percent: float = Field(description="DRSCREEN_GRADER_SAMPLE_PERCENT")


class Agreement(BaseModel):
    """How one release's grades agree with the clinic's human graders (``GET /v1/agreement``)."""

    model_config = ConfigDict(protected_namespaces=())

    model_version: str | None = Field(
        description="the release compared (`model`); null: each photograph's reported grade, "
        "whichever release gave it (`releases` counts them)"
    )
    releases: dict[str, int] = Field(
        default_factory=dict, description="photographs compared, by the release whose grade it was"
    )
    since: UtcDatetime | None = None
    until: UtcDatetime | None = None
    n_images: int = Field(description="photographs with a grader's grade and this release's grade")
    n_awaiting_model: int = Field(
        description="photographs with a grader's grade that this release has not graded (yet)"
    )
    n_both_gradable: int
    qwk: float | None = Field(description="quadratic weighted kappa, both gradable; null below 2")
    exact_agreement: float | None = Field(description="share of the same grade, both gradable")
    confusion_matrix: list[list[int]] = Field(
        description="5x5: rows the grader's grade 0..4, columns the model's, both gradable"
    )
    referable: ReferableAgreement
    ungradable: UngradableAgreement
    missed_referable: list[str] = Field(
        description="ids of photographs the grader refers and the model does not (oldest first, "
        "at most 100): the cases to look at first"
    )
    estimated: EstimatedAgreement | None = Field(
        default=None,
        description="sensitivity and specificity over all the release's photographs, from the "
        "graded ones of each stratum: `referable` above is over the graded photographs only, and "
        "graders who grade mostly referrals make its sensitivity look better than it is",
    )


class GradingQueueItem(BaseModel):
    image_id: str
    patient_id: str
    eye: Eye
    received_at: UtcDatetime


class GradingQueue(BaseModel):
    """Photographs waiting for a grader, oldest first: every one its result refers and a random
    sample of the others, mixed. Which is which is not said (graders grade blind)."""

    sample_percent: float
    total: int = Field(description="photographs waiting in all")
    items: list[GradingQueueItem]
    next_offset: int | None = Field(description="pass as `offset` for the next page; null at the end")
