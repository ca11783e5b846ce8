"""Test-time augmentation (flips) on the natural-colour VALIDATION patients only.

    python scripts/tta_check.py [MEMBER@VERSION ...]

Each member's probabilities are averaged over flipped copies of its input (none; horizontal;
horizontal + vertical; all four flips), then every set is judged as ``drscreen export ensemble``
judges a candidate: each member alone and the equal-weight average, out of fold (patient-grouped
folds of the 57 validation patients), with the paired patient-bootstrap interval of the
ensemble's difference from no flips. The test patients are not read. docs/experiments.md,
session 9. Default members: those of drscreen-ensemble@1.4.2.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ml.ensemble_fit import (  # noqa: E402
    fit_rules,
    fit_weighted_average,
    fitted_out_of_fold_grades,
    member_checks,
    paired_qwk_difference,
)
from ml.inference.combine import CombineRule  # noqa: E402
from ml.inference.ensemble import Ensemble, Member  # noqa: E402
from ml.release import load_checkpoint, member_dir  # noqa: E402
from ml.training.config import TrainConfig  # noqa: E402
from ml.training.data import load_rgb  # noqa: E402
from ml.training.train import natural_split  # noqa: E402

MEMBERS = ["mnv2-regression@1.3.0", "lite1-cbam-multitask@1.4.0", "lite2-se-multitask@1.3.0"]
FLIPS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "none": lambda x: x,
    "horizontal": lambda x: x[..., ::-1],
    "vertical": lambda x: x[..., ::-1, :],
    "both": lambda x: x[..., ::-1, ::-1],
}
SETS = {
    "none": ["none"],
    "h": ["none", "horizontal"],
    "h+v": ["none", "horizontal", "vertical"],
    "all 4": list(FLIPS),
}


def flipped_probs(ens: Ensemble, images: list[np.ndarray]) -> dict[str, np.ndarray]:
    """(M, N, 5) member probabilities for each flip of the model input."""
    out: dict[str, list[np.ndarray]] = {name: [] for name in FLIPS}
    for start in tqdm(range(0, len(images), 16), desc="scoring", unit="batch"):
        inputs = ens.pixel_inputs(images[start : start + 16])
        for name, flip in FLIPS.items():
            view = {ref: np.ascontiguousarray(flip(x)) for ref, x in inputs.items()}
            out[name].append(ens.member_probabilities(view))
    return {name: np.concatenate(parts, axis=1) for name, parts in out.items()}


def main(refs: list[str]) -> None:
    val = natural_split(TrainConfig(), ROOT)["val"]
    y = np.array([s.grade for s in val])
    groups = np.array([s.patient_id for s in val])
    members = [Member(ref, *load_checkpoint(member_dir(ref))) for ref in refs]
    probs = flipped_probs(Ensemble("tta", members, CombineRule(), {}), [load_rgb(s.path) for s in val])
    print(f"{len(val)} validation photographs, {len(set(groups))} patients (out-of-fold figures)")
    equal = fit_weighted_average([1.0] * len(refs))
    baseline: list[np.ndarray] = []
    for label, views in SETS.items():
        p = np.mean([probs[v] for v in views], axis=0)
        check = fit_rules(p, y, groups)[1]["equal_average"]
        grades = fitted_out_of_fold_grades(equal, p, y, groups, check.floor)
        baseline = baseline or grades
        diff, lo, hi = paired_qwk_difference(y, groups, grades, baseline)
        alone = " ".join(f"{c.qwk:.3f}" for c in member_checks(p, y, groups))
        print(
            f"  {label:6s} equal_average QWK {check.qwk:.3f}  sens {check.sensitivity:.3f}"
            f"  spec {check.specificity:.3f}  vs none {diff:+.3f} [{lo:+.3f}, {hi:+.3f}]"
            f" | members alone {alone}"
        )


if __name__ == "__main__":
    main(sys.argv[1:] or MEMBERS)
