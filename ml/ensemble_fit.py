"""Fitting the ensemble's combination rules on the natural-colour validation patients.

The validation set is small (about 57 patients, 114 photographs), and 1.0.0 showed what that
costs: cut points searched to maximise QWK on it (max_vote: [0.475, 0.53, 1.54, 1.88]) scored
0.685 there and 0.558 on the test patients. So, from 1.1.0:

- **cut points are bagged**: searched on bootstrap resamples of the validation *patients* and
  the median of each cut kept, which removes most of the noise a single search fits;
- **weights and the choice of rule are judged out of fold**: every candidate is fitted on
  4/5 of the validation patients and graded on the remaining fifth (patient-grouped, repeated
  with several shuffles); the out-of-fold QWK decides, never the in-sample one;
- **the operating point** is the 1|2 cut, lowered until validation referable sensitivity reaches
  a floor; a floor met in sample is not met out of fold (0.85 in sample gave ~0.76 out of fold on
  1.0.0's members), so each rule tries the floors in SENSITIVITY_FLOORS and keeps the one with the
  best out-of-fold QWK among those whose out-of-fold referable sensitivity and specificity meet the
  screening targets (when none does, the best QWK wins and the card says so).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from sklearn.linear_model import LogisticRegression

from ml.inference.combine import CombineRule, combine, cut, expected
from ml.metrics import DEFAULT_THRESHOLDS, fit_thresholds, group_resamples, qwk, qwk_many, referable_metrics

# in-sample validation sensitivity the 1|2 cut must keep (0: the QWK cuts as fitted)
SENSITIVITY_FLOORS = (0.0, 0.80, 0.85, 0.90)
TARGET_SENSITIVITY, TARGET_SPECIFICITY = 0.80, 0.70  # the screening targets a rule must meet out of fold
BOOTSTRAPS = 25
FOLDS, REPEATS = 5, 4
# Shuffles of the folds that judge a release (drscreen export ensemble --repeats): with 4 the
# sensitivity floor picked for 1.4.2's members swung with the shuffle seeds (docs/experiments.md,
# session 9). Fitting helpers keep REPEATS: the weight grid and the unit tests need the speed.
RELEASE_REPEATS = 20
WEIGHT_STEP = 0.25
WEIGHT_GRID = tuple(float(v) for v in np.arange(0, 1 + 1e-9, WEIGHT_STEP))  # 0, 0.25, ..., 1
GRID_MEMBERS = 4  # beyond this many members the weight grid is searched one member at a time

Fitter = Callable[[np.ndarray, np.ndarray, np.ndarray, float], CombineRule]


@dataclass
class CrossValidated:
    qwk: float
    sensitivity: float
    specificity: float
    floor: float = 0.0

    @property
    def meets_targets(self) -> bool:
        return self.sensitivity >= TARGET_SENSITIVITY and self.specificity >= TARGET_SPECIFICITY

    def preference(self) -> tuple[bool, bool, float]:
        """Sort key, best last: both screening targets met, then the sensitivity target alone
        (a missed referable eye costs more than a needless referral), then QWK. Without the
        middle term a fit that meets neither target fell back to the best-QWK candidate, whose
        sensitivity can be 0.3 (found on the cross-validated 1.2.0 fit, docs/experiments.md)."""
        return (self.meets_targets, self.sensitivity >= TARGET_SENSITIVITY, self.qwk)


def patient_folds(groups: np.ndarray, k: int, seed: int) -> list[np.ndarray]:
    """k held-out index sets; both photographs of a patient always fall in the same one."""
    patients = np.unique(groups)
    np.random.default_rng(seed).shuffle(patients)
    fold_of = {p: i % k for i, p in enumerate(patients)}
    labels = np.array([fold_of[g] for g in groups])
    return [np.flatnonzero(labels == i) for i in range(k)]


def bagged_thresholds(score: np.ndarray, y: np.ndarray, groups: np.ndarray, seed: int = 0) -> list[float]:
    """Median of the QWK-optimal cut points over bootstrap resamples of the patients."""
    patients = np.unique(groups)
    rows = {p: np.flatnonzero(groups == p) for p in patients}
    rng = np.random.default_rng(seed)
    fits = []
    for _ in range(BOOTSTRAPS):
        pick = np.concatenate([rows[p] for p in rng.choice(patients, size=len(patients))])
        fits.append(fit_thresholds(score[pick], y[pick], rounds=2))
    return sorted(round(float(c), 4) for c in np.median(np.array(fits), axis=0))


def keep_sensitivity(thresholds: list[float], score: np.ndarray, y: np.ndarray, floor: float) -> list[float]:
    """Lower the 1|2 cut until validation referable sensitivity reaches the floor.

    The 0|1 cut moves down with it when they meet (bagged cuts often sit close together), so
    the floor is always reachable; only the none/mild boundary pays for it.
    """
    cuts = list(thresholds)
    referable = y >= 2
    while referable.any() and ((score >= cuts[1]) & referable).sum() / referable.sum() < floor:
        if cuts[1] <= float(score.min()):
            break
        cuts[1] = round(cuts[1] - 0.02, 4)
        cuts[0] = min(cuts[0], round(cuts[1] - 0.01, 4))
    return cuts


def screening_cuts(score: np.ndarray, y: np.ndarray, groups: np.ndarray, floor: float) -> list[float]:
    return keep_sensitivity(bagged_thresholds(score, y, groups), score, y, floor)


def fit_weighted_average(weights: list[float]) -> Fitter:
    def fit(probs: np.ndarray, y: np.ndarray, groups: np.ndarray, floor: float) -> CombineRule:
        rule = CombineRule("weighted_average", list(weights))
        _, score, _ = combine(rule, probs)
        rule.thresholds = screening_cuts(score, y, groups, floor)
        return rule

    return fit


def fit_max_vote(probs: np.ndarray, y: np.ndarray, groups: np.ndarray, floor: float) -> CombineRule:
    m = probs.shape[0]
    member_cuts = [screening_cuts(expected(probs[i]), y, groups, floor) for i in range(m)]
    pooled = fit_weighted_average([1.0] * m)(probs, y, groups, floor)  # cut for an eye's pooled distribution
    return CombineRule("max_vote", [1.0] * m, pooled.thresholds, member_cuts)


def fit_stacking(probs: np.ndarray, y: np.ndarray, groups: np.ndarray, floor: float) -> CombineRule:
    """Multinomial logistic regression over all members' probabilities (argmax grade; ``groups``
    and ``floor`` are unused, kept for the common fitter signature)."""
    features = probs.transpose(1, 0, 2).reshape(probs.shape[1], -1)
    present = np.unique(y)
    coef = np.zeros((5, features.shape[1]))
    intercept = np.full(5, -30.0)  # grades absent from the fitting set are never predicted
    if len(present) < 2:
        intercept[present] = 0.0
    else:
        clf = LogisticRegression(C=0.5, max_iter=2000, class_weight="balanced").fit(features, y)
        binary = len(present) == 2
        coef[present] = np.vstack([-clf.coef_, clf.coef_]) if binary else clf.coef_
        intercept[present] = np.array([-clf.intercept_[0], clf.intercept_[0]]) if binary else clf.intercept_
    # the grade is the argmax of the stacked distribution: cut points would never be read, so
    # none are fitted (and the sensitivity floor cannot act on this rule)
    return CombineRule(
        "stacking",
        [1.0] * probs.shape[0],
        list(DEFAULT_THRESHOLDS),
        stacking_coef=coef.tolist(),
        stacking_intercept=intercept.tolist(),
    )


def out_of_fold_grades(
    groups: np.ndarray, grade_fold: Callable[[np.ndarray, np.ndarray], np.ndarray], repeats: int = REPEATS
) -> list[np.ndarray]:
    """One grade per photograph for each shuffle, each given by ``grade_fold(train, held)``: a fit
    on the other folds' rows that never saw the held-out patients."""
    rows = np.arange(len(groups))
    shuffles = []
    for repeat in range(repeats):
        grades = np.zeros(len(groups), dtype=int)
        for held in patient_folds(groups, FOLDS, seed=repeat):
            grades[held] = grade_fold(np.setdiff1d(rows, held), held)
        shuffles.append(grades)
    return shuffles


