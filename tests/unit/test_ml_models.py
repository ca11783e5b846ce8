"""The model factory, heads, offline ImageNet weights and release round trips."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ml.inference.combine import CombineRule, combine, grade_from_probabilities
from ml.models import ModelSpec, build_model, grade_probabilities, ordinal_to_probabilities
from ml.preprocess import PreprocessConfig
from ml.release import load_checkpoint, save_checkpoint


@pytest.mark.parametrize("head", ["classification", "regression", "ordinal", "multitask"])
@pytest.mark.parametrize("attention", ["none", "se", "cbam"])
def test_every_head_gives_a_grade_distribution(head: str, attention: str) -> None:
    model = build_model(ModelSpec("mobilenetv2_100", head, attention)).eval()
    with torch.no_grad():
        probs = grade_probabilities(model(torch.randn(2, 3, 64, 64)))
    assert probs.shape == (2, 5)
    assert torch.allclose(probs.sum(-1), torch.ones(2), atol=1e-5)


def test_ordinal_probabilities_are_valid_even_for_non_monotone_logits() -> None:
    p = ordinal_to_probabilities(torch.tensor([[3.0, -2.0, 1.0, -4.0]]))
    assert (p >= 0).all() and torch.allclose(p.sum(), torch.tensor(1.0))


@pytest.mark.parametrize(
    ("arch", "mean"),
    [("tf_efficientnet_lite0", (0.5, 0.5, 0.5)), ("mobilenetv2_100", (0.485, 0.456, 0.406))],
)
def test_offline_imagenet_weights_recognise_a_real_photo(arch: str, mean: tuple[float, ...]) -> None:
    """scikit-image's 'chelsea' is a tabby cat: the top-5 must hold a cat class (281-285)."""
    import timm
    from PIL import Image
    from skimage import data

    from ml.pretrained import load_imagenet_weights

    model = timm.create_model(arch, pretrained=False).eval()
    load_imagenet_weights(model, arch)
    std = (0.5, 0.5, 0.5) if mean[0] == 0.5 else (0.229, 0.224, 0.225)
    x = np.asarray(Image.fromarray(data.chelsea()).resize((224, 224)), dtype=np.float32) / 255
    x = (x - np.array(mean)) / np.array(std)
    with torch.no_grad():
        top5 = model(torch.from_numpy(x.transpose(2, 0, 1)).float()[None]).topk(5).indices[0].tolist()
    assert set(top5) & set(range(281, 286)), top5


def test_checkpoint_round_trip_is_exact(tmp_path: Path) -> None:
    model = build_model(ModelSpec("mobilenetv2_100", "multitask", "se")).eval()
    pre = PreprocessConfig(size=64, enhancements=("clahe",))
    folder = save_checkpoint(tmp_path / "m", model, pre, "t", "0.0.1", {"metrics": {"qwk": 0.5}})
    loaded, pre2, config = load_checkpoint(folder)
    assert pre2 == pre and config["metadata"]["metrics"]["qwk"] == 0.5
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        a, b = grade_probabilities(model(x)), grade_probabilities(loaded(x))
    assert torch.equal(a, b)


def test_tampered_weights_are_refused(tmp_path: Path) -> None:
    model = build_model(ModelSpec("mobilenetv2_100", "regression"))
    folder = save_checkpoint(tmp_path / "m", model, PreprocessConfig(size=64), "t", "0.0.1", {})
    raw = bytearray((folder / "model.safetensors").read_bytes())
    raw[-1] ^= 0xFF  # flip one byte of the last tensor
    (folder / "model.safetensors").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="sha256"):
        load_checkpoint(folder)


def test_combination_rules() -> None:
    # two members, three images: member 0 sure of grade 0/2/4, member 1 of grade 1/2/3
    eye = np.eye(5)
    probs = np.stack([eye[[0, 2, 4]], eye[[1, 2, 3]]])
    avg = CombineRule("weighted_average", [1.0, 1.0])
    p, score, grade = combine(avg, probs)
    assert np.allclose(score, [0.5, 2.0, 3.5]) and grade.tolist() == [1, 2, 4]
    assert grade_from_probabilities(avg, p[1]) == 2
    vote = CombineRule("max_vote", [1.0, 1.0])
    assert combine(vote, probs)[2].tolist() == [1, 2, 4]  # ties go to the worse grade
    heavy = CombineRule("weighted_average", [3.0, 1.0])
    assert combine(heavy, probs)[1][0] == pytest.approx(0.25)
    with pytest.raises(ValueError):
        combine(CombineRule("median"), probs)
