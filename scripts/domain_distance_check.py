"""Would a "photograph unlike the validated ones" flag work from the members' own features?

    python scripts/domain_distance_check.py [--ref drscreen-ensemble@1.6.0] [--components 16]

For each member: the pooled last feature map (the layer the heatmaps use) of every natural-colour
photograph of the training split; a PCA of them; then two distances for new photographs: the
Mahalanobis distance inside the first ``--components`` components and the squared residual outside
them. Printed per set (natural validation and test, DRIVE's other camera, 120 equalised
photographs): the median, the share above the validation set's 99th percentile (the flag a worker
would raise), and the AUC of test against DRIVE / equalised. docs/quality.md, session 20.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from ml.imageio import decode_image
from ml.inference.ensemble import Ensemble, load_ensemble
from ml.training.config import DataConfig
from ml.training.data import read_labels, split_patients

DRIVE = Path("../shared/data/drive-ungraded/images")


def pooled_features(ensemble: Ensemble, paths: Sequence[Path], batch: int = 16) -> list[np.ndarray]:
    """(N, C) pooled features per member, in the members' order."""
    per_member: list[list[np.ndarray]] = [[] for _ in ensemble.members]
    for start in range(0, len(paths), batch):
        images = [decode_image(p.read_bytes()) for p in paths[start : start + batch]]
        inputs = ensemble.pixel_inputs(images)
        with torch.inference_mode():
            for j, member in enumerate(ensemble.member_objects):
                fmap = member.model.features(torch.from_numpy(inputs[member.ref]))
                per_member[j].append(fmap.mean((2, 3)).numpy())
    return [np.concatenate(parts) for parts in per_member]


class PcaDistance:
    def __init__(self, train: np.ndarray, components: int) -> None:
        self.mean = train.mean(0)
        _, s, vt = np.linalg.svd(train - self.mean, full_matrices=False)
        self.axes = vt[:components]
        self.variance = s[:components] ** 2 / (len(train) - 1)

    def __call__(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        centred = x - self.mean
        inside = centred @ self.axes.T
        outside = ((centred - inside @ self.axes) ** 2).sum(1)
        return np.sqrt((inside**2 / self.variance).sum(1)), outside


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ref", default="drscreen-ensemble@1.6.0")
    parser.add_argument("--components", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = DataConfig()
    natural = split_patients(read_labels(Path(data.natural_dir)), data.natural_fractions, data.split_seed)
    sets = {
        "train": [s.path for s in natural["train"]],
        "val": [s.path for s in natural["val"]],
        "test": [s.path for s in natural["test"]],
        "drive": sorted(DRIVE.glob("*")),
        "equalised": [s.path for s in read_labels(Path(data.equalized_dir))[:120]],
    }
    ensemble = load_ensemble(args.ref, runtime="torch", threads=1)
    features = {name: pooled_features(ensemble, paths) for name, paths in sets.items()}
    for j, ref in enumerate(ensemble.members):
        distance = PcaDistance(features["train"][j], args.components)
        val_d, val_r = distance(features["val"][j])
        cut_d, cut_r = np.quantile(val_d, 0.99), np.quantile(val_r, 0.99)
        print(f"{ref} ({args.components} components)")
        for name in ("val", "test", "drive", "equalised"):
            d, r = distance(features[name][j])
            print(
                f"  {name:<10} n={len(d):<4} Mahalanobis median {np.median(d):6.2f}, "
                f"above val p99 {np.mean(d > cut_d):.2f} | residual median {np.median(r):7.2f}, "
                f"above val p99 {np.mean(r > cut_r):.2f}"
            )
        test_d, test_r = distance(features["test"][j])
        for name in ("drive", "equalised"):
            d, r = distance(features[name][j])
            labels = [0] * len(test_d) + [1] * len(d)
            print(
                f"  AUC test vs {name}: Mahalanobis {roc_auc_score(labels, np.r_[test_d, d]):.3f}, "
                f"residual {roc_auc_score(labels, np.r_[test_r, r]):.3f}"
            )


if __name__ == "__main__":
    main()
