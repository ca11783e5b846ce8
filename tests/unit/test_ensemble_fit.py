"""Ensemble fitting: patient-grouped folds, bagged cut points, out-of-fold rule choice."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from ml.ensemble_fit import (
    CrossValidated,
    bagged_thresholds,
    best_weights,
    choose_rule,
    coordinate_weights,
    fit_rules,
    fit_weighted_average,
    fitted_out_of_fold_grades,
    keep_sensitivity,
    member_checks,
    nested_out_of_fold,
    out_of_fold,
    paired_qwk_difference,
    patient_folds,
    quick_weighted_qwk,
)
from ml.inference.combine import combine
from ml.metrics import qwk


def one_hot_probs(scores: np.ndarray) -> np.ndarray:
    """Probabilities whose expected grade equals the (0..4) score: mass split between neighbours."""
    lo = np.floor(scores).astype(int).clip(0, 4)
    hi = (lo + 1).clip(0, 4)
    frac = scores - lo
    p = np.zeros((len(scores), 5))
    p[np.arange(len(scores)), lo] += 1 - frac
    p[np.arange(len(scores)), hi] += frac
    return p


def synthetic(n_patients: int = 60, noise: tuple[float, ...] = (0.3, 0.5, 0.8), seed: int = 0):
    rng = np.random.default_rng(seed)
    y = rng.choice(5, size=2 * n_patients, p=[0.6, 0.1, 0.18, 0.06, 0.06])
    groups = np.repeat([f"p{i}" for i in range(n_patients)], 2)
    probs = np.stack([one_hot_probs((y + rng.normal(0, s, len(y))).clip(0, 4)) for s in noise])
    return probs, y, groups


def test_patient_folds_keep_patients_together_and_cover_everything() -> None:
    groups = np.repeat([f"p{i}" for i in range(23)], 2)
    folds = patient_folds(groups, 5, seed=1)
    held = np.concatenate(folds)
    assert sorted(held.tolist()) == list(range(len(groups)))
    for fold in folds:
        inside = set(groups[fold])
        outside = set(groups[np.setdiff1d(np.arange(len(groups)), fold)])
        assert not inside & outside


def test_bagged_thresholds_find_the_natural_cuts_on_clean_scores() -> None:
    probs, y, groups = synthetic(noise=(0.05,))
    cuts = bagged_thresholds(probs[0] @ np.arange(5), y, groups)
    assert cuts == sorted(cuts)
    assert np.allclose(cuts, [0.5, 1.5, 2.5, 3.5], atol=0.45)


def test_keep_sensitivity_lowers_only_the_referable_cut() -> None:
    y = np.array([0, 0, 1, 2, 2, 2, 3])
    score = np.array([0.0, 0.2, 1.0, 1.2, 1.3, 2.2, 3.0])
    cuts = keep_sensitivity([0.5, 1.5, 2.5, 3.5], score, y, floor=0.85)
    assert cuts[0] == 0.5 and cuts[2:] == [2.5, 3.5]
    assert cuts[1] <= 1.2  # every referable photograph is now called referable


def test_out_of_fold_rewards_the_better_member() -> None:
    probs, y, groups = synthetic()
    good, bad = member_checks(probs, y, groups)[0], member_checks(probs, y, groups)[2]
    assert good.qwk > bad.qwk
    assert 0.0 <= good.sensitivity <= 1.0


def test_fit_rules_fits_every_rule_and_they_grade() -> None:
    probs, y, groups = synthetic()
    rules, checks = fit_rules(probs, y, groups)
    assert set(rules) == set(checks) == {"weighted_average", "equal_average", "max_vote", "stacking"}
    assert rules["equal_average"].rule == "weighted_average" and rules["equal_average"].weights == [1.0] * 3
    for rule in rules.values():
        grades = combine(rule, probs)[2]
        assert grades.min() >= 0 and grades.max() <= 4
    # the weighting cannot favour the noisiest member over the cleanest
    w = rules["weighted_average"].weights
    assert w[0] >= w[2]


def test_choose_rule_prefers_rules_that_meet_the_screening_targets() -> None:
    checks = {
        "a": CrossValidated(qwk=0.70, sensitivity=0.70, specificity=0.90),
        "b": CrossValidated(qwk=0.65, sensitivity=0.85, specificity=0.75),
    }
    assert choose_rule(checks) == "b"
    checks["b"] = CrossValidated(qwk=0.65, sensitivity=0.60, specificity=0.75)
    assert choose_rule(checks) == "a"  # none eligible, none sensitive enough: best QWK
    # none meets both targets: the one that keeps sensitivity wins over a better QWK
    checks["c"] = CrossValidated(qwk=0.45, sensitivity=0.82, specificity=0.60)
    assert choose_rule(checks) == "c"


@pytest.mark.parametrize("noise", [(0.05,), (1.5,)])
def test_out_of_fold_of_a_single_member_tracks_its_quality(noise: tuple[float, ...]) -> None:
    probs, y, groups = synthetic(noise=noise)
    result = out_of_fold(fit_weighted_average([1.0]), probs, y, groups, floor=0.85)
    assert (result.qwk > 0.9) if noise[0] < 0.1 else (result.qwk < 0.8)


def test_nested_out_of_fold_of_one_member_is_the_plain_one() -> None:
    """With one member there is no weight to choose, so nesting must change nothing."""
    probs, y, groups = synthetic(noise=(0.5,))
    plain = out_of_fold(fit_weighted_average([1.0]), probs, y, groups, floor=0.8)
    assert nested_out_of_fold(probs, y, groups, floor=0.8) == plain


def test_nested_out_of_fold_finds_the_informative_member_inside_each_fold() -> None:
    probs, y, groups = synthetic(noise=(0.3,))
    rng = np.random.default_rng(5)
    noise_member = one_hot_probs(rng.uniform(0, 4, len(y)))
    nested = nested_out_of_fold(np.stack([probs[0], noise_member]), y, groups, floor=0.0)
    alone = out_of_fold(fit_weighted_average([1.0]), probs, y, groups, floor=0.0)
    assert nested.qwk > 0.8 and abs(nested.qwk - alone.qwk) < 0.1


def test_plain_weight_check_flatters_where_nested_does_not() -> None:
    """One weak member and two of pure noise: picking weights and judging them on the same folds
    finds noise that happens to help there; choosing them inside each fold cannot."""
    probs, y, groups = synthetic(n_patients=40, noise=(1.0,), seed=3)
    rng = np.random.default_rng(103)
    noise = [one_hot_probs(rng.uniform(0, 4, len(y))) for _ in range(2)]
    members = np.stack([probs[0], *noise])
    plain = fit_rules(members, y, groups, nested=False)[1]["weighted_average"]
    nested = fit_rules(members, y, groups, nested=True)[1]["weighted_average"]
    assert plain.qwk > nested.qwk + 0.02


def test_paired_difference_separates_a_better_member_and_not_a_copy() -> None:
    probs, y, groups = synthetic(n_patients=80, noise=(0.2, 1.2))
    single = fit_weighted_average([1.0])
    good, bad = (fitted_out_of_fold_grades(single, probs[i : i + 1], y, groups, 0.0) for i in (0, 1))
    diff, lo, hi = paired_qwk_difference(y, groups, good, bad, n_resamples=300)
    assert lo <= diff <= hi
    assert lo > 0  # the clearly better member is better on every resample
    assert np.isclose(
        diff,
        out_of_fold(single, probs[:1], y, groups, 0.0).qwk
        - out_of_fold(single, probs[1:], y, groups, 0.0).qwk,
    )
    same = paired_qwk_difference(y, groups, good, good, n_resamples=50)
    assert same == (0.0, 0.0, 0.0)


def test_more_shuffles_judge_on_more_fold_draws_and_extend_the_first_ones() -> None:
    probs, y, groups = synthetic()
    single = fit_weighted_average([1.0])
    four = fitted_out_of_fold_grades(single, probs[:1], y, groups, 0.0)
    seven = fitted_out_of_fold_grades(single, probs[:1], y, groups, 0.0, repeats=7)
    assert len(four) == 4 and len(seven) == 7
    assert all(np.array_equal(a, b) for a, b in zip(four, seven[:4], strict=False))
    one = out_of_fold(single, probs[:1], y, groups, 0.0, repeats=1)
    assert np.isclose(one.qwk, qwk(y, four[0]))


def five_members_one_informative(seed: int = 7) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    probs, y, groups = synthetic(noise=(0.3,))
    rng = np.random.default_rng(seed)
    noise = [one_hot_probs(rng.uniform(0, 4, len(y))) for _ in range(4)]
    return np.stack([*noise[:2], probs[0], *noise[2:]]), y, groups


def test_coordinate_weights_find_the_informative_member_among_five() -> None:
    members, y, groups = five_members_one_informative()
    weights = coordinate_weights(members, y, groups)
    assert weights[2] == 1.0 and max(weights[:2] + weights[3:]) <= 0.5
    equal = quick_weighted_qwk(tuple([1.0] * 5), members, y, groups)
    assert quick_weighted_qwk(tuple(weights), members, y, groups) > equal + 0.05


def test_best_weights_searches_five_members_one_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """The full grid would score 3,125 vectors (hours inside 20 shuffles of nested folds)."""
    import ml.ensemble_fit as fit

    calls = []
    real = fit.quick_weighted_qwk

    def counting(*args: object) -> float:
        calls.append(args[0])
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(fit, "quick_weighted_qwk", counting)
    members, y, groups = five_members_one_informative()
    assert best_weights(members, y, groups)[2] == 1.0
    assert 0 < len(set(calls)) <= 4 * 5 * 5
    calls.clear()
    best_weights(members[:3], y, groups)  # three members: still the whole grid
    assert len(set(calls)) > 4 * 5 * 5 // 2


def test_model_card_says_when_no_rule_met_the_screening_targets() -> None:
    """The audit: a card claimed its rule was chosen among those meeting 0.80/0.70 when none had."""
    import copy
    import json
    from pathlib import Path

    from ml.export import model_card

    shipped = json.loads(
        (
            Path(__file__).resolve().parents[2] / "models/ensembles/drscreen-ensemble/1.6.0/manifest.json"
        ).read_text()
    )
    assert "meet 0.80/0.70" in model_card(shipped) and "no rule met" not in model_card(shipped)
    missed = copy.deepcopy(shipped)
    missed["card"]["metrics"][f"rule:{missed['card']['chosen_rule']}"]["validation_out_of_fold"][
        "specificity"
    ] = 0.15
    card = model_card(missed)
    assert "no rule met the 0.80/0.70 screening targets" in card and "meet 0.80/0.70" not in card


def test_model_card_of_a_pinned_rule_says_it_was_pinned_and_which_rules_met_the_targets() -> None:
    """`--rule NAME` pins the rule: when it misses 0.80/0.70 while another rule meets them, the
    card said "no rule met the screening targets" (false) and that it was chosen by out-of-fold QWK."""
    import copy
    import json
    from pathlib import Path

    from ml.export import model_card

    shipped = json.loads(
        (
            Path(__file__).resolve().parents[2] / "models/ensembles/drscreen-ensemble/1.6.0/manifest.json"
        ).read_text()
    )
    chosen = shipped["card"]["chosen_rule"]
    assert chosen == "equal_average"
    pinned = copy.deepcopy(shipped)
    pinned["card"]["rule_pinned"] = True
    metrics = pinned["card"]["metrics"]
    metrics[f"rule:{chosen}"]["validation_out_of_fold"]["specificity"] = 0.15
    metrics["rule:weighted_average"]["validation_out_of_fold"]["specificity"] = 0.5
    card = model_card(pinned)
    assert "pinned by `--rule equal_average` at export, not chosen by out-of-fold QWK" in card
    assert "miss the 0.80/0.70 screening targets**, which `max_vote` met;" in card
    assert "no rule met" not in card and "chosen by out-of-fold QWK (" not in card

    # pinned, and no rule meets them: now that is true
    for row in metrics.values():
        row["validation_out_of_fold"]["specificity"] = 0.15
    card = model_card(pinned)
    assert (
        "not chosen by out-of-fold QWK: **no rule met the 0.80/0.70 screening targets out of fold**" in card
    )

    # pinned and meeting them
    card = model_card(pinned | {"card": shipped["card"] | {"rule_pinned": True}})
    assert (
        "pinned by `--rule equal_average`" in card
        and "shuffles) meet the 0.80/0.70 screening targets;" in card
    )

    # not pinned (recorded False, or a manifest from before it was recorded): the wording as it was
    assert model_card(shipped | {"card": shipped["card"] | {"rule_pinned": False}}) == model_card(shipped)
    assert "chosen by out-of-fold QWK (" in model_card(shipped) and "pinned" not in model_card(shipped)


def _shipped_manifest() -> dict[str, Any]:
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "models/ensembles/drscreen-ensemble/1.6.0/manifest.json"
    manifest: dict[str, Any] = json.loads(path.read_text())
    return manifest


def test_model_card_gives_the_patient_level_figures_and_says_when_they_miss_the_targets() -> None:
    """The audit: the card's sensitivity/specificity were per photograph and said so nowhere, while
    the service refers per patient, where 1.6.0's test specificity is 0.659 (below 0.70)."""
    import copy

    from ml.export import model_card

    manifest = copy.deepcopy(_shipped_manifest())
    figures = {
        "n_patients": 58,
        "referable_sensitivity": 0.857,
        "referable_specificity": 0.659,
        "referable_auc": 0.87,
    }
    manifest["card"]["test"]["chosen_rule_patient_level"] = figures
    card = model_card(manifest)
    assert "Every figure in this table is per photograph" in card
    assert "on the 58 test patients: referable sensitivity 0.857, specificity 0.659" in card
    assert "**below the 0.80/0.70 screening targets at patient level**" in card
    figures["referable_specificity"] = 0.75
    assert "meet the screening targets at patient level too" in model_card(manifest)
    del manifest["card"]["test"]["chosen_rule_patient_level"]
    assert "Per patient" not in model_card(manifest)  # an older manifest: nothing invented


