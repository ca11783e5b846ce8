from __future__ import annotations

from collections.abc import Sequence

import pytest

from core.aggregation import (
    ImageScore,
    aggregate_eye,
    aggregate_patient,
    argmax_grade,
    is_referable,
    mean_probabilities,
)

P0 = [0.9, 0.1, 0.0, 0.0, 0.0]
P1 = [0.1, 0.8, 0.1, 0.0, 0.0]
P3 = [0.0, 0.0, 0.2, 0.7, 0.1]


def img(i: str, eye: str, probs: list[float] | None, gradable: bool = True) -> ImageScore:
    return ImageScore(image_id=i, eye=eye, gradable=gradable, probabilities=probs)


def test_eye_grade_is_grade_of_mean_probabilities() -> None:
    # argmax of each image: 0 and 3; the mean [0.45, 0.05, 0.1, 0.35, 0.05] -> grade 0
    eye = aggregate_eye("left", [img("a", "left", P0), img("b", "left", P3)], argmax_grade)
    assert eye.probabilities == pytest.approx([0.45, 0.05, 0.1, 0.35, 0.05])
    assert eye.grade == 0 and eye.gradable and not eye.referable
    assert eye.image_ids == ["a", "b"]


def test_ungradable_images_are_left_out_of_the_mean() -> None:
    eye = aggregate_eye("left", [img("a", "left", P3, gradable=False), img("b", "left", P1)], argmax_grade)
    assert eye.grade == 1 and eye.probabilities == pytest.approx(P1)


def test_grade_function_is_the_one_passed_in() -> None:
    calls: list[list[float]] = []

    def grader(p: Sequence[float]) -> int:
        calls.append(list(p))
        return 4

    res = aggregate_patient([img("a", "left", P0)], grader)
    assert res.grade == 4 and calls == [pytest.approx(P0)]


def test_patient_is_the_worse_eye() -> None:
    res = aggregate_patient([img("a", "left", P1), img("b", "right", P3)], argmax_grade)
    assert (res.grade, res.gradable, res.referable) == (3, True, True)
    assert res.eyes["left"].grade == 1 and res.eyes["right"].grade == 3


def test_eye_without_gradable_image_is_ungradable_and_referable() -> None:
    res = aggregate_patient([img("a", "left", P0), img("b", "right", None, gradable=False)], argmax_grade)
    assert res.eyes["right"].grade is None and not res.eyes["right"].gradable
    assert res.eyes["right"].referable
    assert res.grade == 0 and res.gradable
    assert res.referable  # an ungradable eye must be seen


def test_an_eye_never_photographed_is_ungradable_and_referable() -> None:
    """The contract: an eye with no gradable image is ungradable and clinics refer; an eye with
    no photograph at all has none (a visit with only the left eye did not refer before)."""
    res = aggregate_patient([img("a", "left", P0)], argmax_grade)
    assert set(res.eyes) == {"left", "right"}
    right = res.eyes["right"]
    assert (right.grade, right.gradable, right.referable, right.image_ids) == (None, False, True, [])
    assert res.grade == 0 and res.gradable and res.referable


def test_patient_without_any_gradable_image() -> None:
    res = aggregate_patient([img("a", "left", P0, gradable=False)], argmax_grade)
    assert (res.grade, res.gradable, res.referable) == (None, False, True)
    assert aggregate_patient([], argmax_grade).grade is None
    assert aggregate_patient([], argmax_grade).referable


def test_not_referable_when_both_eyes_low() -> None:
    res = aggregate_patient([img("a", "left", P0), img("b", "right", P1)], argmax_grade)
    assert (res.grade, res.referable) == (1, False)


def test_helpers_and_errors() -> None:
    assert is_referable(None) and is_referable(2) and not is_referable(1)
    assert mean_probabilities([]) is None
    with pytest.raises(ValueError):
        mean_probabilities([[0.5, 0.5], [1.0]])
    with pytest.raises(ValueError):
        aggregate_patient([img("a", "middle", P0)], argmax_grade)
