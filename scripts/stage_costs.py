"""CPU cost per photograph of each stage a scoring worker runs, on one thread, in one process.

    python scripts/stage_costs.py [NAME@VERSION] [--photos N] [--runtime onnx|openvino|torch] [--explain]

Decode, quality gate, preprocess (``Ensemble.pixel_inputs``) and forward
(``Ensemble.member_probabilities``) over N natural-colour photographs in batches of 8, as
``workers.scoring`` runs them, without the database and the broker; the best of 3 passes after
a warm-up. With ``--explain``, the stages of a heatmap instead, as ``workers.explain`` runs them:
decode, preprocess, the members' maps (``Ensemble.explain`` less its preprocessing), and the
overlay encoded as PNG. The model is loaded first, as in a worker (its allocations change how much the other
stages page-fault). docs/performance.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import cv2  # noqa: E402

from ml.imageio import decode_image  # noqa: E402
from ml.inference import Ensemble, load_ensemble  # noqa: E402
from ml.inference.overlay import overlay_png  # noqa: E402
from ml.quality import assess_quality  # noqa: E402

PHOTOS = Path("/work/shared/data/eyepacs-natural-512/images")
STAGES = ("decode", "quality gate", "preprocess", "forward")
EXPLAIN_STAGES = ("decode", "preprocess", "maps", "overlay png")


def one_pass(ens: Ensemble, data: list[bytes], batch: int = 8) -> dict[str, float]:
    spent = dict.fromkeys(STAGES, 0.0)
    for start in range(0, len(data), batch):
        images = []
        for raw in data[start : start + batch]:
            t0 = time.perf_counter()
            rgb = decode_image(raw)
            t1 = time.perf_counter()
            assess_quality(rgb)
            spent["decode"] += t1 - t0
            spent["quality gate"] += time.perf_counter() - t1
            images.append(rgb)
        t0 = time.perf_counter()
        inputs = ens.pixel_inputs(images)
        t1 = time.perf_counter()
        ens.member_probabilities(inputs)
        spent["preprocess"] += t1 - t0
        spent["forward"] += time.perf_counter() - t1
    return spent


def explain_pass(ens: Ensemble, data: list[bytes]) -> dict[str, float]:
    spent = dict.fromkeys(EXPLAIN_STAGES, 0.0)
    for raw in data:
        t0 = time.perf_counter()
        rgb = decode_image(raw)
        t1 = time.perf_counter()
        ens.pixel_inputs([rgb])
        t2 = time.perf_counter()
        heat = ens.explain(rgb)  # preprocesses again: its share is taken off below
        t3 = time.perf_counter()
        overlay_png(rgb, heat)
        t4 = time.perf_counter()
        spent["decode"] += t1 - t0
        spent["preprocess"] += t2 - t1
        spent["maps"] += (t3 - t2) - (t2 - t1)
        spent["overlay png"] += t4 - t3
    return spent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ref", nargs="?", default="drscreen-ensemble@1.0.0")
    parser.add_argument("--photos", type=int, default=96)
    parser.add_argument("--runtime", default="onnx", choices=("onnx", "openvino", "torch"))
    parser.add_argument("--explain", action="store_true", help="the stages of a heatmap instead")
    args = parser.parse_args()
    cv2.setNumThreads(1)
    ens = load_ensemble(args.ref, runtime=args.runtime, threads=1, quantized=None)
    data = [p.read_bytes() for p in sorted(PHOTOS.glob("*.jpg"))[: args.photos]]
    run, stages = (explain_pass, EXPLAIN_STAGES) if args.explain else (one_pass, STAGES)
    run(ens, data)
    passes = [run(ens, data) for _ in range(3)]
    best = {k: min(p[k] for p in passes) for k in stages}
    total = sum(best.values())
    for k in stages:
        sys.stdout.write(f"{k:<13} {1000 * best[k] / len(data):6.2f} ms/photo  {best[k] / total:6.1%}\n")
    if args.explain:
        sys.stdout.write(f"{'total':<13} {1000 * total / len(data):6.2f} ms/photo\n")
        return
    share = best["forward"] / total
    sys.stdout.write(f"{'total':<13} {1000 * total / len(data):6.2f} ms/photo; forward / total {share:.2f}\n")


if __name__ == "__main__":
    main()
