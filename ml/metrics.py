"""Screening metrics shared by training, ensemble fitting and `drscreen evaluate`."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score

from ml.inference.combine import CombineRule, combine, eye_grade

NUM_GRADES = 5
REFERABLE_GRADE = 2
DEFAULT_THRESHOLDS = (0.5, 1.5, 2.5, 3.5)
Labels = Sequence[int] | np.ndarray  # grades, as a list or a numpy array
Scores = Sequence[float] | np.ndarray


def qwk(y_true: Labels, y_pred: Labels, undefined: float = 0.0) -> float:
    """Quadratic weighted kappa over the 5 ICDR grades (``undefined`` when it is: no photographs,
    or labels and grades each all one grade, where scikit-learn says NaN). Fitting keeps 0.0
    (a cut point that makes it undefined is no better than chance); reports pass NaN.

    Same value as sklearn's cohen_kappa_score(weights="quadratic", labels=range(5)) (without
    ``labels`` sklearn weighs by the grades present only), computed with numpy because ensemble
    fitting evaluates it hundreds of thousands of times.
    """
    t, p = np.asarray(y_true, dtype=int), np.asarray(y_pred, dtype=int)
    if len(t) == 0:
        return undefined
    return float(qwk_many(t, p[None, :], undefined)[0])


def apply_thresholds(scores: np.ndarray, thresholds: Sequence[float]) -> np.ndarray:
    """Continuous grade -> 0..4 by cut points (sorted ascending)."""
    return np.searchsorted(np.asarray(sorted(thresholds)), np.asarray(scores), side="right").astype(int)


def qwk_many(y_true: np.ndarray, y_preds: np.ndarray, undefined: float = 0.0) -> np.ndarray:
    """QWK of each row of y_preds (K, N) against y_true (N,) in one vectorised pass."""
    k, n = y_preds.shape
    if n == 0:
        return np.full(k, undefined)
    cells = (np.arange(k)[:, None] * NUM_GRADES + np.asarray(y_true)[None, :]) * NUM_GRADES + y_preds
    observed = np.bincount(cells.ravel(), minlength=k * NUM_GRADES**2).reshape(k, NUM_GRADES, NUM_GRADES)
    expected = observed.sum(axis=2)[:, :, None] * observed.sum(axis=1)[:, None, :] / n
    weights = np.subtract.outer(np.arange(NUM_GRADES), np.arange(NUM_GRADES)) ** 2
    denominator = (weights * expected).sum(axis=(1, 2))
    numerator = (weights * observed).sum(axis=(1, 2))
    safe = np.where(denominator == 0, 1.0, denominator)
    return np.where(denominator == 0, undefined, 1.0 - numerator / safe)


def fit_thresholds(scores: np.ndarray, y_true: np.ndarray, rounds: int = 3) -> tuple[float, ...]:
    """Coordinate search of the 4 cut points that maximise QWK on a validation set.

    Each cut in turn tries 41 positions between its neighbours (all scored at once); the first
    best position is kept when it improves QWK.
    """
    scores, y_true = np.asarray(scores), np.asarray(y_true)
    cuts = list(DEFAULT_THRESHOLDS)
    best = qwk(y_true, apply_thresholds(scores, cuts))
    for _ in range(rounds):
        for i in range(len(cuts)):
            lo = cuts[i - 1] + 0.05 if i > 0 else -0.5
            hi = cuts[i + 1] - 0.05 if i < len(cuts) - 1 else 4.5
            candidates = np.linspace(lo, hi, 41)
            below = apply_thresholds(scores, cuts[:i])  # grade from the lower cuts alone
            above = apply_thresholds(scores, cuts[i + 1 :])
            # grade = cuts below passed + this cut passed + cuts above passed
            passed = (scores[None, :] >= candidates[:, None]).astype(int)
            preds = below[None, :] + passed + above[None, :]
            values = qwk_many(y_true, preds)
            j = int(np.argmax(values))
            if values[j] > best + 1e-9:
                best, cuts[i] = float(values[j]), float(candidates[j])
    return tuple(round(c, 4) for c in cuts)


def confusion(y_true: Labels, y_pred: Labels) -> np.ndarray:
    matrix = np.zeros((NUM_GRADES, NUM_GRADES), dtype=int)
    for t, p in zip(y_true, y_pred, strict=True):
        matrix[int(t), int(p)] += 1
    return matrix


def referable_metrics(y_true: Labels, y_pred: Labels, referable_score: Scores | None) -> dict[str, float]:
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
    y_true: Labels, y_pred: Labels, referable_score: Scores | None = None
) -> dict[str, object]:
    """Every image-level figure the contract's `evaluate --json` promises."""
    matrix = confusion(y_true, y_pred)
    support = matrix.sum(axis=1)
    recall = [float(matrix[g, g] / support[g]) if support[g] else float("nan") for g in range(NUM_GRADES)]
    y_t, y_p = np.asarray(y_true), np.asarray(y_pred)
    report: dict[str, object] = {
        "n_images": len(y_t),
        "qwk": qwk(y_t, y_p, undefined=float("nan")),  # null in JSON, as an absent grade's recall
        "accuracy": float((y_t == y_p).mean()) if len(y_t) else float("nan"),
        "per_class_recall": recall,
        "confusion_matrix": matrix.tolist(),
    }
    report.update(referable_metrics(y_t, y_p, referable_score))
    return report


