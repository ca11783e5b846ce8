"""The pixels a preprocessing config produces are pinned to ``PIXELS_REVISION``.

Training caches its pixels keyed by the config and ``PIXELS_REVISION``; inference computes them
afresh. A code change that moves the pixels without bumping the revision let a cache serve the old
pixels to training while the service computed new ones (the session-31 training review narrowed
the circle mask's margin: 17,254 values differed on 4 photographs). This test fails on such a
change: bump ``ml.preprocess.PIXELS_REVISION`` and record the new fingerprint with
``python -m tests.unit.test_pixels_revision --write``.

The fingerprint is each photograph's 16 x 16-pixel block means, compared with a tolerance: SIMD
paths of OpenCV differ by a grey level here and there between CPU types, a changed pipeline moves
whole blocks.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from ml.imageio import decode_image
from ml.preprocess import PIXELS_REVISION, PreprocessConfig, prepare_pixels

REPO = Path(__file__).resolve().parents[2]
FINGERPRINT = REPO / "tests" / "fixtures" / "pixels_fingerprint.json"
CONFIGS = {
    "ben": PreprocessConfig(),
    "equalize": PreprocessConfig(enhancements=("equalize",)),
    "clahe-sharpen-blur": PreprocessConfig(
        size=128, circle_mask=False, enhancements=("clahe", "sharpen", "blur")
    ),
}


def fingerprint() -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for photo in sorted((REPO / "samples").glob("*/*.jpg")):
        rgb = decode_image(photo.read_bytes())
        for name, cfg in CONFIGS.items():
            pixels = prepare_pixels(rgb, cfg).astype(np.float32)
            n = cfg.size // 16
            blocks = pixels.reshape(n, 16, n, 16, 3).mean(axis=(1, 3))
            out[f"{photo.name}:{name}"] = [round(float(v), 1) for v in blocks.ravel()]
    return out


def test_the_pixels_are_those_recorded_for_this_revision() -> None:
    recorded = json.loads(FINGERPRINT.read_text())
    assert recorded["revision"] == PIXELS_REVISION, (
        "PIXELS_REVISION changed: record its fingerprint (python -m tests.unit.test_pixels_revision --write)"
    )
    now = fingerprint()
    assert sorted(now) == sorted(recorded["blocks"])
    for key, values in now.items():
        diff = np.abs(np.asarray(values) - np.asarray(recorded["blocks"][key]))
        assert diff.max() < 2.0 and diff.mean() < 0.1, (
            f"{key}: the pixels moved (largest block change {diff.max():.2f} grey levels) without "
            "a bump of ml.preprocess.PIXELS_REVISION: bump it and record the new fingerprint"
        )


if __name__ == "__main__" and sys.argv[1:] == ["--write"]:
    FINGERPRINT.write_text(json.dumps({"revision": PIXELS_REVISION, "blocks": fingerprint()}) + "\n")
    print(f"wrote {FINGERPRINT}")
