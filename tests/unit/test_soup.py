"""Weight soups (ml/soup.py): the average of several runs' weights, written as a run folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ml.models import GradingNet, ModelSpec, build_model
from ml.preprocess import PreprocessConfig
from ml.release import load_checkpoint, save_checkpoint
from ml.soup import average_states, make_soup

SPEC = ModelSpec("mobilenetv2_100", "multitask", "cbam")


def test_average_states_means_floats_and_keeps_integer_buffers() -> None:
    a = {"w": torch.tensor([1.0, 3.0]), "n": torch.tensor(5)}
    b = {"w": torch.tensor([3.0, 5.0]), "n": torch.tensor(9)}
    soup = average_states([a, b])
    assert torch.equal(soup["w"], torch.tensor([2.0, 4.0]))
    assert int(soup["n"]) == 5


def test_average_states_refuses_mismatched_states() -> None:
    with pytest.raises(ValueError, match="other keys"):
        average_states([{"w": torch.zeros(2)}, {"v": torch.zeros(2)}])
    with pytest.raises(ValueError, match="shapes differ"):
        average_states([{"w": torch.zeros(2)}, {"w": torch.zeros(3)}])


DATA = Path(__file__).resolve().parents[3] / "shared" / "data"


def _run(folder: Path, model: GradingNet) -> Path:
    """A run folder as `drscreen train` leaves it; its config validates on 4 natural photographs."""
    config = {
        "seed": 1,
        "preprocess": {"size": 64},
        "data": {
            "natural_dir": str(DATA / "eyepacs-natural-512"),
            "cache_dir": str(folder.parent / "cache"),
            "limit_per_split": 4,
        },
    }
    save_checkpoint(folder / "best", model, PreprocessConfig(size=64), "m", "0.0.0", {"train_config": config})
    return folder


def test_soup_of_head_only_draws_averages_the_heads_and_keeps_the_backbone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two draws that share a backbone and differ in their heads, as a head-only stage leaves them;
    the runs are recorded relative to the working directory (no machine's absolute path)."""
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    first = build_model(SPEC)
    second = build_model(SPEC)
    second.backbone.load_state_dict(first.backbone.state_dict())
    runs = [_run(tmp_path / "a", first), _run(tmp_path / "b", second)]
    out = make_soup(runs, tmp_path / "soup")
    soup, pre, config = load_checkpoint(out / "best")
    assert pre.size == 64 and config["metadata"]["soup_of"] == ["a", "b"]
    assert config["metadata"]["soup_backbone_max_abs_diff"] == 0.0
    got = soup.state_dict()
    for key, value in first.state_dict().items():
        expected = (value + second.state_dict()[key]) / 2 if value.is_floating_point() else value
        assert torch.allclose(got[key], expected), key
    assert not torch.equal(got["cls_head.weight"], first.state_dict()["cls_head.weight"])
    assert json.loads((out / "config.json").read_text())["seed"] == 1
    # measured as a trained member is (ml.training.train.member_metrics), on its runs' split
    metrics = config["metadata"]["metrics"]
    assert set(metrics) == {"natural_val_qwk_default_thresholds", "natural_val_referable_auc"}
    assert metrics["natural_val_qwk_default_thresholds"] is not None


def test_soup_records_a_backbone_that_moved(tmp_path: Path) -> None:
    torch.manual_seed(0)
    runs = [_run(tmp_path / "a", build_model(SPEC)), _run(tmp_path / "b", build_model(SPEC))]
    out = make_soup(runs, tmp_path / "soup")
    assert json.loads((out / "best" / "metadata.json").read_text())["soup_backbone_max_abs_diff"] > 0


def test_soup_refuses_runs_of_different_architectures(tmp_path: Path) -> None:
    runs = [
        _run(tmp_path / "a", build_model(SPEC)),
        _run(tmp_path / "b", build_model(ModelSpec("mobilenetv2_100", "regression", "cbam"))),
    ]
    with pytest.raises(ValueError, match="architecture"):
        make_soup(runs, tmp_path / "soup")
