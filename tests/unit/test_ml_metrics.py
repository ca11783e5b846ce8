"""Metrics against values computed by hand."""

from __future__ import annotations

import numpy as np
import pytest

from ml.inference.combine import CombineRule
from ml.metrics import (
    apply_thresholds,
    bootstrap_intervals,
    confusion,
    fit_thresholds,
    grading_report,
    group_resamples,
    patient_referable_metrics,
    qwk,
)


def test_qwk_perfect_and_known_value() -> None:
    assert qwk([0, 1, 2, 3, 4], [0, 1, 2, 3, 4]) == pytest.approx(1.0)
    # hand-computed: O = [[1,1],[0,2]] over grades 0..1 with quadratic weights -> kappa 0.5
    assert qwk([0, 0, 1, 1], [0, 1, 1, 1]) == pytest.approx(0.5)


def test_grading_report_on_a_known_set() -> None:
    y = [0, 0, 0, 2, 2, 4]
    pred = [0, 2, 0, 2, 1, 4]
    score = [0.1, 0.6, 0.2, 0.9, 0.4, 0.95]
    r = grading_report(y, pred, score)
    assert r["n_images"] == 6
    assert r["accuracy"] == pytest.approx(4 / 6)
    assert r["referable_sensitivity"] == pytest.approx(2 / 3)  # truth referable: 3,4,5; called: 3,5
    assert r["referable_specificity"] == pytest.approx(2 / 3)  # image 1 over-called
    assert r["referable_auc"] == pytest.approx(8 / 9)  # 8 of 9 (referable, not) pairs ordered right
    recall = r["per_class_recall"]
    assert isinstance(recall, list) and recall[0] == pytest.approx(2 / 3) and recall[4] == 1.0
    assert np.isnan(recall[1])
    assert confusion(y, pred)[0, 2] == 1


def test_thresholds_cut_and_fit() -> None:
    assert apply_thresholds(np.array([0.2, 0.5, 1.49, 3.6]), (0.5, 1.5, 2.5, 3.5)).tolist() == [0, 1, 1, 4]
    rng = np.random.default_rng(0)
    y = rng.integers(0, 5, 400)
    scores = y * 0.5 + rng.normal(0, 0.1, 400)  # a squeezed scale: default cuts are wrong
    fitted = fit_thresholds(scores, y)
    assert (
        qwk(y, apply_thresholds(scores, fitted))
        > qwk(y, apply_thresholds(scores, (0.5, 1.5, 2.5, 3.5))) + 0.1
    )


def test_bootstrap_intervals_perfect_grading_is_certain() -> None:
    y = [0, 0, 1, 2, 2, 3, 4, 0, 1, 4]
    out = bootstrap_intervals(y, y, [float(g >= 2) for g in y], n_resamples=200)
    assert out["qwk"] == [1.0, 1.0] and out["accuracy"] == [1.0, 1.0]
    assert out["referable_sensitivity"] == [1.0, 1.0] and out["referable_auc"] == [1.0, 1.0]


def test_an_undefined_qwk_is_reported_undefined_and_left_out_of_the_intervals() -> None:
    """The review (session 30): a perfect grader of nine grade-0 and one grade-2 photographs had
    QWK 1.0 with the interval [0.0, 1.0] (resamples without the grade-2 one counted as 0.0), and
    labels all of one grade graded perfectly reported QWK 0.0 where scikit-learn says NaN."""
    y = [0] * 9 + [2]
    out = bootstrap_intervals(y, y, [float(g >= 2) for g in y], n_resamples=200)
    assert out["qwk"] == [1.0, 1.0]
    assert np.isnan(grading_report([1, 1, 1], [1, 1, 1])["qwk"])  # type: ignore[arg-type]
    assert grading_report(y, y)["qwk"] == 1.0


def test_bootstrap_intervals_bracket_the_estimate_and_widen_with_fewer_patients() -> None:
    rng = np.random.default_rng(5)
    y = rng.integers(0, 5, 400)
    pred = np.where(rng.random(400) < 0.6, y, rng.integers(0, 5, 400))
    score = (pred >= 2) + rng.random(400)
    full = bootstrap_intervals(y, pred, score, n_resamples=300, seed=1)
    assert full == bootstrap_intervals(y, pred, score, n_resamples=300, seed=1)  # seeded
    assert full["qwk"][0] < qwk(y, pred) < full["qwk"][1]
    small = bootstrap_intervals(y[:40], pred[:40], score[:40], n_resamples=300, seed=1)
    assert np.diff(small["qwk"])[0] > 2 * np.diff(full["qwk"])[0]


