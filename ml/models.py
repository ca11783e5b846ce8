"""The one factory that builds every network, for training and for inference alike.

A model is a timm backbone (features only, global pooled) followed by an optional attention
block on the last feature map and a grading head. Heads:
- ``classification``: 5 logits, cross-entropy.
- ``regression``: one continuous grade, thresholds turn it into 0..4 (strong for QWK).
- ``ordinal``: 4 cumulative logits P(grade > k) (CORAL-style).
- ``multitask``: all three from the same features (the APTOS winners' recipe); the grade
  distribution used at inference is the average of the three heads' distributions.
Every head exposes ``grade_probabilities`` so an ensemble can combine members uniformly.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import nn

from ml.pretrained import load_imagenet_weights

NUM_GRADES = 5
HEADS = ("classification", "regression", "ordinal", "multitask")
ATTENTIONS = ("none", "se", "cbam")


@dataclass(frozen=True)
class ModelSpec:
    arch: str = "tf_efficientnet_lite0"
    head: str = "regression"
    attention: str = "none"
    dropout: float = 0.2

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        return cls(**{k: data[k] for k in ("arch", "head", "attention", "dropout") if k in data})


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(8, channels // reduction)
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.fc2 = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = x.mean((2, 3), keepdim=True)
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(w))))


class CBAM(nn.Module):
    """Channel attention (SE on avg+max) followed by spatial attention (7x7 conv)."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(8, channels // reduction)
        self.mlp = nn.Sequential(nn.Conv2d(channels, hidden, 1), nn.ReLU(), nn.Conv2d(hidden, channels, 1))
        self.spatial = nn.Conv2d(2, 1, 7, padding=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        avg = self.mlp(x.mean((2, 3), keepdim=True))
        mx = self.mlp(x.amax((2, 3), keepdim=True))
        x = x * torch.sigmoid(avg + mx)
        s = torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.spatial(s))


def regression_to_probabilities(score: torch.Tensor, sharpness: float = 2.0) -> torch.Tensor:
    """A soft grade distribution around a regressed score (peaks at the nearest grade)."""
    grades = torch.arange(NUM_GRADES, device=score.device, dtype=score.dtype)
    return torch.softmax(-sharpness * (score.unsqueeze(-1) - grades) ** 2, dim=-1)


def ordinal_to_probabilities(logits: torch.Tensor) -> torch.Tensor:
    """P(grade > k) for k=0..3 -> P(grade = k) for k=0..4, kept monotone."""
    above = torch.sigmoid(logits)
    # running minimum written out (4 columns): same values as torch.cummin, which ONNX lacks
    running = [above[..., :1]]
    for k in range(1, above.shape[-1]):
        running.append(torch.minimum(running[-1], above[..., k : k + 1]))
    above = torch.cat(running, dim=-1)
    ones = torch.ones_like(above[..., :1])
    zeros = torch.zeros_like(above[..., :1])
    cumulative = torch.cat([ones, above, zeros], dim=-1)
    return (cumulative[..., :-1] - cumulative[..., 1:]).clamp_min(0)


class GradingNet(nn.Module):
    """Backbone + attention + head. ``forward`` returns a dict of raw head outputs."""

    def __init__(self, spec: ModelSpec, pretrained: bool = False) -> None:
        super().__init__()
        if spec.head not in HEADS:
            raise ValueError(f"unknown head {spec.head!r}; choose from {HEADS}")
        if spec.attention not in ATTENTIONS:
            raise ValueError(f"unknown attention {spec.attention!r}; choose from {ATTENTIONS}")
        self.spec = spec
        backbone = timm.create_model(spec.arch, pretrained=False, num_classes=1000)
        if pretrained:
            load_imagenet_weights(backbone, spec.arch)
        backbone.reset_classifier(0, global_pool="")  # type: ignore[operator]  # timm models define it
        self.backbone = backbone
        channels = int(backbone.num_features)  # type: ignore[arg-type]
        self.attention: nn.Module = (
            SqueezeExcite(channels)
            if spec.attention == "se"
            else CBAM(channels)
            if spec.attention == "cbam"
            else nn.Identity()
        )
        self.dropout = nn.Dropout(spec.dropout)
        self.cls_head = (
            nn.Linear(channels, NUM_GRADES) if spec.head in ("classification", "multitask") else None
        )
        self.reg_head = nn.Linear(channels, 1) if spec.head in ("regression", "multitask") else None
        self.ord_head = nn.Linear(channels, NUM_GRADES - 1) if spec.head in ("ordinal", "multitask") else None
        if self.reg_head is not None:
            # start regression near the mean grade of a screening population
            nn.init.zeros_(self.reg_head.weight)
            nn.init.constant_(self.reg_head.bias, 0.5)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Last feature map (after attention): the layer Grad-CAM looks at."""
        fmap: torch.Tensor = self.backbone.forward_features(x)  # type: ignore[operator]
        return self.attention(fmap)

    def heads(self, fmap: torch.Tensor) -> dict[str, torch.Tensor]:
        pooled = self.dropout(fmap.mean((2, 3)))
        out: dict[str, torch.Tensor] = {}
        if self.cls_head is not None:
            out["logits"] = self.cls_head(pooled)
        if self.reg_head is not None:
            out["score"] = self.reg_head(pooled).squeeze(-1)
        if self.ord_head is not None:
            out["ordinal"] = self.ord_head(pooled)
        return out

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.heads(self.features(x))


def grade_probabilities(outputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Combine whatever heads a model has into one (N, 5) grade distribution."""
    parts = []
    if "logits" in outputs:
        parts.append(torch.softmax(outputs["logits"], dim=-1))
    if "score" in outputs:
        parts.append(regression_to_probabilities(outputs["score"]))
    if "ordinal" in outputs:
        parts.append(ordinal_to_probabilities(outputs["ordinal"]))
    return torch.stack(parts).mean(0)


def expected_grade(outputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """A continuous grade per image: the regression score when present, else E[grade]."""
    if "score" in outputs:
        return outputs["score"]
    grades = torch.arange(NUM_GRADES, dtype=torch.float32, device=next(iter(outputs.values())).device)
    return (grade_probabilities(outputs) * grades).sum(-1)


def build_model(spec: ModelSpec, pretrained: bool = False) -> GradingNet:
    """The factory: training passes pretrained=True, inference loads a release's weights."""
    return GradingNet(spec, pretrained=pretrained)
