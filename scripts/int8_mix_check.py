"""int8 per member: which members of a shipped ensemble can run int8 under issue 7's rule?

    DRSCREEN_ONNX_CACHE=var/onnx python scripts/int8_mix_check.py [NAME@VERSION] [--threads N]

`scripts/int8_check.py` (session 10) quantizes every member the same way and judges the whole
ensemble; this one quantizes each member with every step of ``ml.onnx_export.STATIC_LADDER``
(MinMax calibration) and dynamically, measures each graph alone (images/s, batch 8), and then
searches every per-member choice (float32 or one int8 variant per member, recombined from the
stored probabilities: no new inference) for the fastest mix whose ensemble passes
``judge_reduced_precision`` on the natural-colour validation photographs (at most 1% of grades
changed, QWK drop at most 0.01). Needs the float32 graphs (`drscreen bench` or `drscreen export
onnx` writes them). Prints one line per graph and the best mixes; nothing is written.
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
from pathlib import Path

import numpy as np

from ml.inference.ensemble import load_ensemble
from ml.inference.onnx_runtime import onnx_path_for
from ml.onnx_export import (
    STATIC_LADDER,
    _inputs,
    _sessions,
    _speed,
    calibration_inputs,
    judge_reduced_precision,
    onnx_probabilities,
    quantize_member,
)
from ml.training.config import TrainConfig
from ml.training.train import natural_split


def main(ref: str, threads: int) -> None:
    ens = load_ensemble(ref)
    members = ens.member_objects
    split = natural_split(TrainConfig(), Path.cwd())
    y = np.array([s.grade for s in split["val"]])
    val_inputs = list(_inputs(ens, split["val"]))
    calibration = calibration_inputs(ens, split["train"])
    variants: list[tuple[str, float, bool, bool]] = [
        (label, frac, dw, True) for label, frac, dw in STATIC_LADDER
    ]
    variants.append(("dynamic", 0.0, False, False))

    # options[ref] = [(label, probabilities (photographs, 5), images/s alone)]
    options: dict[str, list[tuple[str, np.ndarray, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for m in members:
            fp32 = onnx_path_for(m.ref, None)
            size = {m.ref: m.preprocess.size}
            s32 = _sessions({m.ref: fp32}, threads)
            p32 = onnx_probabilities(s32, [m], val_inputs)[0]
            options[m.ref] = [("f32", p32, _speed(s32, size))]
            print(f"{m.ref} f32: {options[m.ref][0][2]:.1f} images/s alone", flush=True)
            for label, frac, dw, static in variants:
                out = Path(tmp) / f"{m.ref}.{len(options[m.ref])}.int8.onnx"
                x = calibration[m.ref] if static else None
                path = quantize_member(fp32, out, x, frac, dw)
                s8 = _sessions({m.ref: path}, threads)
                p8 = onnx_probabilities(s8, [m], val_inputs)[0]
                ips = _speed(s8, size)
                options[m.ref].append((label, p8, ips))
                print(
                    f"  {label}: {ips:.1f} images/s alone, max |dp| {np.abs(p8 - p32).max():.3f}",
                    flush=True,
                )
                path.unlink(missing_ok=True)

    refs = [m.ref for m in members]
    p_fp32 = np.stack([options[r][0][1] for r in refs])
    rows = []
    for choice in itertools.product(*(range(len(options[r])) for r in refs)):
        probs = np.stack([options[r][i][1] for r, i in zip(refs, choice, strict=True)])
        figures = judge_reduced_precision(ens, probs, y, p_fp32)
        speed = 1 / sum(1 / options[r][i][2] for r, i in zip(refs, choice, strict=True))
        rows.append((speed, choice, figures))
    base = next(speed for speed, choice, _ in rows if not any(choice))
    passing = sorted((r for r in rows if r[2]["passes_criteria"]), key=lambda r: -r[0])
    print(f"\nensemble float32 (estimated from the members): {base:.1f} images/s")
    print(f"{len(passing)} of {len(rows)} per-member mixes pass; the fastest:")
    for speed, choice, figures in passing[:8]:
        mix = ", ".join(f"{r}: {options[r][i][0]}" for r, i in zip(refs, choice, strict=True))
        print(
            f"  {speed:.1f} images/s ({speed / base:.2f}x): {figures['grades_changed']} grades changed,"
            f" QWK {figures['qwk']:.3f} (f32 {figures['qwk_fp32']:.3f}) | {mix}"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("ref", nargs="?", default="drscreen-ensemble@1.6.0")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    main(args.ref, args.threads)