def test_bootstrap_intervals_resample_whole_patients() -> None:
    # three patients of ten photographs; one patient's are all wrong. Drawing patients, a third
    # of the resamples lose or double that patient (accuracy 0, 1/3, 2/3 or 1); drawing
    # photographs, accuracy stays near 2/3.
    y = np.zeros(30, dtype=int)
    pred = np.r_[np.zeros(20, dtype=int), np.full(10, 3)]
    groups = [str(i // 10) for i in range(30)]
    by_patient = bootstrap_intervals(y, pred, pred.astype(float), groups=groups, n_resamples=500)
    by_photo = bootstrap_intervals(y, pred, pred.astype(float), n_resamples=500)
    assert by_patient["accuracy"][0] <= 1 / 3 + 1e-9 and by_patient["accuracy"][1] == 1.0
    assert by_photo["accuracy"][0] > 0.45 and by_photo["accuracy"][1] < 0.85


def test_qwk_is_sklearns_quadratic_kappa_over_the_five_grades() -> None:
    """The test review: with grades 0 and 1 only, quadratic and linear weights agree, so linear
    weights passed every test. Random 5-grade cases against sklearn's own."""
    from sklearn.metrics import cohen_kappa_score

    rng = np.random.default_rng(11)
    for n in (5, 12, 60):
        for _ in range(20):
            y, p = rng.integers(0, 5, n), rng.integers(0, 5, n)
            expected = cohen_kappa_score(y, p, weights="quadratic", labels=list(range(5)))
            if np.isfinite(expected):
                assert qwk(y, p) == pytest.approx(expected, abs=1e-12)
    assert qwk([0, 0, 2, 4, 1], [2, 0, 0, 4, 4]) == pytest.approx(0.41379, abs=1e-4)  # linear: 0.2553
    assert qwk([2, 2, 2], [2, 2, 2]) == 0.0  # undefined (no spread): 0.0, never a perfect 1.0


def test_bootstrap_interval_is_the_central_level_of_the_draws() -> None:
    """The interval is the 2.5th and 97.5th percentile of the resampled QWKs for level 0.95 (the
    test review: 5th-95th passed every test)."""
    rng = np.random.default_rng(3)
    y, pred = rng.integers(0, 5, 80), rng.integers(0, 5, 80)
    groups = [str(i // 2) for i in range(80)]
    out = bootstrap_intervals(y, pred, pred.astype(float), groups=groups, n_resamples=400, seed=7)
    draws = [qwk(y[idx], pred[idx]) for idx in group_resamples(groups, 400, seed=7)]
    assert out["qwk"] == pytest.approx(list(np.percentile(draws, [2.5, 97.5])))
    for idx in group_resamples(groups, 50, seed=7):  # 40 patients of 2 photographs drawn each time
        assert len(idx) == 80


def test_patient_figures_take_the_worse_eye_and_keep_unnamed_photographs_apart() -> None:
    """The test review: scoring a patient by the last eye instead of the worse one, or pooling
    photographs without an eye into one eye, changed no test."""
    rule = CombineRule("weighted_average", [1.0])
    low, high = [0.9, 0.05, 0.03, 0.01, 0.01], [0.05, 0.05, 0.3, 0.3, 0.3]
    probs = np.array([[high, low, low, low]])  # P1: left referable, right not; P2: neither
    out = patient_referable_metrics(
        rule, probs, ["P1", "P1", "P2", "P2"], ["left", "right"] * 2, [3, 0, 0, 0]
    )
    assert out["n_patients"] == 2 and out["referable_auc"] == 1.0 and out["referable_sensitivity"] == 1.0
    # two photographs of P3 with no eye named, one ungradable: it may be the other eye, so referred
    unnamed = patient_referable_metrics(
        rule, np.array([[low, low]]), ["P3", "P3"], ["", ""], [0, 0], gradable=[False, True]
    )
    assert unnamed["referable_specificity"] == 0.0


def test_patient_figures_refer_an_eye_for_one_referable_photograph() -> None:
    """As the service decides (core.aggregation): a referable photograph pooled with a clean one of
    the same eye still refers the patient (the clinician's review, session 29)."""
    rule = CombineRule("weighted_average", [1.0])
    low, high = [0.9, 0.05, 0.03, 0.01, 0.01], [0.05, 0.05, 0.3, 0.3, 0.3]
    # P1's left eye: one clean field, one with the lesion (pooled expected grade ~1.4: grade 1)
    probs = np.array([[low, high, low, low, low]])
    out = patient_referable_metrics(
        rule,
        probs,
        ["P1", "P1", "P1", "P2", "P2"],
        ["left", "left", "right", "left", "right"],
        [3, 3, 0, 0, 0],
    )
    assert out["referable_sensitivity"] == 1.0 and out["referable_specificity"] == 1.0
    assert out["referable_auc"] == 1.0


def test_patient_score_is_the_eyes_worst_photograph_when_it_is_worse_than_the_pool() -> None:
    """The session-31 mutation review: the patient's referable score is its worse eye's referable
    probability, pooled or of its worst photograph (the eye rule: one referable photograph refers
    the eye); no test had a patient whose pooled probability alone would rank them wrong. Scored by
    the pool only, the AUC reported for a release would rank a patient with a referable
    photograph below one with none."""
    rule = CombineRule("weighted_average", [1.0])
    clean = [0.85, 0.05, 0.05, 0.05, 0.0]  # referable probability 0.1, grade 0
    lesion = [0.05, 0.05, 0.1, 0.7, 0.1]  # 0.9, grade 3
    doubtful = [0.4, 0.0, 0.6, 0.0, 0.0]  # 0.6, expected grade 1.2: grade 1, not referable
    # P1's left eye: the lesion and a clean field, pooled 0.5; P2's left eye 0.6 with no
    # referable photograph; both right eyes clean
    probs = np.array([[lesion, clean, clean, doubtful, clean]])
    pooled = np.mean([lesion, clean], axis=0)[2:].sum()
    assert pooled == pytest.approx(0.5) and pooled < 0.6 < 0.9
    out = patient_referable_metrics(
        rule,
        probs,
        ["P1", "P1", "P1", "P2", "P2"],
        ["left", "left", "right", "left", "right"],
        [3, 0, 0, 0, 0],
    )
    assert out["referable_sensitivity"] == 1.0 and out["referable_specificity"] == 1.0
    assert out["referable_auc"] == 1.0  # P1 scored 0.9 (its worst photograph), above P2's 0.6
