"""How strong the ensemble's heatmaps are before scaling, by reference and predicted grade, on the
natural-colour validation photographs (never the test part): the evidence for the heatmap's full
scale (``ml.inference.ensemble.HEATMAP_FULL_SCALE``).

    python scripts/heatmap_scale_check.py [drscreen-ensemble@1.6.0] [--runtime onnx]
    python scripts/heatmap_scale_check.py --picture docs/heatmaps-one-scale.png   # the samples' maps

Prints, for each grade, the peak of the raw map (grade units, inside the fundus) as quantiles,
and what share of photographs would be shown stretched to 1 at the current full scale.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ml.inference import load_ensemble
from ml.inference.ensemble import HEATMAP_FULL_SCALE
from ml.training.config import TrainConfig
from ml.training.data import load_rgb
from ml.training.train import natural_split


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", default=None)
    parser.add_argument("--runtime", default="onnx", choices=["onnx", "torch"])
    parser.add_argument("--picture", type=Path, help="write the sample photographs' heatmaps side by side")
    args = parser.parse_args()
    ens = load_ensemble(args.model, runtime=args.runtime, threads=1)
    if args.picture:
        picture(ens, args.picture)
        return
    val = natural_split(TrainConfig(), Path.cwd())["val"]
    peaks, truth, called = [], [], []
    for sample in tqdm(val, desc="heatmaps", unit="photo"):
        rgb = load_rgb(sample.path)
        peaks.append(float(ens.explain_raw(rgb).max()))
        truth.append(sample.grade)
        called.append(ens.predict([rgb])[0].grade)
    p, t, c = np.array(peaks), np.array(truth), np.array(called)
    print(f"{ens.ref}, {len(p)} validation photographs, full scale {HEATMAP_FULL_SCALE}")
    print("group                 n   min    q10    median q90    max    stretched to 1")
    for label, mask in [
        *((f"reference grade {g}", t == g) for g in range(5)),
        *((f"predicted grade {g}", c == g) for g in range(5)),
        ("reference 0-1", t < 2),
        ("reference 2-4", t >= 2),
    ]:
        if mask.any():
            q = np.quantile(p[mask], [0, 0.1, 0.5, 0.9, 1.0])
            share = float((p[mask] >= HEATMAP_FULL_SCALE).mean())
            print(f"{label:<20} {mask.sum():>3}  " + " ".join(f"{v:.4f}" for v in q) + f"  {share:.2f}")


def picture(ens: Any, out: Path) -> None:
    """Three of the repository's sample photographs (samples/README.md: EyePACS) with their
    heatmaps as the pages show them: a grade-4 eye and two grade-0 eyes, on the one scale."""
    from PIL import Image

    from ml.imageio import decode_image
    from ml.inference.overlay import overlay

    root = Path(__file__).resolve().parents[1] / "samples"
    tiles = []
    for name in ("16/16_left.jpg", "178/178_right.jpg", "229/229_left.jpg"):
        rgb = decode_image((root / name).read_bytes())
        grade = ens.predict([rgb])[0].grade
        print(f"{name}: graded {grade}, raw peak {float(ens.explain_raw(rgb).max()):.4f}")
        tiles.append(np.asarray(Image.fromarray(overlay(rgb, ens.explain(rgb))).resize((384, 384))))
    Image.fromarray(np.concatenate(tiles, axis=1)).save(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
