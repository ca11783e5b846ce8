"""Grad-CAM on a member's last feature map, and mapping a map back onto the photograph.

Hooks are not used: `GradingNet.features` returns the feature map directly, so there is
nothing to register or forget to remove (no memory growth over thousands of images).
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from ml.models import GradingNet, expected_grade
from ml.preprocess import PreprocessConfig, disc_bbox


def member_cam(model: GradingNet, x: torch.Tensor) -> np.ndarray:
    """(size, size) Grad-CAM of the model's expected grade for one input (1, 3, S, S).

    All zeros when no region pushes the grade up (typical of a confident grade 0): the map shows
    evidence for disease, and there is none to show.
    """
    model.eval()
    # The gradient is only needed from the head back to the feature map: running the backbone
    # without autograd keeps it from saving every activation for a backward pass never taken.
    with torch.no_grad():
        fmap = model.features(x)
    with torch.enable_grad():
        fmap.requires_grad_(True)
        target = expected_grade(model.heads(fmap)).sum()
        (grads,) = torch.autograd.grad(target, fmap)
    weights = grads.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * fmap).sum(dim=1, keepdim=True))
    cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[0, 0]
    return cam.detach().numpy()


def to_photo_frame(cam: np.ndarray, photo: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
    """Undo preprocessing's crop/pad/resize so the map lies over the original photograph."""
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
    return np.clip(out * fundus, 0.0, 1.0)
