"""The weight average kept by ``StageConfig.ema_decay``."""

from __future__ import annotations

import pytest
import torch

from ml.training.ema import WeightAverage


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))


def test_update_moves_the_average_by_the_ramped_decay() -> None:
    net = _net()
    average = WeightAverage(net, decay=0.9)
    start = net[0].weight.detach().clone()
    with torch.no_grad():
        net[0].weight.add_(1.0)
    average.update(net)  # first update: decay min(0.9, 1/10) = 0.1
    assert torch.allclose(average.state["0.weight"], start + 0.9)
    with torch.no_grad():
        net[0].weight.add_(1.0)
    average.update(net)  # second: min(0.9, 2/11)
    keep = 2 / 11
    assert torch.allclose(average.state["0.weight"], keep * (start + 0.9) + (1 - keep) * (start + 2.0))
    assert average.updates == 2 and average.current_decay() == pytest.approx(3 / 12)


def test_integer_buffers_are_copied_not_averaged() -> None:
    net = _net()
    average = WeightAverage(net, decay=0.5)
    net.train()
    for _ in range(3):
        net(torch.randn(4, 3))
        average.update(net)
    assert int(average.state["1.num_batches_tracked"]) == 3
    # the running mean is averaged: it differs from the live one after the live one moved
    assert not torch.equal(average.state["1.running_mean"], net[1].running_mean)


def test_swapped_in_restores_the_live_weights_even_after_an_error() -> None:
    net = _net()
    average = WeightAverage(net, decay=0.5)
    with torch.no_grad():
        net[0].weight.mul_(3.0)
    live = net[0].weight.detach().clone()
    with pytest.raises(RuntimeError), average.swapped_in(net):
        assert torch.equal(net[0].weight, average.state["0.weight"])
        raise RuntimeError("validation failed")
    assert torch.equal(net[0].weight, live)


def test_snapshot_is_a_copy() -> None:
    net = _net()
    average = WeightAverage(net, decay=0.5)
    snap = average.snapshot()
    with torch.no_grad():
        net[0].weight.add_(1.0)
    average.update(net)
    assert not torch.equal(snap["0.weight"], average.state["0.weight"])


@pytest.mark.parametrize("decay", [0.0, 1.0, -0.1])
def test_decay_outside_the_open_interval_is_refused(decay: float) -> None:
    with pytest.raises(ValueError, match="ema_decay"):
        WeightAverage(_net(), decay)
