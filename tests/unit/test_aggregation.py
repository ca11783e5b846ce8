from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pytest

from core.aggregation import (
    ImageScore,
    aggregate_eye,
    aggregate_patient,
    argmax_grade,
    is_referable,
    mean_probabilities,
)
from ml.inference.combine import CombineRule, combine, cut
from ml.inference.ensemble import Ensemble, Member
from ml.preprocess import PreprocessConfig

MODELS = Path(__file__).resolve().parents[2] / "models" / "ensembles" / "drscreen-ensemble"

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


def test_an_eye_with_one_referable_photograph_is_referable_whatever_its_pooled_grade() -> None:
    """The clinician's review (session 29): a grade-3 photograph and a clean second field of the
    same eye pooled to grade 0, and the page read "No referral" beside the grade-3 photograph. The
    eye's grade stays the contract's pooled one; the eye and the patient are referred."""
    lesion = ImageScore("b", "left", True, P3, grade=3)
    clean = ImageScore("a", "left", True, P0, grade=0)
    eye = aggregate_eye("left", [clean, lesion], argmax_grade)
    assert eye.grade == 0 and eye.gradable and eye.referable
    patient = aggregate_patient([clean, lesion, ImageScore("c", "right", True, P0, grade=0)], argmax_grade)
    assert (patient.grade, patient.referable) == (0, True)
    # a graded photograph left out of the pooling (one file sent as both eyes) still refers the
    # eye; a photograph without a grade (found ungradable) does not
    both_eyes = ImageScore("b", "left", False, None, grade=3)
    assert aggregate_eye("left", [clean, both_eyes], argmax_grade).referable
    assert not aggregate_eye("left", [clean, ImageScore("e", "left", False, None)], argmax_grade).referable
    assert not aggregate_eye(
        "left", [clean, ImageScore("d", "left", True, P1, grade=1)], argmax_grade
    ).referable


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


# ------------------------------------------------- rules whose grade is a vote of the members


def _shipped_rule(version: str) -> CombineRule:
    manifest = json.loads((MODELS / version / "manifest.json").read_text())
    return CombineRule.from_dict(manifest["combination"])


def _ensemble(rule: CombineRule, n: int) -> Ensemble:
    members = [Member(f"m{i}@1.0.0", None, PreprocessConfig(), {}, folder=Path("unused")) for i in range(n)]
    return Ensemble("test@1.0.0", members, rule, {})


def _one_photograph_eye(ens: Ensemble, member_probs: np.ndarray) -> tuple[int, int]:
    """(the photograph's grade, its eye's grade) as the worker computes them."""
    combined, _, grade = combine(ens.rule, member_probs[:, None, :])
    by_ref = {m: list(member_probs[i]) for i, m in enumerate(ens.members)}
    score = ImageScore("a", "left", True, list(combined[0]), by_ref)
    eye = aggregate_eye("left", [score], ens.grade_from_probabilities, ens.grade_eye)
    assert eye.grade is not None
    return int(grade[0]), eye.grade


def test_a_max_vote_eye_of_one_photograph_has_that_photographs_grade() -> None:
    """drscreen-ensemble@1.1.0 (max_vote): the members vote 0, 2, 2, so the photograph is grade 2
    (referable); the eye cut the pooled combined distribution (expected grade 0.485) at 0.5 and was
    grade 0, and the patient not referable (the helper review's case)."""
    ens = _ensemble(_shipped_rule("1.1.0"), 3)
    votes = np.array(
        [
            [0.664, 0.268, 0.023, 0.031, 0.015],
            [0.677, 0.221, 0.058, 0.015, 0.028],
            [0.715, 0.13, 0.118, 0.02, 0.017],
        ]
    )
    photograph, eye = _one_photograph_eye(ens, votes)
    assert photograph == 2 and eye == 2
    combined = combine(ens.rule, votes[:, None, :])[0][0]
    assert ens.grade_from_probabilities(list(combined)) == 0  # what the eye got before
    other = ImageScore(
        "b", "right", True, [0.9, 0.1, 0.0, 0.0, 0.0], {m: [0.9, 0.1, 0, 0, 0] for m in ens.members}
    )
    left = ImageScore(
        "a", "left", True, list(combined), {m: list(votes[i]) for i, m in enumerate(ens.members)}
    )
    patient = aggregate_patient([left, other], ens.grade_from_probabilities, eye_grade_fn=ens.grade_eye)
    assert patient.grade == 2 and patient.referable


