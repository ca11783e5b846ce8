"""Resident memory of one process that loads an ensemble and grades a batch of photographs.

    python scripts/ensemble_rss.py [NAME@VERSION] [--runtime onnx|torch] [--explain]

Prints VmRSS and the peak VmHWM (from /proc/self/status) after the imports, after loading, after
``predict`` on 8 natural-colour photographs and, with ``--explain``, after one heatmap. The ONNX
files come from ``DRSCREEN_ONNX_CACHE`` (exported there first if missing). docs/performance.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ml.imageio import decode_image  # noqa: E402
from ml.inference import load_ensemble  # noqa: E402

PHOTOS = Path("/work/shared/data/eyepacs-natural-512/images")


def memory(stage: str) -> None:
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    rss, peak = (int(status[k].split()[0]) / 1024 for k in ("VmRSS", "VmHWM"))
    sys.stdout.write(f"{stage:<30} VmRSS {rss:6.0f} MB   VmHWM {peak:6.0f} MB\n")
    sys.stdout.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ref", nargs="?", default="drscreen-ensemble@1.0.0")
    parser.add_argument("--runtime", default="onnx", choices=("onnx", "torch"))
    parser.add_argument("--explain", action="store_true")
    parser.add_argument("--photos", type=Path, default=PHOTOS)
    args = parser.parse_args()
    memory("imports")
    ens = load_ensemble(args.ref, runtime=args.runtime, threads=1, quantized=None)
    memory("loaded")
    images = [decode_image(p.read_bytes()) for p in sorted(args.photos.glob("*.jpg"))[:8]]
    preds = ens.predict(images)
    memory("predict 8")
    sys.stdout.write(f"grades {[p.grade for p in preds]}\n")
    if args.explain:
        ens.explain(images[0])
        memory("explain 1")


if __name__ == "__main__":
    main()
