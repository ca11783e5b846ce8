"""The contract's eye/patient rule, as pure functions.

- An eye's grade comes from the mean of the ensemble's combined probabilities over that eye's
  *gradable* images, turned into a grade by ``grade_fn`` (the ensemble's
  ``grade_from_probabilities``); or, given ``eye_grade_fn`` (the ensemble's ``grade_eye``), from
  that mean and each member's mean, for rules whose grade is a vote of the members.
- The patient's grade is the worse eye.
- An eye (or patient) with no gradable image is ungradable: grade ``None`` and referable ``True``
  (clinics treat ungradable as "refer").
- A patient with one gradable eye and one ungradable eye is graded from the gradable eye but is
  still referable (the ungradable eye must be seen).
- An eye with no photograph at all has no gradable image either: it is reported, ungradable, and
  the patient is referable (an eye not photographed is an eye not screened).
- An eye is also referable when one of its gradable photographs is referable on its own, whatever
  the pooled grade: the fields of one eye show different parts of the retina, and a lesion seen in
  one field was averaged away by a clean second field ("No referral" beside a grade-2 photograph).
  The eye's grade stays the contract's pooled one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

REFERABLE_GRADE = 2
N_GRADES = 5

GradeFn = Callable[[Sequence[float]], int]
#: (pooled combined probabilities, pooled probabilities of each member by ref) -> grade
EyeGradeFn = Callable[[Sequence[float], Mapping[str, Sequence[float]] | None], int]


@dataclass(frozen=True)
class ImageScore:
    """One image's inputs to the rule."""

    image_id: str
    eye: str
    gradable: bool
    probabilities: Sequence[float] | None = None
    members: Mapping[str, Sequence[float]] | None = None  # each member's probabilities, by ref
    # the photograph's own grade (the ensemble's rule) when it was found gradable: it refers its
    # eye when >= 2, also when the photograph is not pooled (one file sent as both eyes)
    grade: int | None = None


@dataclass(frozen=True)
class EyeAggregate:
    eye: str
    grade: int | None
    gradable: bool
    referable: bool
    probabilities: list[float] | None
    image_ids: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return {
            "grade": self.grade,
            "gradable": self.gradable,
            "referable": self.referable,
            "probabilities": self.probabilities,
            "image_ids": list(self.image_ids),
        }


@dataclass(frozen=True)
class PatientAggregate:
    grade: int | None
    gradable: bool
    referable: bool
    eyes: dict[str, EyeAggregate]


def is_referable(grade: int | None) -> bool:
    """Referable = grade >= 2; ungradable (None) counts as referable."""
    return grade is None or grade >= REFERABLE_GRADE


def mean_probabilities(rows: Iterable[Sequence[float]]) -> list[float] | None:
    """Element-wise mean of probability vectors (None when there are none)."""
    rows = [list(map(float, r)) for r in rows]
    if not rows:
        return None
    width = len(rows[0])
    if any(len(r) != width for r in rows):
        raise ValueError("probability vectors differ in length")
    return [sum(r[i] for r in rows) / len(rows) for i in range(width)]


def pooled_members(images: Sequence[ImageScore]) -> dict[str, list[float]] | None:
    """Each member's mean probabilities over ``images`` (None unless every image has the same
    members: a photograph graded without them, or by other members, cannot be pooled)."""
    if not images or any(im.members is None for im in images):
        return None
    refs = set(images[0].members or {})
    if any(set(im.members or {}) != refs for im in images):
        return None
    pooled = {ref: mean_probabilities((im.members or {})[ref] for im in images) for ref in sorted(refs)}
    return {ref: probs for ref, probs in pooled.items() if probs is not None}


def aggregate_eye(
    eye: str, images: Iterable[ImageScore], grade_fn: GradeFn, eye_grade_fn: EyeGradeFn | None = None
) -> EyeAggregate:
    images = list(images)
    usable = [im for im in images if im.gradable and im.probabilities is not None]
    probs = mean_probabilities(im.probabilities for im in usable if im.probabilities is not None)
    if probs is None:
        grade = None
    elif eye_grade_fn is not None:
        grade = int(eye_grade_fn(probs, pooled_members(usable)))
    else:
        grade = int(grade_fn(probs))
    one_referable = any(im.grade is not None and im.grade >= REFERABLE_GRADE for im in images)
    return EyeAggregate(
        eye=eye,
        grade=grade,
        gradable=grade is not None,
        referable=is_referable(grade) or one_referable,
        probabilities=probs,
        image_ids=[im.image_id for im in images],
    )


def aggregate_patient(
    images: Iterable[ImageScore],
    grade_fn: GradeFn,
    eyes: Sequence[str] = ("left", "right"),
    eye_grade_fn: EyeGradeFn | None = None,
) -> PatientAggregate:
    """Apply the rule to every image of one patient. Every eye of ``eyes`` is in the result: one
    without images is ungradable (and makes the patient referable); the patient's grade is the
    worse of the eyes that have one."""
    images = list(images)
    by_eye: dict[str, list[ImageScore]] = {eye: [] for eye in eyes}
    for im in images:
        if im.eye not in eyes:
            raise ValueError(f"unknown eye {im.eye!r}")
        by_eye[im.eye].append(im)
    eye_results = {eye: aggregate_eye(eye, by_eye[eye], grade_fn, eye_grade_fn) for eye in eyes}
    graded = [e.grade for e in eye_results.values() if e.grade is not None]
    grade = max(graded) if graded else None
    return PatientAggregate(
        grade=grade,
        gradable=grade is not None,
        # an ungradable eye is referable too (its grade None), and so is an eye with one referable photograph
        referable=is_referable(grade) or any(e.referable for e in eye_results.values()),
        eyes=eye_results,
    )


def argmax_grade(probabilities: Sequence[float]) -> int:
    """A plain argmax grader (for tests and tools that have no ensemble at hand)."""
    if not probabilities:
        raise ValueError("empty probabilities")
    return max(range(len(probabilities)), key=lambda i: probabilities[i])
