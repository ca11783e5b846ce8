"""An exponential moving average of a network's weights, validated and kept in place of the
live weights (``StageConfig.ema_decay``).

Why: the stage-1 checkpoint a member ends with moves its natural-colour QWK by as much as the
natural-stage seed does (docs/experiments.md, session 11); averaging the weights along the
last few hundred optimiser steps is the usual way to make a run's end point steadier.
BatchNorm statistics are averaged too, so the averaged network is self-consistent.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


class WeightAverage:
    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        if not 0 < decay < 1:
            raise ValueError(f"ema_decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.updates = 0
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def current_decay(self) -> float:
        # early on the average would be mostly the starting weights: ramp the decay up
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        """Fold the model's present weights into the average (call after each optimiser step)."""
        keep = self.current_decay()
        for name, value in model.state_dict().items():
            avg = self.state[name]
            if avg.is_floating_point():
                avg.lerp_(value.detach(), 1 - keep)
            else:  # counters such as BatchNorm's num_batches_tracked
                avg.copy_(value)
        self.updates += 1

    @contextmanager
    def swapped_in(self, model: torch.nn.Module) -> Iterator[None]:
        """Run the block with the averaged weights in ``model``; the live weights come back after."""
        live = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model.load_state_dict(self.state)
        try:
            yield
        finally:
            model.load_state_dict(live)

    def snapshot(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.state.items()}
