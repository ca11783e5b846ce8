"""Training-seed draws of one member, alone and averaged, on the natural-colour VALIDATION patients.

    python scripts/seed_bag_check.py --draws A@V B@V C@V [--others X@V Y@V ...]

Each draw (a member exported from runs that differ only in their seed) is judged alone out of
fold; so is the "bag", the average of the draws' probabilities taken as one member; and, with
``--others``, the equal-weight average of each draw (and of the bag) with the other members, as
``drscreen export ensemble`` judges a candidate (RELEASE_REPEATS shuffles of the folds, the
sensitivity floor picked out of fold). The test patients are not read. Members are looked up in
models/ unless DRSCREEN_MODELS_DIR names another folder. docs/experiments.md, session 9.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from validation_check import cached_probs

from ml.ensemble_fit import RELEASE_REPEATS, CrossValidated, best_floor, fit_weighted_average, member_checks
from ml.training.config import TrainConfig
from ml.training.train import natural_split


def describe(label: str, check: CrossValidated) -> str:
    return (
        f"  {label:44s} QWK {check.qwk:.3f}  sens {check.sensitivity:.3f}  spec {check.specificity:.3f}"
        f"  floor {check.floor}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", nargs="+", required=True)
    parser.add_argument("--others", nargs="*", default=[])
    args = parser.parse_args()
    val = natural_split(TrainConfig(), Path.cwd())["val"]
    y = np.array([s.grade for s in val])
    groups = np.array([s.patient_id for s in val])
    draws = np.stack([cached_probs(ref, val) for ref in args.draws])
    bag = draws.mean(axis=0, keepdims=True)
    others = np.stack([cached_probs(ref, val) for ref in args.others]) if args.others else None
    print(f"{len(val)} validation photographs, {len(set(groups))} patients, {RELEASE_REPEATS} fold shuffles")
    alone = member_checks(np.concatenate([draws, bag]), y, groups, RELEASE_REPEATS)
    for label, check in zip([*args.draws, "bag of the draws"], alone, strict=True):
        print(describe(f"alone: {label}", check))
    q = np.array([c.qwk for c in alone[:-1]])
    print(f"  draws alone: mean {q.mean():.3f}, range {q.min():.3f}-{q.max():.3f}")
    if others is None:
        return
    for label, member in [*zip(args.draws, draws, strict=True), ("bag of the draws", bag[0])]:
        probs = np.concatenate([member[None], others])
        check = best_floor(fit_weighted_average([1.0] * len(probs)), probs, y, groups, RELEASE_REPEATS)
        print(describe(f"equal average with {label}", check))


if __name__ == "__main__":
    main()
