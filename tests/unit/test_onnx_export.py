"""ONNX export of the dev ensemble: probabilities within 1e-3 of PyTorch, the same grades."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from ml.inference import load_ensemble
from ml.onnx_export import PARITY_TOL, export_onnx
from ml.training.data import Sample, read_labels

NATURAL = Path("/work/shared/data/eyepacs-natural-512")
DEV = "drscreen-dev@0.1.0"


def _photos(n: int) -> list[Sample]:
    if not (NATURAL / "labels.csv").exists():
        pytest.skip("natural-colour photographs not available")
    return read_labels(NATURAL)[:n]


def test_export_parity_on_dev_ensemble(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DRSCREEN_ONNX_CACHE", str(tmp_path / "onnx"))
    report = export_onnx(DEV, None, quantize=False, val=_photos(16), report_dir=tmp_path / "docs")
    parity = report["parity"]
    assert parity["ok"]
    assert parity["max_abs_probability_diff"] <= PARITY_TOL
    assert parity["grades_changed"] == 0
    assert report["opset"] >= 17
    assert (tmp_path / "docs" / "onnx-report-drscreen-dev-0.1.0.json").exists()
    assert all(Path(p).exists() for p in report["members"].values())


def test_onnx_runtime_ensemble_matches_torch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """load_ensemble(runtime="onnx") exports on demand and predicts what PyTorch predicts; the
    PyTorch members stay in eval mode afterwards (Grad-CAM uses them)."""
    from ml.training.data import load_rgb

    monkeypatch.setenv("DRSCREEN_ONNX_CACHE", str(tmp_path / "onnx"))
    images = [load_rgb(s.path) for s in _photos(6)]
    torch_ens = load_ensemble(DEV)
    onnx_ens = load_ensemble(DEV, runtime="onnx", threads=1)
    assert all(not m.model.training for m in onnx_ens._members)
    a, b = torch_ens.predict(images), onnx_ens.predict(images)
    assert [p.grade for p in a] == [p.grade for p in b]
    diff = np.abs(np.array([p.probabilities for p in a]) - np.array([p.probabilities for p in b]))
    assert diff.max() <= PARITY_TOL
