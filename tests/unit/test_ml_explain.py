"""Grad-CAM on a released member: the map lies over the photograph and over the fundus only, and
the map without autograd (ml.inference.cam) is the same map."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
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


def test_regression_cam_without_autograd_is_grad_cam() -> None:
    """For a member with a regression head, the closed form from the feature map equals Grad-CAM."""
    import torch

    from ml.inference.cam import regression_cam, regression_weight
    from ml.inference.gradcam import member_cam
    from ml.preprocess import prepare_pixels, to_input

    model, pre, _ = load_checkpoint(MEMBER)
    weight = regression_weight(MEMBER)
    assert weight is not None and weight.shape == (model.reg_head.weight.shape[1],)  # type: ignore[union-attr]
    for name in ("16/16_left.jpg", "229/229_right.jpg"):
        photo = np.asarray(Image.open(REPO / "samples" / name).convert("RGB"))
        x = torch.from_numpy(to_input(prepare_pixels(photo, pre), pre)[None])
        expected = member_cam(model, x)
        with torch.no_grad():
            fmap = model.features(x).numpy()
        got = regression_cam(fmap, weight, pre.size)
        assert expected.max() > 0
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6 * float(expected.max()))


def test_a_member_without_a_regression_head_falls_back_to_autograd(tmp_path: Path) -> None:
    """No regression score, no closed form: explain loads the network and uses Grad-CAM, and
    predict leaves the heatmap to it rather than reading the graphs' feature maps."""
    from safetensors.torch import save_file

    class Graphs:  # stands for the ONNX sessions: scores, never asked for a feature map
        def __init__(self) -> None:
            self.outputs: list[list[str]] = []

        def run_many(self, refs: list[str], inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
            return [np.full((len(inputs[r]), 5), 0.2, np.float32) for r in refs]

        def run_outputs(self, refs: list[str], inputs: dict[str, np.ndarray], names: list[str]) -> Any:
            self.outputs.append(names)
            raise AssertionError("feature maps asked of a member without a regression head")

    model, pre, config = load_checkpoint(MEMBER)
    model.reg_head = None  # a classification + ordinal member, and its release file without the head
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "model.safetensors"))
    member = Member("lite0", model, pre, config, folder=tmp_path)
    graphs = Graphs()
    ens = Ensemble("t", [member], CombineRule("weighted_average", [1.0]), {}, runtime=graphs)
    assert member.regression_weight is None and not ens.maps_from_graphs
    photo = np.asarray(Image.open(REPO / "samples" / "16" / "16_left.jpg").convert("RGB"))
    [pred] = ens.predict([photo], heatmaps=[True])
    assert pred.heatmap is None
    assert ens.explain(photo).max() > 0.5
    assert graphs.outputs == []


def _blob(size: int, peak: float) -> np.ndarray:
    """A network-frame map (size x size) with a Gaussian bump of ``peak`` at its centre."""
    yy, xx = np.mgrid[0:size, 0:size]
    c = (size - 1) / 2
    return (peak * np.exp(-((yy - c) ** 2 + (xx - c) ** 2) / (2 * (size / 20) ** 2))).astype(np.float32)


def _two_geometry_ensemble() -> tuple[Ensemble, np.ndarray]:
    """Members of different geometry (64 px cropped to the disc, 128 px uncropped) and a
    300 x 600 photograph whose disc (radius 140) is centred left of the photograph's centre."""
    from dataclasses import replace

    _, pre, config = load_checkpoint(MEMBER)
    members = [
        Member("cropped", None, replace(pre, size=64, crop_to_disc=True), config, folder=MEMBER),
        Member("whole", None, replace(pre, size=128, crop_to_disc=False), config, folder=MEMBER),
    ]
    photo = np.zeros((300, 600, 3), np.uint8)
    yy, xx = np.mgrid[0:300, 0:600]
    photo[(yy - 150) ** 2 + (xx - 220) ** 2 <= 140**2] = (150, 80, 40)
    return Ensemble("t", members, CombineRule("weighted_average", [1.0, 1.0]), {}), photo


def test_each_member_map_is_placed_by_its_own_crop_and_size() -> None:
    """The Grad-CAM review (session 30): every member's map was placed by the first member's
    preprocessing (a 384-px member beside 256-px ones failed every heatmap; an uncropped one
    landed in the wrong place)."""
    ens, photo = _two_geometry_ensemble()
    heat = ens._heatmap([_blob(64, 0.4), _blob(128, 0.4)], photo)
    assert heat.shape == photo.shape[:2]
    # the cropped member's centre is the disc's (x 220), the uncropped one's the photograph's (x 300)
    assert heat[150, 220] > 0.9 and heat[150, 300] > 0.9
    assert heat[150, 260] < 0.5 * heat[150, 220]


def test_heatmaps_share_one_scale_so_faint_evidence_stays_faint() -> None:
    """Each map was stretched to 1 at its own peak: a grade-0 photograph's faint evidence showed
    as red as a grade-4 lesion. Below HEATMAP_FULL_SCALE (grade units) a map is shown in
    proportion; at or above it, stretched to 1 at its peak."""
    from ml.inference.ensemble import HEATMAP_FULL_SCALE

    ens, photo = _two_geometry_ensemble()
    faint = 0.4 * HEATMAP_FULL_SCALE  # each member's peak, weighed 1/2: 0.2 of full scale each
    heat = ens._heatmap([_blob(64, faint), _blob(128, faint)], photo)
    assert abs(float(heat.max()) - 0.2) < 0.02
    raw = ens.raw_heatmap([_blob(64, faint), _blob(128, faint)], photo)
    np.testing.assert_allclose(heat, raw / HEATMAP_FULL_SCALE, atol=1e-6)
    strong = ens._heatmap([_blob(64, 4 * HEATMAP_FULL_SCALE), _blob(128, 0.0)], photo)
    assert float(strong.max()) == 1.0
    nothing = ens._heatmap([_blob(64, 0.0), _blob(128, 0.0)], photo)
    assert float(nothing.max()) == 0.0


def test_a_camera_size_heatmap_is_drawn_at_most_2048_px_with_the_photographs_proportions() -> None:
    """The session-31 review: a camera-size PNG (decoded in full) cost ~380 MB and ~2 s to overlay."""
    import io as _io

    from PIL import Image as _Image

    from ml.inference.overlay import OVERLAY_MAX_SIDE, overlay_png

    photo = np.zeros((2592, 3888, 3), np.uint8)
    heat = np.zeros((2592, 3888), np.float64)
    heat[1000:1200, 2000:2300] = 1.0
    shown = _Image.open(_io.BytesIO(overlay_png(photo, heat)))
    assert shown.size == (OVERLAY_MAX_SIDE, 1365)
    pixels = np.asarray(shown)
    assert pixels[1100 * 1365 // 2592, 2150 * 2048 // 3888].max() > 0  # the hot spot, scaled
    assert pixels[100, 100].max() == 0
    small = _Image.open(_io.BytesIO(overlay_png(photo[:342, :512], heat[:342, :512])))
    assert small.size == (512, 342)  # smaller photographs keep their size
    with pytest.raises(ValueError, match="does not match"):  # not stretched to fit (the final read)
        overlay_png(photo, heat[:512, :512])
