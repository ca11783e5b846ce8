"""Losses for each head; a multitask model sums them."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ml.training.config import LossConfig


def grading_loss(
    outputs: dict[str, torch.Tensor], grades: torch.Tensor, cfg: LossConfig, class_weight: torch.Tensor | None
) -> torch.Tensor:
    total = torch.zeros((), device=grades.device)
    if "logits" in outputs:
        total = total + cfg.classification_weight * F.cross_entropy(
            outputs["logits"], grades, weight=class_weight
        )
    if "score" in outputs:
        total = total + cfg.regression_weight * F.smooth_l1_loss(outputs["score"], grades.float())
    if "ordinal" in outputs:
        levels = torch.arange(outputs["ordinal"].shape[-1], device=grades.device)
        above = (grades.unsqueeze(-1) > levels).float()
        total = total + cfg.ordinal_weight * F.binary_cross_entropy_with_logits(outputs["ordinal"], above)
    return total
