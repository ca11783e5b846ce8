"""Screening metrics shared by training, ensemble fitting and `drscreen evaluate`."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.metrics import cohen_kappa_score, roc_auc_score

NUM_GRADES = 5
REFERABLE_GRADE = 2
DEFAULT_THRESHOLDS = (0.5, 1.5, 2.5, 3.5)


def qwk(y_true: Sequence[int], y_pred: Sequence[int]) -> float:
    """Quadratic weighted kappa over the 5 ICDR grades (0.0 when undefined)."""
    if len(y_true) == 0:
        return 0.0
    value = cohen_kappa_score(y_true, y_pred, weights="quadratic", labels=list(range(NUM_GRADES)))
    return 0.0 if np.isnan(value) else float(value)


def apply_thresholds(scores: np.ndarray, thresholds: Sequence[float]) -> np.ndarray:
    """Continuous grade -> 0..4 by cut points (sorted ascending)."""
    return np.searchsorted(np.asarray(sorted(thresholds)), np.asarray(scores), side="right").astype(int)


def fit_thresholds(scores: np.ndarray, y_true: np.ndarray, rounds: int = 3) -> tuple[float, ...]:
    """Coordinate search of the 4 cut points that maximise QWK on a validation set."""
    cuts = list(DEFAULT_THRESHOLDS)
    best = qwk(y_true, apply_thresholds(scores, cuts))
    for _ in range(rounds):
        for i in range(len(cuts)):
            lo = cuts[i - 1] + 0.05 if i > 0 else -0.5
            hi = cuts[i + 1] - 0.05 if i < len(cuts) - 1 else 4.5
            for candidate in np.linspace(lo, hi, 41):
                trial = cuts.copy()
                trial[i] = float(candidate)
                score = qwk(y_true, apply_thresholds(scores, trial))
                if score > best + 1e-9:
                    best, cuts = score, trial
    return tuple(round(c, 4) for c in cuts)


def confusion(y_true: Sequence[int], y_pred: Sequence[int]) -> np.ndarray:
    matrix = np.zeros((NUM_GRADES, NUM_GRADES), dtype=int)
    for t, p in zip(y_true, y_pred, strict=True):
        matrix[int(t), int(p)] += 1
    return matrix


def referable_metrics(
    y_true: Sequence[int], y_pred: Sequence[int], referable_score: Sequence[float] | None
) -> dict[str, float]:
    """Sensitivity/specificity of grade>=2 decisions and the AUC of a referable score."""
    truth = np.asarray(y_true) >= REFERABLE_GRADE
    called = np.asarray(y_pred) >= REFERABLE_GRADE if len(y_pred) else np.zeros_like(truth)
    tp = int((truth & called).sum())
    tn = int((~truth & ~called).sum())
    sens = tp / truth.sum() if truth.sum() else float("nan")
    spec = tn / (~truth).sum() if (~truth).sum() else float("nan")
    auc = float("nan")
    if referable_score is not None and 0 < truth.sum() < len(truth):
        auc = float(roc_auc_score(truth, np.asarray(referable_score)))
    return {"referable_sensitivity": float(sens), "referable_specificity": float(spec), "referable_auc": auc}


def grading_report(
    y_true: Sequence[int], y_pred: Sequence[int], referable_score: Sequence[float] | None = None
) -> dict[str, object]:
    """Every image-level figure the contract's `evaluate --json` promises."""
    matrix = confusion(y_true, y_pred)
    support = matrix.sum(axis=1)
    recall = [float(matrix[g, g] / support[g]) if support[g] else float("nan") for g in range(NUM_GRADES)]
    y_t, y_p = np.asarray(y_true), np.asarray(y_pred)
    report: dict[str, object] = {
        "n_images": len(y_t),
        "qwk": qwk(y_t, y_p),
        "accuracy": float((y_t == y_p).mean()) if len(y_t) else float("nan"),
        "per_class_recall": recall,
        "confusion_matrix": matrix.tolist(),
    }
    report.update(referable_metrics(y_t, y_p, referable_score))
    return report


def operating_point(
    y_true: Sequence[int], referable_score: Sequence[float], min_sensitivity: float = 0.85
) -> float:
    """Highest referable-score cut that still keeps sensitivity >= min_sensitivity."""
    truth = np.asarray(y_true) >= REFERABLE_GRADE
    scores = np.asarray(referable_score)
    best = float(scores.min())
    for cut in np.unique(scores):
        if truth.sum() and ((scores >= cut) & truth).sum() / truth.sum() >= min_sensitivity:
            best = float(cut)
    return best
