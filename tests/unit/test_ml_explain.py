"""Grad-CAM on a released member: the map lies over the photograph and over the fundus only."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from ml.inference.combine import CombineRule
from ml.inference.ensemble import Ensemble, Member
from ml.inference.overlay import overlay_png
from ml.release import load_checkpoint

REPO = Path(__file__).resolve().parents[2]
MEMBER = REPO / "models" / "members" / "lite0-multitask" / "1.0.0"


def test_heatmap_of_a_proliferative_eye_is_on_the_fundus_and_photo_sized() -> None:
    model, pre, config = load_checkpoint(MEMBER)
    ens = Ensemble("t", [Member("lite0", model, pre, config)], CombineRule("weighted_average", [1.0]), {})
    photo = np.asarray(Image.open(REPO / "samples" / "16" / "16_left.jpg").convert("RGB"))
    heat = ens.explain(photo)
    assert heat.shape == photo.shape[:2] and heat.dtype == np.float32
    assert heat.min() >= 0.0 and heat.max() <= 1.0
    assert heat.max() > 0.5, "a grade-4 eye must show evidence somewhere"
    surround = photo.max(axis=2) <= 15
    assert heat[surround].max() == 0.0
    png = Image.open(io.BytesIO(overlay_png(photo, heat)))
    assert png.size == (photo.shape[1], photo.shape[0]) and png.format == "PNG"


def test_explaining_many_images_leaves_no_state_behind() -> None:
    """No hooks, no retained graphs: repeated explanations give identical maps."""
    model, pre, config = load_checkpoint(MEMBER)
    ens = Ensemble("t", [Member("lite0", model, pre, config)], CombineRule("weighted_average", [1.0]), {})
    photo = np.asarray(Image.open(REPO / "samples" / "229" / "229_right.jpg").convert("RGB"))
    first = ens.explain(photo)
    for _ in range(5):
        ens.explain(photo)
    assert np.array_equal(first, ens.explain(photo))
    assert not model._forward_hooks and not model._backward_hooks
    assert all(p.grad is None for p in model.parameters())


def test_grad_cam_saves_activations_for_the_head_only() -> None:
    """The backbone runs without autograd: a backward through it was never taken, and the
    activations it saved cost a heatmap worker ~100 MB (docs/performance.md, session 15)."""
    import torch

    from ml.inference.gradcam import member_cam

    model, pre, _ = load_checkpoint(MEMBER)
    x = torch.zeros(1, 3, pre.size, pre.size)
    saved: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        member_cam(model, x)
    fmap_numel = model.features(x).numel()
    # the head saves a few tensors the size of the feature map at most; the backbone alone
    # would save dozens, several times larger than it
    assert sum(saved) <= 4 * fmap_numel, (len(saved), sum(saved), fmap_numel)
