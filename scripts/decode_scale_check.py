"""Camera-size JPEGs: decoding at a reduced DCT scale vs in full, for cost and for parity.

    python scripts/decode_scale_check.py [NAME@VERSION] [--photos 40] [--side 3888]

The natural-colour photographs are 512 px wide; clinics send the camera's own (EyePACS cameras:
up to ~3888 x 2592). Each photograph is enlarged to --side (Lanczos) and saved as a quality-95
JPEG, then run both ways (and the original 512-px file, for scale) through what a worker does
before the networks (decode, quality gate, preprocessing) and the ensemble: prints the time per
photograph of each way (one thread), how many gate decisions and grades differ, and the largest
change of a probability. docs/performance.md.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from ml.imageio import decode_image, decode_scaled  # noqa: E402
from ml.inference import load_ensemble  # noqa: E402
from ml.inference.combine import combine  # noqa: E402
from ml.quality import DECODE_MIN_SIDE, assess_quality  # noqa: E402

PHOTOS = ROOT.parent / "shared" / "data" / "eyepacs-natural-512" / "images"


def camera_jpeg(path: Path, side: int) -> bytes:
    with Image.open(path) as im:
        w, h = im.size
        big = im.convert("RGB").resize((side, round(h * side / w)), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    big.save(buf, "JPEG", quality=95)
    return buf.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ref", nargs="?", default=None, help="ensemble NAME@VERSION (default: shipped)")
    parser.add_argument("--photos", type=int, default=40)
    parser.add_argument("--side", type=int, default=3888)
    args = parser.parse_args()
    cv2.setNumThreads(1)
    ens = load_ensemble(args.ref, runtime="onnx", threads=1, quantized=None)
    paths = sorted(PHOTOS.glob("*.jpg"))[: args.photos]
    data = [camera_jpeg(p, args.side) for p in paths]
    originals = [p.read_bytes() for p in paths]
    ways = {
        "full decode": decode_image,
        f"scaled (min side {DECODE_MIN_SIDE})": lambda b: decode_scaled(b, min_side=DECODE_MIN_SIDE)[0],
    }
    results = {}
    for name, decode in [*ways.items(), ("the 512-px original", decode_image)]:
        source = originals if name.endswith("original") else data
        t0 = time.perf_counter()
        rgbs = [decode(b) for b in source]
        t1 = time.perf_counter()
        gates = [assess_quality(rgb) for rgb in rgbs]
        t2 = time.perf_counter()
        inputs = ens.pixel_inputs(rgbs)
        t3 = time.perf_counter()
        probs = ens.member_probabilities(inputs)
        results[name] = (gates, probs, combine(ens.rule, probs)[2])
        n = len(data)
        print(
            f"{name:<26} decode {1000 * (t1 - t0) / n:6.1f}  gate {1000 * (t2 - t1) / n:6.1f}  "
            f"preprocess {1000 * (t3 - t2) / n:6.1f} ms/photo; shape {rgbs[0].shape}"
        )
    (g_a, p_a, grade_a), (g_b, p_b, grade_b), (_, p_o, grade_o) = results.values()
    gate_changed = sum(a.gradable != b.gradable for a, b in zip(g_a, g_b, strict=True))
    score_diff = max(abs(a.scores[k] - b.scores[k]) for a, b in zip(g_a, g_b, strict=True) for k in a.scores)
    grades_changed = int(np.count_nonzero(grade_a != grade_b))
    print(
        f"{len(data)} photographs at {args.side} px: gate decisions changed {gate_changed}, "
        f"largest gate score change {score_diff:.3f}, ensemble grades changed {grades_changed}, "
        f"largest member probability change {float(np.abs(p_a - p_b).max()):.4f}"
    )
    for name, p, g in (("full decode", p_a, grade_a), ("scaled", p_b, grade_b)):
        print(
            f"{name} vs the 512-px original: grades changed {int(np.count_nonzero(g != grade_o))}, "
            f"largest member probability change {float(np.abs(p - p_o).max()):.4f}"
        )


if __name__ == "__main__":
    main()
