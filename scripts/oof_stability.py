"""How much does the out-of-fold QWK move with the fitting procedure's own randomness?

    python scripts/oof_stability.py [NAME@VERSION] [--draws 10]
    python scripts/oof_stability.py [NAME@VERSION] --variants [--draws 20]
    python scripts/oof_stability.py [NAME@VERSION] --floors [--draws 20]

The out-of-fold (OOF) figures that rank candidates (``ml.ensemble_fit``) depend on two seeds
fixed in the code: how the 57 validation patients are shuffled into folds and which bootstrap
resamples bag the cut points. This re-runs the equal-weight average's OOF check of an
ensemble's members with ``--draws`` other seed pairs, on the members' validation probabilities
from the current pixels and from the pixels before revision 2 (cv2.GaussianBlur in Ben
Graham's filter, which changes no shipped grade on validation), and prints each draw, the mean
and the spread. With ``--variants`` it compares ways of fitting the cut points instead, on the
current pixels and the same draws (paired): A as ``ml.ensemble_fit`` does now (25 bootstrap
resamples), B with 200, C with no QWK search (the default cuts, only the 1|2 cut lowered to the
sensitivity floor). With ``--floors`` it holds each sensitivity floor fixed instead of letting the
check pick one per draw: the price in QWK of the screening operating point. VALIDATION patients
only. docs/experiments.md, session 9.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from unittest import mock

import cv2
import numpy as np
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ml import ensemble_fit, preprocess  # noqa: E402
from ml.export import member_probs  # noqa: E402
from ml.inference import resolve_ref  # noqa: E402
from ml.inference.ensemble import Member  # noqa: E402
from ml.metrics import DEFAULT_THRESHOLDS  # noqa: E402
from ml.release import ensemble_dir, load_checkpoint, member_dir  # noqa: E402
from ml.training.config import TrainConfig  # noqa: E402
from ml.training.train import natural_split  # noqa: E402


def default_cuts(score: np.ndarray, y: np.ndarray, groups: np.ndarray, seed: int = 0) -> list[float]:
    return list(DEFAULT_THRESHOLDS)


VARIANTS = {"A: 25 resamples (now)": 25, "B: 200 resamples": 200, "C: default cuts": 0}


def oof_draw(
    probs: np.ndarray,
    y: np.ndarray,
    groups: np.ndarray,
    draw: int,
    resamples: int = 25,
    floor: float | None = None,
) -> ensemble_fit.CrossValidated:
    """The equal average's OOF check with the fold and bootstrap seeds moved by ``draw``;
    ``resamples`` bootstrap resamples bag the cut points (0: no fit, the default cuts); the
    sensitivity floor is picked as the exports pick it unless ``floor`` is given."""
    folds = ensemble_fit.patient_folds
    bagged = ensemble_fit.bagged_thresholds if resamples else default_cuts
    offset = 1000 * draw

    def moved_folds(g: np.ndarray, k: int, seed: int) -> list[np.ndarray]:
        return folds(g, k, seed + offset)

    def moved_bagging(score: np.ndarray, yy: np.ndarray, gg: np.ndarray, seed: int = 0) -> list[float]:
        return bagged(score, yy, gg, seed + offset)

    with (
        mock.patch.object(ensemble_fit, "patient_folds", moved_folds),
        mock.patch.object(ensemble_fit, "bagged_thresholds", moved_bagging),
        mock.patch.object(ensemble_fit, "BOOTSTRAPS", resamples),
    ):
        equal = ensemble_fit.fit_weighted_average([1.0] * len(probs))
        if floor is not None:
            return ensemble_fit.out_of_fold(equal, probs, y, groups, floor)
        return ensemble_fit.best_floor(equal, probs, y, groups)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ref", nargs="?", default=None)
    parser.add_argument("--draws", type=int, default=10)
    parser.add_argument("--variants", action="store_true", help="compare ways of fitting the cut points")
    parser.add_argument("--floors", action="store_true", help="hold each sensitivity floor fixed")
    args = parser.parse_args()
    ref = resolve_ref(args.ref)
    manifest = json.loads((ensemble_dir(ref) / "manifest.json").read_text())
    refs = [m["ref"] for m in manifest["members"]]
    members = [Member(r, *load_checkpoint(member_dir(r))) for r in refs]
    val = natural_split(TrainConfig(), ROOT)["val"]
    y = np.array([s.grade for s in val])
    groups = np.array([s.patient_id for s in val])
    current = member_probs(members, val)
    if args.variants:
        compare_variants(current, y, groups, args.draws)
        return
    if args.floors:
        compare_floors(current, y, groups, args.draws)
        return
    with mock.patch.object(preprocess, "ben_blur", lambda img, sigma: cv2.GaussianBlur(img, (0, 0), sigma)):
        before = member_probs(members, val)
    print(f"{ref} ({' + '.join(refs)}): {len(val)} validation photographs, {len(set(groups))} patients")
    largest = np.abs(current - before).max()
    print(f"largest member probability difference between the two pixel versions: {largest:.4f}")
    for label, probs in (("pixels before revision 2", before), ("current pixels", current)):
        draws = [oof_draw(probs, y, groups, d) for d in range(args.draws)]
        q = np.array([c.qwk for c in draws])
        print(f"{label}: equal_average OOF QWK by draw (draw 0 = the seeds the exports use)")
        print("  " + " ".join(f"{v:.3f}" for v in q))
        print(f"  mean {q.mean():.3f}  sd {q.std(ddof=1):.3f}  min {q.min():.3f}  max {q.max():.3f}")
        sens = np.array([c.sensitivity for c in draws])
        spec = np.array([c.specificity for c in draws])
        print(f"  sensitivity mean {sens.mean():.3f}, specificity mean {spec.mean():.3f}")


def compare_variants(probs: np.ndarray, y: np.ndarray, groups: np.ndarray, n_draws: int) -> None:
    results = {}
    for label, resamples in VARIANTS.items():
        draws = [
            oof_draw(probs, y, groups, d, resamples) for d in tqdm(range(n_draws), desc=label, unit="draw")
        ]
        results[label] = draws
    base = np.array([c.qwk for c in results["A: 25 resamples (now)"]])
    print(f"equal_average out of fold over {n_draws} draws (the same draws for every variant)")
    for label, draws in results.items():
        q = np.array([c.qwk for c in draws])
        sens = np.mean([c.sensitivity for c in draws])
        spec = np.mean([c.specificity for c in draws])
        ahead = int((q > base).sum())
        print(
            f"  {label:24s} QWK mean {q.mean():.3f} sd {q.std(ddof=1):.3f} range {q.min():.3f}-{q.max():.3f}"
            f"  sens {sens:.3f} spec {spec:.3f}  vs A {q.mean() - base.mean():+.3f},"
            f" ahead in {ahead}/{n_draws}"
        )
        print("    " + " ".join(f"{v:.3f}" for v in q))


def compare_floors(probs: np.ndarray, y: np.ndarray, groups: np.ndarray, n_draws: int) -> None:
    print(f"equal_average out of fold over {n_draws} draws, by sensitivity floor (None = picked per draw)")
    for floor in (*ensemble_fit.SENSITIVITY_FLOORS, None):
        draws = [oof_draw(probs, y, groups, d, floor=floor) for d in range(n_draws)]
        q = np.array([c.qwk for c in draws])
        sens = np.array([c.sensitivity for c in draws])
        spec = np.array([c.specificity for c in draws])
        both = int(sum(c.meets_targets for c in draws))
        print(
            f"  floor {floor!s:5s} QWK mean {q.mean():.3f} sd {q.std(ddof=1):.3f}  sens {sens.mean():.3f}"
            f" spec {spec.mean():.3f}  both screening targets met in {both}/{n_draws} draws"
        )


if __name__ == "__main__":
    main()
