"""Variables ``ml`` reads itself follow the settings' rule: empty counts as unset."""

from __future__ import annotations

from pathlib import Path

import pytest

from ml.inference.onnx_runtime import cache_dir


def test_an_empty_variable_counts_as_unset(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DRSCREEN_ONNX_CACHE", "")
    monkeypatch.setenv("DRSCREEN_VAR_DIR", " ")
    assert cache_dir() == Path("var") / "onnx"  # was Path("") (the current folder), then "onnx"
    monkeypatch.setenv("DRSCREEN_VAR_DIR", str(tmp_path))
    assert cache_dir() == tmp_path / "onnx"
    monkeypatch.setenv("DRSCREEN_ONNX_CACHE", str(tmp_path / "graphs"))
    assert cache_dir() == tmp_path / "graphs"


def test_evaluate_reads_an_empty_openvino_precision_as_auto(monkeypatch: pytest.MonkeyPatch) -> None:
    from ml import evaluation

    seen: list[str] = []

    class Stop(Exception):
        pass

    def load_model(ref: str | None, runtime: str, precision: str) -> None:
        seen.append(precision)
        raise Stop

    monkeypatch.setattr(evaluation, "read_labels", lambda path: [])
    monkeypatch.setattr(evaluation, "load_model", load_model)
    monkeypatch.setenv("DRSCREEN_OPENVINO_PRECISION", "")
    with pytest.raises(Stop):
        evaluation.evaluate(Path("labels.csv"), None, runtime="openvino")
    assert seen == ["auto"]
