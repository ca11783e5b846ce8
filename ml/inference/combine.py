"""Combination rules that turn the members' outputs into one grade distribution and grade.

- ``weighted_average``: weighted mean of the members' probabilities; the grade is that
  distribution's expected grade cut at thresholds fitted on validation. The same cut applies
  to an eye's pooled distribution, so a one-photo eye always gets its photo's grade.
- ``max_vote``: each member votes its own (thresholded) grade; ties go to the worse grade
  (a screening service prefers over- to under-calling). The grade is not a function of the
  combined distribution, so an eye votes on its members' pooled distributions
  (``grade_from_members``): cutting the pooled combined distribution gave a one-photograph eye
  another grade than its photograph (a referable photograph in a not-referable patient).
- ``stacking``: a multinomial logistic regression over the members' probabilities, fitted on
  validation; its coefficients live in the manifest.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

RULES = ("weighted_average", "max_vote", "stacking")
NUM_GRADES = 5


@dataclass
class CombineRule:
    rule: str = "weighted_average"
    weights: list[float] = field(default_factory=list)
    thresholds: list[float] = field(default_factory=lambda: [0.5, 1.5, 2.5, 3.5])
    member_thresholds: list[list[float]] = field(default_factory=list)
    stacking_coef: list[list[float]] | None = None
    stacking_intercept: list[float] | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CombineRule:
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def _cuts_problem(cuts: Any, what: str) -> str | None:
    if not isinstance(cuts, list) or len(cuts) != NUM_GRADES - 1:
        return f"{what} must be {NUM_GRADES - 1} numbers"
    if not all(isinstance(c, int | float) and np.isfinite(c) for c in cuts):
        return f"{what} must be finite numbers"
    if list(cuts) != sorted(cuts):
        return f"{what} must not decrease"
    return None


def rule_problem(rule: CombineRule, n_members: int) -> str | None:
    """Why a manifest's combination cannot grade ``n_members`` members' outputs, or None. Checked
    when a release is loaded: two weights for three members, or a rule of another name, loaded and
    then failed every photograph at scoring; weights of 0 graded every photograph 4 from NaN; cut
    points out of order were sorted silently (the release review, session 29)."""
    if rule.rule not in RULES:
        return f"unknown rule {rule.rule!r} (one of {', '.join(RULES)})"
    weights = rule.weights
    if weights and (len(weights) != n_members or not all(isinstance(w, int | float) for w in weights)):
        return f"{len(weights)} weights for {n_members} members"
    if weights and (not all(np.isfinite(w) and w >= 0 for w in weights) or sum(weights) <= 0):
        return "weights must be finite, not negative, and not all 0"
    problem = _cuts_problem(rule.thresholds, "thresholds")
    if problem is None and rule.member_thresholds:
        if len(rule.member_thresholds) != n_members:
            return f"{len(rule.member_thresholds)} member thresholds for {n_members} members"
        problem = next(
            (p for c in rule.member_thresholds if (p := _cuts_problem(c, "member thresholds"))), None
        )
    if problem is None and rule.rule == "stacking":
        coef, intercept = np.asarray(rule.stacking_coef or []), np.asarray(rule.stacking_intercept or [])
        if coef.shape != (NUM_GRADES, NUM_GRADES * n_members) or intercept.shape != (NUM_GRADES,):
            return f"stacking coefficients of shape {coef.shape} for {n_members} members"
    return problem


def cut(scores: np.ndarray, thresholds: list[float]) -> np.ndarray:
    return np.searchsorted(np.asarray(sorted(thresholds)), scores, side="right").astype(int)


def expected(probs: np.ndarray) -> np.ndarray:
    return np.asarray(probs) @ np.arange(NUM_GRADES)


def combine(rule: CombineRule, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """probs (M,N,5) of M members -> (combined probs (N,5), expected grade (N,), grade (N,))."""
    m = probs.shape[0]
    w = np.asarray(rule.weights or [1.0] * m, dtype=np.float64)
    w = w / w.sum()
    mean_probs = np.tensordot(w, probs, axes=1)
    scores = expected(probs)  # (M,N)
    score = expected(mean_probs)
    if rule.rule == "weighted_average":
        grade = cut(score, rule.thresholds)
    elif rule.rule == "max_vote":
        member_cuts = rule.member_thresholds or [rule.thresholds] * m
        votes = np.stack([cut(scores[i], member_cuts[i]) for i in range(m)])  # (M,N)
        counts = np.stack([(np.where(votes == g, w[:, None], 0)).sum(0) for g in range(NUM_GRADES)], axis=1)
        best = counts.max(axis=1, keepdims=True)
        grade = np.where(counts >= best - 1e-12, np.arange(NUM_GRADES), -1).max(axis=1)
    elif rule.rule == "stacking":
        if rule.stacking_coef is None or rule.stacking_intercept is None:
            raise ValueError("stacking rule needs fitted coefficients")
        features = probs.transpose(1, 0, 2).reshape(probs.shape[1], -1)
        logits = features @ np.asarray(rule.stacking_coef).T + np.asarray(rule.stacking_intercept)
        logits -= logits.max(axis=1, keepdims=True)
        stacked = np.exp(logits)
        mean_probs = stacked / stacked.sum(axis=1, keepdims=True)
        score = expected(mean_probs)
        grade = mean_probs.argmax(axis=1)
    else:
        raise ValueError(f"unknown combination rule {rule.rule!r}; choose from {RULES}")
    return mean_probs, score, grade


def grade_from_members(rule: CombineRule, members: np.ndarray) -> int:
    """Grade by the rule from each member's distribution (M, 5), e.g. pooled over an eye's
    photographs: for one photograph, that photograph's grade."""
    return int(combine(rule, np.asarray(members, dtype=np.float64)[:, None, :])[2][0])


def grade_eye(
    rule: CombineRule,
    refs: Sequence[str],
    probabilities: Sequence[float],
    members: Mapping[str, Sequence[float]] | None,
) -> int:
    """An eye's grade from its gradable photographs pooled (:func:`grade_pooled`): ``probabilities``
    the mean of their combined distributions, ``members`` each member's mean distribution by member
    ref (ignored unless it names every one of ``refs``, the ensemble's members in order)."""
    pooled = np.asarray([members[r] for r in refs]) if members and all(r in members for r in refs) else None
    return grade_pooled(rule, np.asarray(probabilities), pooled)


def grade_pooled(rule: CombineRule, combined: np.ndarray, members: np.ndarray | None) -> int:
    """The eye rule: the grade of an eye's photographs pooled, from the mean of their combined
    distributions and, when known, each member's mean (M, 5). max_vote votes on the members' (its
    grade is not a function of the combined distribution); the other rules grade the combined one."""
    if rule.rule == "max_vote" and members is not None:
        return grade_from_members(rule, members)
    return grade_from_probabilities(rule, combined)


def eye_grade(rule: CombineRule, member_probs: np.ndarray) -> int:
    """:func:`grade_pooled` on one eye's photographs given as (M, K, 5) member probabilities."""
    probs = np.asarray(member_probs, dtype=np.float64)
    return grade_pooled(rule, combine(rule, probs)[0].mean(axis=0), probs.mean(axis=1))


def grade_from_probabilities(rule: CombineRule, probs: np.ndarray) -> int:
    """Grade of a pooled distribution (used per eye: mean of its images' probabilities)."""
    p = np.asarray(probs, dtype=np.float64)
    if rule.rule == "stacking":
        return int(p.argmax())
    return int(cut(np.array([expected(p)]), rule.thresholds)[0])
