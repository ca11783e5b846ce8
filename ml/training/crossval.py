"""Cross-validated natural-colour stage: more patients for fitting, honest out-of-fold figures.

    python -m ml.training.crossval --config configs/member-x.toml --stage1 runs/.../best [--folds 4]

The plain two-stage run fine-tunes on half of the natural-colour patients and fits thresholds and
the ensemble on a quarter (114 photographs: too few for stable cut points). Here the train and
validation patients are pooled (344 photographs) and split into K patient folds:

1. K natural-stage runs, each warm-started from the same equalised stage-1 checkpoint, holding
   one fold out for early stopping; each scores its held-out fold, so every pooled photograph
   gets an out-of-fold probability from a model that never saw its patient;
2. one final run on the whole pool for the median of the folds' best epoch counts (no
   validation, last epoch kept): the member that ships, trained on 50% more patients.

The final run's folder gets ``cv_oof.npz`` (paths, patients, grades, out-of-fold probabilities)
and ``cv.json``; ``drscreen export member`` copies both, and ``drscreen export ensemble`` fits its
rule on them when every member has them (ml/export.py). The test patients are untouched.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from ml.metrics import qwk, referable_metrics
from ml.release import load_checkpoint
from ml.training.config import load_config, parse_overrides
from ml.training.data import Sample
from ml.training.plots import plot_cv_curves
from ml.training.train import natural_split, resolve, train_from_config

log = logging.getLogger(__name__)
OOF_FILE = "cv_oof.npz"
CURVES_FILE = "cv_curves.png"


def history(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def best_epoch(run_dir: Path) -> int:
    """The natural-stage epoch with the best validation QWK (the one the run kept)."""
    rows = [r for r in history(run_dir) if r["stage"] == "stage2" and r["val_qwk"] is not None]
    return int(max(rows, key=lambda r: r["val_qwk"])["epoch"])


def fold_probabilities(
    run_dir: Path, cfg_overrides: dict[str, Any], config: Path
) -> tuple[list[Sample], np.ndarray]:
    """(held-out samples, their probabilities) of one fold's kept checkpoint."""
    from ml.export import member_probs
    from ml.inference.ensemble import Member

    cfg = load_config(config, cfg_overrides)
    held_out = natural_split(cfg, Path.cwd())["val"]
    model, pre, meta = load_checkpoint(run_dir / "best")
    return held_out, member_probs([Member(run_dir.name, model, pre, meta)], held_out)[0]


def cross_validate(config: Path, stage1: Path, folds: int, overrides: dict[str, Any] | None = None) -> Path:
    """Run the K fold runs and the final run; returns the final run's folder."""
    base_cfg = load_config(config, overrides)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    out = resolve(base_cfg.out_dir, Path.cwd()) / f"{stamp}-cv{folds}-{base_cfg.name}"
    common = {
        **(overrides or {}),
        "init_from": str(stage1),
        "stage1.epochs": 0,
        "data.natural_folds": folds,
        "out_dir": str(out),
    }
    samples: list[Sample] = []
    probs: list[np.ndarray] = []
    epochs: list[int] = []
    runs: list[Path] = []
    for k in range(folds):
        fold = {**common, "data.natural_fold": k}
        run = train_from_config(config, overrides=fold)
        held_out, p = fold_probabilities(run, fold, config)
        samples += held_out
        probs.append(p)
        epochs.append(best_epoch(run))
        runs.append(run)
        log.info("fold %d/%d: best epoch %d, %s", k + 1, folds, epochs[-1], run)
    final_epochs = max(1, round(statistics.median(epochs)))
    final = train_from_config(
        config, overrides={**common, "data.natural_fold": -1, "stage2.epochs": final_epochs}
    )
    oof = np.concatenate(probs)
    grades = np.array([s.grade for s in samples])
    summary = {
        "folds": folds,
        "stage1": str(stage1),
        "fold_best_epochs": epochs,
        "final_epochs": final_epochs,
        "n_out_of_fold": len(samples),
        "out_of_fold_argmax_qwk": qwk(grades, oof.argmax(axis=1)),
        "out_of_fold_referable_auc": referable_metrics(grades, [], oof[:, 2:].sum(axis=1))["referable_auc"],
    }
    np.savez(
        final / OOF_FILE,
        paths=np.array([s.path.name for s in samples]),
        patients=np.array([s.patient_id for s in samples]),
        grades=grades,
        probs=oof,
    )
    (final / "cv.json").write_text(json.dumps(summary, indent=2))
    plot_cv_curves([history(r) for r in runs], history(final), final / CURVES_FILE)
    log.info("cross-validated %s: %s", base_cfg.name, summary)
    return final


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--stage1", type=Path, required=True, help="a stage-1 member folder (RUN/best)")
    parser.add_argument("--folds", type=int, default=4)
    parser.add_argument("--set", action="append", default=[], help="key=value overrides (TOML values)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    overrides = parse_overrides(args.set)
    sys.stdout.write(f"{cross_validate(args.config, args.stage1, args.folds, overrides)}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
