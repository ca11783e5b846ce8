"""Grades of the shipped OpenVINO precisions against ONNX Runtime float32 on ALL natural-colour photographs.

    DRSCREEN_ONNX_CACHE=var/onnx python scripts/precision_agreement.py [NAME@VERSION]

`drscreen export onnx` picks which members may run in bfloat16 on the 114 validation photographs;
this counts grade changes on every natural-colour photograph (train, validation and test parts:
no label is read, only the two runtimes' grades are compared), so the choice is checked on
photographs it was not made on. docs/performance.md, session 11.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from ml.inference import load_ensemble
from ml.inference.combine import combine
from ml.onnx_export import _inputs
from ml.training.config import TrainConfig
from ml.training.data import read_labels
from ml.training.train import natural_split, resolve


def main(ref: str) -> None:
    ort = load_ensemble(ref, runtime="onnx", threads=1)
    vino = load_ensemble(ref, runtime="openvino", threads=1)
    assert ort.runtime is not None and vino.runtime is not None
    precisions = {r: s.precision for r, s in vino.runtime.sessions.items()}
    cfg = TrainConfig()
    samples = read_labels(resolve(cfg.data.natural_dir, Path.cwd()))
    val = {s.path for s in natural_split(cfg, Path.cwd())["val"]}
    p_ort, p_vino = [], []
    for inputs in _inputs(ort, samples):
        p_ort.append(ort.member_probabilities(inputs))
        p_vino.append(vino.member_probabilities(inputs))
    a, b = np.concatenate(p_ort, axis=1), np.concatenate(p_vino, axis=1)
    grades_a, grades_b = combine(ort.rule, a)[2], combine(vino.rule, b)[2]
    changed = grades_a != grades_b
    in_val = np.array([s.path in val for s in samples])
    print(f"{ref}, OpenVINO precisions {precisions}")
    print(f"  all natural-colour photographs: {changed.sum()} of {len(samples)} grades changed")
    print(f"  validation part: {changed[in_val].sum()} of {in_val.sum()}")
    print(f"  other parts: {changed[~in_val].sum()} of {(~in_val).sum()}")
    print(f"  largest member probability difference: {np.abs(a - b).max():.4f}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "drscreen-ensemble@1.5.0")
