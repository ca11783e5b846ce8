"""How much does the out-of-fold QWK move with the fitting procedure's own randomness?

    python scripts/oof_stability.py [NAME@VERSION] [--draws 10]

The out-of-fold (OOF) figures that rank candidates (``ml.ensemble_fit``) depend on two seeds
fixed in the code: how the 57 validation patients are shuffled into folds and which bootstrap
resamples bag the cut points. This re-runs the equal-weight average's OOF check of an
ensemble's members with ``--draws`` other seed pairs, on the members' validation probabilities
from the current pixels and from the pixels before revision 2 (cv2.GaussianBlur in Ben
Graham's filter, which changes no shipped grade on validation), and prints each draw, the mean
and the spread. VALIDATION patients only. docs/experiments.md, session 9.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from unittest import mock

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ml import ensemble_fit, preprocess  # noqa: E402
from ml.export import member_probs  # noqa: E402
from ml.inference import resolve_ref  # noqa: E402
from ml.inference.ensemble import Member  # noqa: E402
from ml.release import ensemble_dir, load_checkpoint, member_dir  # noqa: E402
from ml.training.config import TrainConfig  # noqa: E402
from ml.training.train import natural_split  # noqa: E402


def oof_draw(probs: np.ndarray, y: np.ndarray, groups: np.ndarray, draw: int) -> ensemble_fit.CrossValidated:
    """The equal average's OOF check with the fold and bootstrap seeds moved by ``draw``."""
    folds, bagged = ensemble_fit.patient_folds, ensemble_fit.bagged_thresholds
    offset = 1000 * draw

    def moved_folds(g: np.ndarray, k: int, seed: int) -> list[np.ndarray]:
        return folds(g, k, seed + offset)

    def moved_bagging(score: np.ndarray, yy: np.ndarray, gg: np.ndarray, seed: int = 0) -> list[float]:
        return bagged(score, yy, gg, seed + offset)

    with (
        mock.patch.object(ensemble_fit, "patient_folds", moved_folds),
        mock.patch.object(ensemble_fit, "bagged_thresholds", moved_bagging),
    ):
        return ensemble_fit.best_floor(ensemble_fit.fit_weighted_average([1.0] * len(probs)), probs, y, groups)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ref", nargs="?", default=None)
    parser.add_argument("--draws", type=int, default=10)
    args = parser.parse_args()
    ref = resolve_ref(args.ref)
    manifest = json.loads((ensemble_dir(ref) / "manifest.json").read_text())
    refs = [m["ref"] for m in manifest["members"]]
    members = [Member(r, *load_checkpoint(member_dir(r))) for r in refs]
    val = natural_split(TrainConfig(), ROOT)["val"]
    y = np.array([s.grade for s in val])
    groups = np.array([s.patient_id for s in val])
    current = member_probs(members, val)
    with mock.patch.object(preprocess, "ben_blur", lambda img, sigma: cv2.GaussianBlur(img, (0, 0), sigma)):
        before = member_probs(members, val)
    print(f"{ref} ({' + '.join(refs)}): {len(val)} validation photographs, {len(set(groups))} patients")
    print(f"largest member probability difference between the two pixel versions: {np.abs(current - before).max():.4f}")
    for label, probs in (("pixels before revision 2", before), ("current pixels", current)):
        draws = [oof_draw(probs, y, groups, d) for d in range(args.draws)]
        q = np.array([c.qwk for c in draws])
        print(f"{label}: equal_average OOF QWK by draw (draw 0 = the seeds the exports use)")
        print("  " + " ".join(f"{v:.3f}" for v in q))
        print(f"  mean {q.mean():.3f}  sd {q.std(ddof=1):.3f}  min {q.min():.3f}  max {q.max():.3f}")
        sens = np.array([c.sensitivity for c in draws])
        spec = np.array([c.specificity for c in draws])
        print(f"  sensitivity mean {sens.mean():.3f}, specificity mean {spec.mean():.3f}")


if __name__ == "__main__":
    main()
