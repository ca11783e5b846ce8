"""Does the fast Ben Graham blur (``ml.preprocess.ben_blur``) change any grade?

    python scripts/ben_blur_check.py [NAME@VERSION] [--limit N]

Scores the natural-colour photographs (all 460 by default; no labels are read) with the
shipped ensemble twice: with the pixels the members were trained on (cv2.GaussianBlur, the
pipeline before revision 2) and with ``ben_blur``. Prints the largest pixel difference of the
model input, the largest probability difference, how many ensemble grades change, and the
image-level QWK of both on the natural-colour VALIDATION patients (the rule of issue 7 for
speed changes: at most 1% of grades changed and a QWK drop of at most 0.01).
docs/performance.md, session 9.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from unittest import mock

import cv2
import numpy as np
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ml import preprocess  # noqa: E402
from ml.imageio import decode_image  # noqa: E402
from ml.inference import Ensemble, load_ensemble, resolve_ref  # noqa: E402
from ml.inference.combine import combine  # noqa: E402
from ml.metrics import qwk  # noqa: E402
from ml.training.config import TrainConfig  # noqa: E402
from ml.training.train import natural_split  # noqa: E402

PHOTOS = Path("/work/shared/data/eyepacs-natural-512/images")


def reference_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    return cv2.GaussianBlur(img, (0, 0), sigma)


def score(ens: Ensemble, images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(256-px Ben Graham pixels, member probabilities, ensemble grades) in batches of 8."""
    pixels = np.stack([preprocess.prepare_pixels(img, preprocess.PreprocessConfig()) for img in images])
    batches = [images[i : i + 8] for i in range(0, len(images), 8)]
    probs = np.concatenate([ens.member_probabilities(ens.pixel_inputs(b)) for b in batches], axis=1)
    return pixels, probs, combine(ens.rule, probs)[2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ref", nargs="?", default=None)
    parser.add_argument("--limit", type=int, default=None)
    args = parser.parse_args()
    ref = resolve_ref(args.ref)
    ens = load_ensemble(ref, runtime="onnx", threads=2, quantized=None)
    paths = sorted(PHOTOS.glob("*.jpg"))[: args.limit]
    images = [decode_image(p.read_bytes()) for p in tqdm(paths, desc="decoding", unit="photo")]
    with mock.patch.object(preprocess, "ben_blur", reference_blur):
        x_ref, p_ref, g_ref = score(ens, images)
    x_new, p_new, g_new = score(ens, images)
    pixel = np.abs(x_ref.astype(int) - x_new.astype(int))
    changed = np.flatnonzero(g_ref != g_new)
    val = {s.path.name: s.grade for s in natural_split(TrainConfig(), ROOT)["val"]}
    on_val = [i for i, p in enumerate(paths) if p.name in val]
    y = [val[paths[i].name] for i in on_val]
    print(f"{ref}: {len(paths)} natural-colour photographs")
    print(f"  Ben Graham pixels (256 px): largest difference {pixel.max()} grey levels,", end=" ")
    print(f"{np.mean(pixel > 0):.2%} differ")
    print(f"  largest member probability difference: {np.abs(p_ref - p_new).max():.4f}")
    names = [paths[i].name for i in changed]
    print(f"  ensemble grades changed: {len(changed)} ({len(changed) / len(paths):.2%}) {names}")
    print(
        f"  validation ({len(on_val)} photographs): QWK {qwk(y, g_ref[on_val]):.4f} with GaussianBlur,"
        f" {qwk(y, g_new[on_val]):.4f} with ben_blur;"
        f" {int((g_ref[on_val] != g_new[on_val]).sum())} grades changed"
    )


if __name__ == "__main__":
    main()
