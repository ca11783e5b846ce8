"""Out-of-fold validation figures of candidate members and of ensembles built from them.

Looks only at the natural-colour VALIDATION patients (never the test part), so it can be used to
pick members before a release without tuning to the test patients:

    .venv/bin/python scripts/validation_check.py lite1-cbam-multitask@1.0.0 lite1-cbam-multitask@1.1.0 ...

Prints each member alone and (unless --members-only) every combination rule over each subset of
three or more members. Members are looked up in models/ unless DRSCREEN_MODELS_DIR names another
folder (candidates exported with `drscreen export member ... --models-dir DIR`).
Member probabilities are cached in var/validation-probs/ (keyed by the weights' sha256 and the
pixel pipeline's revision).
The weighted average is judged nested (its weights chosen inside each fold, as `drscreen export
ensemble` judges it since session 6), everything on RELEASE_REPEATS shuffles of the folds (as the
export since session 9). With --plain its figures are also given as releases up to
1.4.0 were judged (weights picked and judged on the same folds) and, at that check's floor, nested:
the pair that shows how much the plain check flatters (a minute or two more per subset).
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import numpy as np

from ml.ensemble_fit import (
    RELEASE_REPEATS,
    best_floor,
    fit_rules,
    fit_weighted_average,
    member_checks,
    nested_out_of_fold,
)
from ml.export import member_probs
from ml.inference.ensemble import Member
from ml.preprocess import PIXELS_REVISION
from ml.release import load_checkpoint, member_dir, sha256_file
from ml.training.config import TrainConfig
from ml.training.train import natural_split

CACHE = Path("var/validation-probs")


def cached_probs(ref: str, samples: list) -> np.ndarray:
    folder = member_dir(ref)  # models/, or DRSCREEN_MODELS_DIR (ml.release.default_models_dir)
    # keyed by the weights and the pixel pipeline's revision (ml.preprocess.PIXELS_REVISION)
    path = CACHE / f"{sha256_file(folder / 'model.safetensors')[:16]}-r{PIXELS_REVISION}.npy"
    if path.exists():
        return np.load(path)
    model, pre, config = load_checkpoint(folder)
    probs = member_probs([Member(ref, model, pre, config)], samples)[0]
    CACHE.mkdir(parents=True, exist_ok=True)
    np.save(path, probs)
    return probs


def main(refs: list[str], members_only: bool = False, plain: bool = False) -> None:
    val = natural_split(TrainConfig(), Path.cwd())["val"]
    y = np.array([s.grade for s in val])
    groups = np.array([s.patient_id for s in val])
    probs = np.stack([cached_probs(r, val) for r in refs])
    print(f"{len(val)} validation photographs, {len(set(groups))} patients (out-of-fold figures)")
    for ref, check in zip(refs, member_checks(probs, y, groups, RELEASE_REPEATS), strict=True):
        print(f"  {ref:40s} QWK {check.qwk:.3f}  sens {check.sensitivity:.3f}  spec {check.specificity:.3f}")
    for size in range(3, 0 if members_only else len(refs) + 1):
        for subset in itertools.combinations(range(len(refs)), size):
            rules, checks = fit_rules(probs[list(subset)], y, groups, repeats=RELEASE_REPEATS)
            names = " + ".join(refs[i] for i in subset)
            for rule, check in checks.items():
                extra = f" weights {rules[rule].weights}" if rule == "weighted_average" else ""
                print(
                    f"  [{names}] {rule:16s} QWK {check.qwk:.3f}  sens {check.sensitivity:.3f}"
                    f"  spec {check.specificity:.3f}{extra}"
                )
            if plain:
                picked = fit_weighted_average(rules["weighted_average"].weights)
                flattering = best_floor(picked, probs[list(subset)], y, groups, RELEASE_REPEATS)
                same_floor = nested_out_of_fold(
                    probs[list(subset)], y, groups, flattering.floor, RELEASE_REPEATS
                )
                for label, check in (("weighted (plain)", flattering), ("  nested, same floor", same_floor)):
                    print(
                        f"  [{names}] {label:16s} QWK {check.qwk:.3f}  sens {check.sensitivity:.3f}"
                        f"  spec {check.specificity:.3f}  floor {check.floor}"
                    )


if __name__ == "__main__":
    args = sys.argv[1:]
    if not args or "--help" in args or "-h" in args:  # the review: --help was taken for a model
        print(__doc__)
        sys.exit(0 if args else 2)
    flags = {"--members-only", "--plain"}
    main([a for a in args if a not in flags], members_only="--members-only" in args, plain="--plain" in args)
