"""How often a lone photograph's grade (the ensemble's rule) differs from the grade of its eye
(the contract's rule: the combined probabilities over the eye's photographs, graded by the pooled
cut points) on the natural-colour VALIDATION photographs. With the weighted average the two agree
by construction; with max vote they need not (docs/model.md).

    .venv/bin/python scripts/pooled_vs_image_grade.py [NAME@VERSION]   # default: the newest ensemble
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from validation_check import cached_probs

from ml.inference.combine import CombineRule, combine, grade_from_probabilities
from ml.metrics import qwk, referable_metrics
from ml.release import newest_ensemble, read_manifest
from ml.training.config import TrainConfig
from ml.training.train import natural_split


def main(ref: str | None) -> None:
    m = read_manifest(ref or newest_ensemble())
    rule = CombineRule(**m["combination"])
    val = natural_split(TrainConfig(), Path.cwd())["val"]
    probs = np.stack([cached_probs(r["ref"], val) for r in m["members"]])
    mean_probs, _, image = combine(rule, probs)
    eye = np.array([grade_from_probabilities(rule, p) for p in mean_probs])
    y = np.array([s.grade for s in val])
    print(
        f"{m['name']}@{m['version']} ({rule.rule}), {len(y)} validation photographs, each alone in its eye:"
    )
    differs = int(((image >= 2) != (eye >= 2)).sum())
    print(f"  grade differs {int((image != eye).sum())}, referable differs {differs}")
    print(
        f"  (photo referable, eye not: {int(((image >= 2) & (eye < 2)).sum())}; eye referable, photo not: "
        f"{int(((eye >= 2) & (image < 2)).sum())})"
    )
    for name, g in (("photo rule", image), ("eye rule", eye)):
        r = referable_metrics(y, g, None)
        print(
            f"  {name}: in-sample QWK {qwk(y, g):.3f}, sens {r['referable_sensitivity']:.3f}, "
            f"spec {r['referable_specificity']:.3f}"
        )


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