def fitted_out_of_fold_grades(
    fitter: Fitter, probs: np.ndarray, y: np.ndarray, groups: np.ndarray, floor: float, repeats: int = REPEATS
) -> list[np.ndarray]:
    """``out_of_fold_grades`` of a fitter: each fold's rule fitted on the other folds' patients."""

    def grade_fold(train: np.ndarray, held: np.ndarray) -> np.ndarray:
        rule = fitter(probs[:, train], y[train], groups[train], floor)
        return combine(rule, probs[:, held])[2]

    return out_of_fold_grades(groups, grade_fold, repeats)


def paired_qwk_difference(
    y: np.ndarray,
    groups: np.ndarray,
    grades_a: list[np.ndarray],
    grades_b: list[np.ndarray],
    n_resamples: int = 2000,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Mean out-of-fold QWK of A minus that of B, with a 95% patient-bootstrap interval.

    Both candidates are graded on the same resampled patients (paired), each as the mean over
    its shuffles, so the interval is of the difference itself: on 57 validation patients a
    single candidate's QWK swings by about ±0.1, far more than the differences being compared.
    """

    def mean_qwk(shuffles: list[np.ndarray], idx: np.ndarray) -> float:
        return float(qwk_many(y[idx], np.stack([g[idx] for g in shuffles])).mean())

    everyone = np.arange(len(y))
    diff = mean_qwk(grades_a, everyone) - mean_qwk(grades_b, everyone)
    draws = [
        mean_qwk(grades_a, idx) - mean_qwk(grades_b, idx)
        for idx in group_resamples(groups, n_resamples, seed)
    ]
    lo, hi = np.percentile(draws, [2.5, 97.5])
    return diff, float(lo), float(hi)


def out_of_fold(
    fitter: Fitter, probs: np.ndarray, y: np.ndarray, groups: np.ndarray, floor: float, repeats: int = REPEATS
) -> CrossValidated:
    """Mean out-of-fold QWK / referable sensitivity / specificity over repeated patient folds."""
    results = []
    for grades in fitted_out_of_fold_grades(fitter, probs, y, groups, floor, repeats):
        ref = referable_metrics(y, grades, None)
        results.append((qwk(y, grades), ref["referable_sensitivity"], ref["referable_specificity"]))
    q, sens, spec = np.nanmean(np.array(results, dtype=float), axis=0)
    return CrossValidated(float(q), float(sens), float(spec), floor)


def best_floor(
    fitter: Fitter, probs: np.ndarray, y: np.ndarray, groups: np.ndarray, repeats: int = REPEATS
) -> CrossValidated:
    """The sensitivity floor whose out-of-fold figures are best (CrossValidated.preference)."""
    tried = [out_of_fold(fitter, probs, y, groups, floor, repeats) for floor in SENSITIVITY_FLOORS]
    return max(tried, key=CrossValidated.preference)


def quick_weighted_qwk(
    weights: tuple[float, ...], probs: np.ndarray, y: np.ndarray, groups: np.ndarray
) -> float:
    """Out-of-fold QWK of a weight vector with one (unbagged) cut search per fold: the cheap
    criterion used to rank the weight grid."""
    score = combine(CombineRule("weighted_average", list(weights)), probs)[1]

    def grade_fold(train: np.ndarray, held: np.ndarray) -> np.ndarray:
        return cut(score[held], list(fit_thresholds(score[train], y[train], rounds=1)))

    return float(np.mean([qwk(y, grades) for grades in out_of_fold_grades(groups, grade_fold)]))


def _normalised(w: tuple[float, ...]) -> tuple[float, ...]:
    return tuple(round(float(v) / float(max(w)), 4) for v in w)


def best_weights(probs: np.ndarray, y: np.ndarray, groups: np.ndarray) -> list[float]:
    """Weight vector (grid of WEIGHT_STEP) with the best out-of-fold QWK; ties keep equal weights.

    Up to GRID_MEMBERS members the whole grid is ranked; beyond, ``coordinate_weights`` searches
    it one member at a time (the grid grows as 5^members: five members' 3,125 vectors, fitted
    inside every fold of 20 shuffles, ran over 30 minutes without finishing in session 14)."""
    m = probs.shape[0]
    if m > GRID_MEMBERS:
        return coordinate_weights(probs, y, groups)
    candidates = {tuple([1.0] * m)}
    for w in itertools.product(WEIGHT_GRID, repeat=m):
        if sum(w) > 0:
            candidates.add(_normalised(w))
    ranked = sorted(candidates, key=lambda w: (-quick_weighted_qwk(w, probs, y, groups), np.std(w)))
    return list(ranked[0])


def coordinate_weights(
    probs: np.ndarray, y: np.ndarray, groups: np.ndarray, max_rounds: int = 4
) -> list[float]:
    """Coordinate ascent on the WEIGHT_STEP grid from equal weights: each member's weight in turn
    takes the grid value with the best out-of-fold QWK (a change must beat the current vector),
    until a round changes nothing. Same criterion as the full grid, ~m x 5 x rounds evaluations."""
    m = probs.shape[0]
    scores: dict[tuple[float, ...], float] = {}

    def score(w: tuple[float, ...]) -> float:
        if w not in scores:
            scores[w] = quick_weighted_qwk(w, probs, y, groups)
        return scores[w]

    current = tuple([1.0] * m)
    for _ in range(max_rounds):
        changed = False
        for i in range(m):
            for v in WEIGHT_GRID:
                trial = list(current)
                trial[i] = v
                if sum(trial) == 0:
                    continue
                w = _normalised(tuple(trial))
                if score(w) > score(current):
                    current, changed = w, True
        if not changed:
            break
    return list(current)


def nested_weighted_average() -> Fitter:
    """The weighted average with its weights chosen by ``best_weights`` on the rows it is fitted
    on. Inside ``out_of_fold`` that means inside each fold: the honest figure. ``fit_rules``
    with only a fixed weight vector ranks the grid by out-of-fold QWK and then reports the
    winner's out-of-fold QWK, the same folds picking and judging (1.4.0's members: 0.702 that way,
    0.579 nested).
    Weights do not depend on the sensitivity floor, so each fold's are kept for the next floor."""
    chosen: dict[tuple[bytes, bytes], list[float]] = {}

    def fit(probs: np.ndarray, y: np.ndarray, groups: np.ndarray, floor: float) -> CombineRule:
        key = (probs.tobytes(), groups.tobytes())  # the fold's rows
        if key not in chosen:
            chosen[key] = best_weights(probs, y, groups)
        return fit_weighted_average(chosen[key])(probs, y, groups, floor)

    return fit


