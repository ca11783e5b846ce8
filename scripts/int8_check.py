"""int8 variants of a shipped ensemble's ONNX members on the natural-colour VALIDATION photographs.

    DRSCREEN_ONNX_CACHE=var/onnx python scripts/int8_check.py [NAME@VERSION]

Needs the float32 graphs (`drscreen export onnx --model NAME@VERSION` writes them). For each
ladder step of ``ml.onnx_export.STATIC_LADDER`` that keeps the depthwise convolutions float, and
for MinMax and Percentile (99.99) calibration, prints the ensemble's grades changed against
float32, its QWK, each member's largest probability difference, and int8 vs float32 images/s
measured one after the other (batch 8, one thread). docs/performance.md, session 10.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
from onnxruntime.quantization import CalibrationMethod

from ml.inference.ensemble import load_ensemble
from ml.inference.onnx_runtime import onnx_path_for
from ml.onnx_export import (
    STATIC_LADDER,
    _grades_and_qwk,
    _inputs,
    _sessions,
    _speed,
    calibration_inputs,
    onnx_probabilities,
    quantize_member,
)
from ml.training.config import TrainConfig
from ml.training.train import natural_split


def main(ref: str) -> None:
    ens = load_ensemble(ref)
    members = ens.member_objects
    sizes = {m.ref: m.preprocess.size for m in members}
    split = natural_split(TrainConfig(), Path.cwd())
    y = np.array([s.grade for s in split["val"]])
    val_inputs = list(_inputs(ens, split["val"]))
    calibration = calibration_inputs(ens, split["train"])  # the export's calibration photographs
    fp32 = {m.ref: onnx_path_for(m.ref, None) for m in members}

    def probabilities(paths: dict[str, Path]) -> tuple[np.ndarray, dict]:
        sessions = _sessions(paths, 1)
        return onnx_probabilities(sessions, members, val_inputs), sessions

    p32, s32 = probabilities(fp32)
    g32, q32 = _grades_and_qwk(ens, p32, y)
    print(f"{ref}: {len(y)} validation photographs, float32 QWK {q32:.3f}")
    with tempfile.TemporaryDirectory() as tmp:
        for label, fraction, depthwise in STATIC_LADDER:
            if not depthwise:
                continue
            for method in (CalibrationMethod.MinMax, CalibrationMethod.Percentile):
                paths = {
                    m.ref: quantize_member(
                        fp32[m.ref],
                        Path(tmp) / f"{m.ref}.int8.onnx",
                        calibration[m.ref],
                        fraction,
                        depthwise,
                        method,
                    )
                    for m in members
                }
                p8, s8 = probabilities(paths)
                g8, q8 = _grades_and_qwk(ens, p8, y)
                worst = " / ".join(f"{np.abs(p8[i] - p32[i]).max():.3f}" for i in range(len(members)))
                speed8, speed32 = _speed(s8, sizes), _speed(s32, sizes)
                print(
                    f"  {label}, {method.name}: {(g8 != g32).sum()} grades changed, QWK {q8:.3f},"
                    f" max |dp| {worst}, int8 {speed8:.1f} vs fp32 {speed32:.1f} images/s"
                )


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "drscreen-ensemble@1.4.3")
