"""Write a labels CSV of the natural-colour TEST patients (never trained or tuned on), for
`drscreen evaluate`:

    python scripts/natural_test_labels.py var/natural-test.csv
    drscreen evaluate --labels var/natural-test.csv --json --report var/eval
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

from ml.training.config import TrainConfig
from ml.training.train import natural_split


def main(out: Path) -> None:
    test = natural_split(TrainConfig(), Path.cwd())["test"]
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "grade", "patient_id", "eye"])
        for s in test:
            writer.writerow([str(s.path.resolve()), s.grade, s.patient_id, s.eye])


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "var/natural-test.csv"))
