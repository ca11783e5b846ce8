"""Grad-CAM on a member's last feature map, with autograd (the PyTorch runtime; any head).

Hooks are not used: `GradingNet.features` returns the feature map directly, so there is
nothing to register or forget to remove (no memory growth over thousands of images).
ml.inference.cam computes the same map without torch for members with a regression head.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ml.models import GradingNet, expected_grade


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
    return cam.detach().cpu().numpy()