def test_model_card_says_when_grade_one_is_all_but_never_given() -> None:
    import copy

    from ml.export import model_card

    manifest = _shipped_manifest()
    assert manifest["combination"]["thresholds"][:2] == [0.4675, 0.4775]
    assert "- Grade 1 (mild) is all but never given: the 0|1 and 1|2 cut points are 0.468 and 0.477" in (
        model_card(manifest)
    )
    apart = copy.deepcopy(manifest)
    apart["combination"]["thresholds"] = [0.5, 1.5, 2.5, 3.5]
    assert "Grade 1 (mild)" not in model_card(apart)  # the cuts apart and grade 1 given (validation)
    assert "chosen rule's out-of-fold figure is optimistic" in model_card(apart)


def test_patient_level_figures_pool_an_eyes_photographs_and_take_the_worse_eye() -> None:
    """Since session 29 an eye is referred also when one photograph alone is referable (it was
    missed when pooled with a clean one: core.aggregation)."""
    from ml.inference.combine import CombineRule
    from ml.metrics import patient_referable_metrics

    rule = CombineRule("weighted_average", [1.0], [0.5, 1.5, 2.5, 3.5])
    g0, g2 = [1.0, 0, 0, 0, 0], [0, 0, 1.0, 0, 0]
    half = [0.5, 0, 0.5, 0, 0]  # expected grade 1.0: grade 1 alone, not referable
    # A: left pooled from g2 + g0 (mean expected 1.0 -> grade 1, but g2 alone is referable), right
    # g0; truth 2 on the left
    # B: left g0, right g2 -> referable; truth 0 both (a false referral)
    # C: both g0, truth 0
    probs = np.array([[g2, g0, g0, g0, g2, g0, g0]])
    ids = ["A", "A", "A", "B", "B", "C", "C"]
    eyes = ["left", "left", "right", "left", "right", "left", "right"]
    y = [2, 0, 0, 0, 0, 0, 0]
    out = patient_referable_metrics(rule, probs, ids, eyes, y)
    assert out["n_patients"] == 3
    assert out["referable_sensitivity"] == 1.0  # A's left pooled to grade 1, its g2 photograph refers it
    assert out["referable_specificity"] == 0.5  # B referred, C not
    pooled = patient_referable_metrics(rule, np.array([[half]]), ["A"], ["left"], [2])
    assert pooled["referable_sensitivity"] == 0.0
    # the quality gate: A's g0 left photograph rejected leaves g2 alone (caught); C's right eye
    # with no gradable photograph is referred, as the service refers an ungradable eye
    gate = [True, False, True, True, True, True, False]
    out = patient_referable_metrics(rule, probs, ids, eyes, y, gate)
    assert out["referable_sensitivity"] == 1.0 and out["referable_specificity"] == 0.0
