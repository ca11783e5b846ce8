"""Write a labels CSV of the natural-colour TEST patients (never trained or tuned on), for
`drscreen evaluate`:

    python scripts/natural_test_labels.py var/natural-test.csv [--all]
    drscreen evaluate --labels var/natural-test.csv --json --report var/eval

By default only the 48 test patients who are not also in the equalised folder: releases up
to 1.2.0 trained stage 1 on the equalised copies of the other 10 (the same photographs after
colour processing; ml.training.train.equalized_without keeps them out since). `--all` writes
all 58, as the figures of sessions 1-3 did.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from ml.training.config import TrainConfig
from ml.training.data import read_labels
from ml.training.train import natural_split, resolve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, nargs="?", default=Path("var/natural-test.csv"))
    parser.add_argument("--all", action="store_true", help="include the test patients in both folders")
    args = parser.parse_args()
    cfg = TrainConfig()
    test = natural_split(cfg, Path.cwd())["test"]
    if not args.all:
        equalized = {s.patient_id for s in read_labels(resolve(cfg.data.equalized_dir, Path.cwd()))}
        test = [s for s in test if s.patient_id not in equalized]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "grade", "patient_id", "eye"])
        for s in test:
            writer.writerow([str(s.path.resolve()), s.grade, s.patient_id, s.eye])
    print(f"{len(test)} photographs of {len({s.patient_id for s in test})} patients -> {args.out}")


if __name__ == "__main__":
    main()
