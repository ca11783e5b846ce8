"""Metrics against values computed by hand."""

from __future__ import annotations

import numpy as np
import pytest

from ml.metrics import apply_thresholds, confusion, fit_thresholds, grading_report, qwk


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