def _stacking_rule(n: int) -> CombineRule:
    """A stacking rule (none is shipped) whose grade, the stacked distribution's most probable
    one, often differs from its expected grade cut: each member's probability of a grade adds to
    that grade's logit, and the intercept leans towards grade 2."""
    return CombineRule(
        "stacking",
        stacking_coef=np.hstack([2.0 * np.eye(5)] * n).tolist(),
        stacking_intercept=np.log([0.35, 0.05, 0.45, 0.1, 0.05]).tolist(),
    )


@pytest.mark.parametrize("version", ["1.0.0", "1.1.0", "1.4.1", "1.6.0", "stacking"])
def test_every_shipped_rule_grades_a_one_photograph_eye_as_its_photograph(version: str) -> None:
    """Each shipped release's rule, and the stacking rule (``stacking``: a synthetic one, as no
    release ships it). The session-31 mutation review: no test had a stacking rule, and an eye
    graded by cutting the stacked distribution's expected grade (the other rules' eye grade)
    gave a one-photograph eye, and so its patient, another grade than its photograph's (the
    most probable one): a grade-2 photograph's eye read grade 1, referred for one field only."""
    if version == "stacking":
        n = 3
        rule = _stacking_rule(n)
    else:
        rule = _shipped_rule(version)
        n = len(json.loads((MODELS / version / "manifest.json").read_text())["members"])
    ens = _ensemble(rule, n)
    rng = np.random.default_rng(7)
    for _ in range(500):
        member_probs = rng.dirichlet(np.full(5, 0.6), size=n)
        photograph, eye = _one_photograph_eye(ens, member_probs)
        assert photograph == eye
    if version == "stacking":
        # members that see nothing: stacked [0.35, 0.05, 0.45, 0.1, 0.05], most probable grade 2
        # (referable), expected grade 1.45 (cut: grade 1)
        flat = np.full((n, 5), 0.2)
        combined, score, _ = combine(rule, flat[:, None, :])
        assert combined[0] == pytest.approx([0.35, 0.05, 0.45, 0.1, 0.05])
        assert score[0] == pytest.approx(1.45) and int(cut(score, rule.thresholds)[0]) == 1
        assert _one_photograph_eye(ens, flat) == (2, 2)


def test_an_eye_of_several_photographs_votes_on_each_members_mean() -> None:
    ens = _ensemble(_shipped_rule("1.1.0"), 3)
    seen: list[dict[str, list[float]] | None] = []

    def grader(probabilities: Sequence[float], members: Mapping[str, Sequence[float]] | None) -> int:
        seen.append(None if members is None else {k: list(v) for k, v in members.items()})
        return ens.grade_eye(probabilities, members)

    a = {m: [1.0, 0, 0, 0, 0] for m in ens.members}
    b = {m: [0, 0, 1.0, 0, 0] for m in ens.members}
    images = [
        ImageScore("a", "left", True, [1.0, 0, 0, 0, 0], a),
        ImageScore("b", "left", True, [0, 0, 1.0, 0, 0], b),
    ]
    aggregate_eye("left", images, argmax_grade, grader)
    assert seen == [{m: [0.5, 0.0, 0.5, 0.0, 0.0] for m in ens.members}]
    # a photograph graded without its members' outputs: nothing to pool, the combined one is graded
    aggregate_eye("left", [images[0], ImageScore("c", "left", True, [0, 1.0, 0, 0, 0])], argmax_grade, grader)
    assert seen[-1] is None
