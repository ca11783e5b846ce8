"""Class-activation maps without PyTorch, and mapping a map back onto the photograph.

Every shipped member has a regression head, and Grad-CAM of a regression score is exact without
autograd: the score is ``w · mean(F) + b`` over the last feature map ``F`` (C, h, w), so its
gradient is ``w_c / (h·w)`` at every position, Grad-CAM's channel weights are that constant, and
the map is ``relu(Σ_c w_c F_c) / (h·w)``. A worker that scores with ONNX Runtime or OpenVINO
gets ``F`` as the member graph's second output (ml.inference.onnx_runtime), in the forward pass
that grades the photograph, and never imports torch for a heatmap. ml.inference.gradcam keeps
the autograd version for the PyTorch runtime and for heads without a regression score.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from safetensors import safe_open

from ml.preprocess import PreprocessConfig, disc_bbox

REGRESSION_WEIGHT = "reg_head.weight"


def regression_weight(folder: Path) -> np.ndarray | None:
    """A released member's regression-head weights (C,) as float32, or None without that head."""
    with safe_open(str(folder / "model.safetensors"), framework="numpy") as f:
        if REGRESSION_WEIGHT not in f.keys():  # noqa: SIM118  (safe_open is not a mapping)
            return None
        return np.asarray(f.get_tensor(REGRESSION_WEIGHT), dtype=np.float32).reshape(-1)


def regression_cam(fmap: np.ndarray, weight: np.ndarray, size: int) -> np.ndarray:
    """(size, size) Grad-CAM of the regression score on one feature map (1, C, h, w).

    The same numbers as ``gradcam.member_cam`` for a member whose expected grade is its
    regression score (bilinear upsampling with half-pixel centres, as F.interpolate does).
    """
    h, w = fmap.shape[-2:]
    cam = np.maximum(np.tensordot(weight, fmap[0].astype(np.float32), axes=1) / (h * w), 0.0)
    return cv2.resize(cam.astype(np.float32), (size, size), interpolation=cv2.INTER_LINEAR)


def to_photo_frame(cam: np.ndarray, photo: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
    """Undo preprocessing's crop/pad/resize so the map lies over the original photograph (values
    kept as they are: the ensemble scales the sum of its members' maps)."""
    h, w = photo.shape[:2]
    if cfg.crop_to_disc:
        y0, y1, x0, x1 = disc_bbox(photo)
    else:
        y0, y1, x0, x1 = 0, h, 0, w
    ch, cw = y1 - y0, x1 - x0
    side = max(ch, cw)
    square = cv2.resize(cam, (side, side), interpolation=cv2.INTER_LINEAR)
    top, left = (side - ch) // 2, (side - cw) // 2
    out = np.zeros((h, w), dtype=np.float32)
    out[y0:y1, x0:x1] = square[top : top + ch, left : left + cw]
    # the network sees the black surround only as padding: evidence there is an artefact
    fundus = (photo.max(axis=2) > 15).astype(np.uint8)
    fundus = cv2.erode(fundus, np.ones((5, 5), np.uint8))
    return out * fundus