def nested_out_of_fold(
    probs: np.ndarray, y: np.ndarray, groups: np.ndarray, floor: float, repeats: int = REPEATS
) -> CrossValidated:
    """Out-of-fold figures of the weighted average with its weights chosen inside each fold."""
    return out_of_fold(nested_weighted_average(), probs, y, groups, floor, repeats)


def fit_rules(
    probs: np.ndarray, y: np.ndarray, groups: np.ndarray, nested: bool = True, repeats: int = REPEATS
) -> tuple[dict[str, CombineRule], dict[str, CrossValidated]]:
    """Every rule fitted on all validation patients, and its out-of-fold figures.

    ``equal_average`` is the weighted average with every weight 1: nothing is picked, so its
    out-of-fold figures need no nesting, and on 57 validation patients it beat the picked
    weights (docs/experiments.md, session 6). ``nested=False`` is the fitter of releases up to
    1.4.0: the weighted average judged with the weights picked on all validation patients
    (flattering, see ``nested_weighted_average``) and no ``equal_average``. ``repeats``: shuffles
    of the folds that judge each rule and floor."""
    weights = best_weights(probs, y, groups)
    fitters: dict[str, Fitter] = {
        "weighted_average": fit_weighted_average(weights),
        "max_vote": fit_max_vote,
        "stacking": fit_stacking,
    }
    if nested:
        fitters["equal_average"] = fit_weighted_average([1.0] * probs.shape[0])
    judges = fitters | ({"weighted_average": nested_weighted_average()} if nested else {})
    checks = {name: best_floor(judge, probs, y, groups, repeats) for name, judge in judges.items()}
    rules = {name: fitter(probs, y, groups, checks[name].floor) for name, fitter in fitters.items()}
    return rules, checks


def member_checks(
    probs: np.ndarray, y: np.ndarray, groups: np.ndarray, repeats: int = REPEATS
) -> list[CrossValidated]:
    """Each member alone, fitted the same way (so 'the ensemble beats its best member' is fair)."""
    single = fit_weighted_average([1.0])
    return [best_floor(single, probs[i : i + 1], y, groups, repeats) for i in range(probs.shape[0])]


def choose_rule(checks: dict[str, CrossValidated]) -> str:
    """Best out-of-fold QWK among the rules that meet the screening targets out of fold; failing
    that, among those that meet the sensitivity target (CrossValidated.preference)."""
    return max(checks, key=lambda name: checks[name].preference())
