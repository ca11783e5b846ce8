"""OpenVINO speed of each member at every precision it could run: f32, bf16, and int8 (the QDQ
graphs `drscreen export onnx --quantize` would write) in f32 and bf16 around the int8 layers.

    DRSCREEN_ONNX_CACHE=var/onnx python scripts/openvino_precision_speed.py [NAME@VERSION]

Information for issue 7 on CPUs with int8/bf16 matrix units (Intel AMX, session 18): whether
OpenVINO's int8 kernels would beat its bfloat16 ones. Speed only (batch 8, one thread, random
inputs, best of 5 after a warm-up: ``ml.onnx_export._speed``); what a precision does to the
grades is the export's check.
Needs the float32 graphs (`drscreen bench` or `drscreen export onnx` writes them).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from ml.inference.ensemble import load_ensemble
from ml.inference.onnx_runtime import onnx_path_for
from ml.inference.openvino_runtime import OpenVinoSession, bf16_kernels
from ml.onnx_export import _speed, calibration_inputs, quantize_member
from ml.training.config import TrainConfig
from ml.training.train import natural_split

#: (label, fraction of the first convolutions kept float, depthwise kept float): two steps of
#: ml.onnx_export.STATIC_LADDER, the most quantized and the one that changed fewest grades
INT8_VARIANTS = (
    ("int8, stem and head fp32", 0.0, False),
    ("int8, first quarter and depthwise fp32", 0.25, True),
)


def main(ref: str) -> None:
    ens = load_ensemble(ref)
    calibration = calibration_inputs(ens, natural_split(TrainConfig(), Path.cwd())["train"])
    print(f"{ref}, bf16 kernels: {bf16_kernels()}, images/s at batch 8 on one thread")
    with tempfile.TemporaryDirectory() as tmp:
        for m in ens.member_objects:
            size = {m.ref: m.preprocess.size}
            fp32 = onnx_path_for(m.ref, None)
            graphs = [("float32 graph", fp32)]
            for label, fraction, depthwise in INT8_VARIANTS:
                out = Path(tmp) / f"{m.ref}.{fraction}.int8.onnx"
                graphs.append((label, quantize_member(fp32, out, calibration[m.ref], fraction, depthwise)))
            for label, path in graphs:
                # the export's own timing: batch 8 of random inputs, best of 5 after a warm-up
                speeds = [_speed({m.ref: OpenVinoSession(path, p, 1)}, size) for p in ("f32", "bf16")]
                print(f"  {m.ref} {label}: f32 {speeds[0]:.1f}, bf16 {speeds[1]:.1f}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "drscreen-ensemble@1.6.0")