def group_resamples(groups: Sequence[str] | np.ndarray, n_resamples: int, seed: int = 0) -> list[np.ndarray]:
    """Row indices of ``n_resamples`` bootstrap resamples that draw whole groups (patients) with
    replacement; none when there are no rows."""
    keys = np.asarray(groups)
    if not len(keys):
        return []
    _, cluster = np.unique(keys, return_inverse=True)
    members = [np.flatnonzero(cluster == c) for c in range(cluster.max() + 1)]
    rng = np.random.default_rng(seed)
    return [
        np.concatenate([members[c] for c in rng.integers(0, len(members), len(members))])
        for _ in range(n_resamples)
    ]


def bootstrap_intervals(
    y_true: Labels,
    y_pred: Labels,
    referable_score: Scores,
    groups: Sequence[str] | None = None,
    n_resamples: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, list[float]]:
    """Percentile bootstrap intervals of QWK, accuracy and the referable figures.

    Resamples whole ``groups`` (patients: both eyes of a patient are not independent) or single
    images. With ~100 test photographs a QWK moves by ±0.1 between resamples; the interval says
    how far a figure can be trusted before comparing it with a target or another model.
    """
    t, p = np.asarray(y_true, dtype=int), np.asarray(y_pred, dtype=int)
    s = np.asarray(referable_score, dtype=float)
    keys = np.asarray(groups if groups is not None else np.arange(len(t)).astype(str))
    draws = group_resamples(keys, n_resamples, seed)
    values: dict[str, list[float]] = {k: [] for k in ("qwk", "accuracy", *referable_metrics([], [], None))}
    for idx in draws:
        values["accuracy"].append(float((t[idx] == p[idx]).mean()))
        for key, value in referable_metrics(t[idx], p[idx], s[idx]).items():
            values[key].append(value)
    # resamples differ in length when groups differ in size, so QWK is taken one draw at a time
    # a resample where QWK is undefined is dropped, as the referable figures' are (it counted 0)
    values["qwk"] = [qwk(t[idx], p[idx], undefined=float("nan")) for idx in draws]
    tail = 100 * (1 - level) / 2
    out: dict[str, list[float]] = {}
    for key, vals in values.items():
        finite = np.asarray(vals, dtype=float)
        finite = finite[np.isfinite(finite)]
        out[key] = (
            [float(np.percentile(finite, tail)), float(np.percentile(finite, 100 - tail))]
            if len(finite)
            else [float("nan"), float("nan")]
        )
    return out


def patient_referable_metrics(
    rule: CombineRule,
    member_probs: np.ndarray,
    patient_ids: Sequence[str],
    eyes: Sequence[str],
    y_true: Labels,
    gradable: Sequence[bool] | None = None,
    with_intervals: bool = False,
) -> dict[str, Any]:
    """Referable figures per patient, as the service decides: an eye graded from its gradable
    photographs pooled (``combine.eye_grade``) and referred also when one of them alone is
    referable, an eye with none referred, the patient referable when either eye is; the score is
    the worse eye's referable probability, pooled or of its worst photograph (1 for an eye with no
    gradable photograph). ``member_probs`` (M, N, 5) for N photographs; ``gradable`` what the
    quality gate let through (default all). The image-level operating point does not carry over:
    a patient has two chances to be referred. ``with_intervals`` adds ``intervals_95``: patients
    resampled (each figure rests on a few dozen patients; the point alone says too much)."""
    probs = np.asarray(member_probs, dtype=np.float64)
    combined, _, photo_grades = combine(rule, probs)
    photo_scores = combined[:, REFERABLE_GRADE:].sum(axis=1)
    y = np.asarray(y_true)
    by_eye: dict[tuple[str, str], list[int]] = defaultdict(list)
    for i, (pid, eye) in enumerate(zip(patient_ids, eyes, strict=True)):
        by_eye[(pid, eye or str(i))].append(i)  # an eye not named: its photograph alone
    truth: dict[str, int] = defaultdict(int)
    called: dict[str, int] = defaultdict(int)
    score: dict[str, float] = defaultdict(float)
    for (pid, _), idx in by_eye.items():
        truth[pid] = max(truth[pid], int(y[idx].max()))
        usable = [i for i in idx if gradable is None or gradable[i]]
        if not usable:  # ungradable eye: referred (the contract's rule)
            called[pid], score[pid] = NUM_GRADES - 1, 1.0
            continue
        eye_called = eye_grade(rule, probs[:, usable, :])
        if int(photo_grades[usable].max()) >= REFERABLE_GRADE:  # one field's lesion refers the eye
            eye_called = max(eye_called, REFERABLE_GRADE)
        called[pid] = max(called[pid], eye_called)
        pooled = float(combined[usable].mean(axis=0)[REFERABLE_GRADE:].sum())
        score[pid] = max(score[pid], pooled, float(photo_scores[usable].max()))
    pids = sorted(truth)
    per_patient = ([truth[p] for p in pids], [called[p] for p in pids], [score[p] for p in pids])
    out: dict[str, Any] = {"n_patients": len(pids), **referable_metrics(*per_patient)}
    if with_intervals:
        intervals = bootstrap_intervals(*per_patient, groups=pids)
        out["intervals_95"] = {k: v for k, v in intervals.items() if k.startswith("referable_")}
    return out
