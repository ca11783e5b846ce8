"""ONNX Runtime ensembles load no PyTorch network (nor torch itself), heatmaps included.

Uses the small dev ensemble; ``DRSCREEN_TEST_MODEL`` / ``DRSCREEN_TEST_MODELS_DIR`` point it
elsewhere, as in the API tests.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from ml.inference import load_ensemble

PHOTOS = Path("/work/shared/data/eyepacs-natural-512/images")
MODEL = os.environ.get("DRSCREEN_TEST_MODEL", "drscreen-dev@0.1.0")
_DIR = os.environ.get("DRSCREEN_TEST_MODELS_DIR")
MODELS_DIR = Path(_DIR) if _DIR else None
ROOT = Path(__file__).resolve().parents[2]


def _photos(n: int) -> list[np.ndarray]:
    from ml.imageio import decode_image

    paths = sorted(PHOTOS.glob("*.jpg"))[:n]
    if len(paths) < n:
        pytest.skip("natural-colour photographs not available")
    return [decode_image(p.read_bytes()) for p in paths]


def _networks() -> int:
    from ml.models import GradingNet

    gc.collect()
    return sum(issubclass(type(o), GradingNet) for o in gc.get_objects())  # type(): no __class__ lookups


def test_onnx_predict_and_explain_leave_pytorch_members_unloaded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DRSCREEN_ONNX_CACHE", str(tmp_path / "onnx"))
    images = _photos(4)
    before = _networks()
    # the cache is empty: loading exports every member (in a child process)
    ens = load_ensemble(MODEL, MODELS_DIR, runtime="onnx", threads=1)
    preds = ens.predict(images)
    assert not any(m.loaded for m in ens.member_objects)
    assert _networks() == before

    reference = load_ensemble(MODEL, MODELS_DIR).predict(images)  # PyTorch, loaded eagerly
    assert [p.grade for p in preds] == [p.grade for p in reference]
    diff = np.abs(np.array([p.probabilities for p in preds]) - np.array([p.probabilities for p in reference]))
    assert diff.max() <= 1e-3

    # a second ensemble in the process shares the arena registered by the first (registered once)
    again = load_ensemble(MODEL, MODELS_DIR, runtime="onnx", threads=2).predict(images)
    assert [p.probabilities for p in again] == [p.probabilities for p in preds]

    # heatmaps come from the feature maps the same graphs output, and equal PyTorch's Grad-CAM
    heatmap = ens.explain(images[0])
    assert not any(m.loaded for m in ens.member_objects)
    assert _networks() == before
    expected = load_ensemble(MODEL, MODELS_DIR).explain(images[0])
    assert heatmap.shape == expected.shape == images[0].shape[:2]
    assert expected.max() > 0.5 and np.abs(heatmap - expected).max() <= 1e-4

    # asked for, predict draws them from its own forward pass: the same maps, the same grades
    drawn = ens.predict(images, heatmaps=[True, False, True, False])
    assert [p.probabilities for p in drawn] == [p.probabilities for p in preds]
    assert [p.heatmap is None for p in drawn] == [False, True, False, True]
    assert drawn[0].heatmap is not None and drawn[2].heatmap is not None
    assert np.abs(drawn[0].heatmap - heatmap).max() <= 1e-6
    assert np.abs(drawn[2].heatmap - ens.explain(images[2])).max() <= 1e-6
    assert not any(m.loaded for m in ens.member_objects)


def test_a_damaged_or_unsealed_cached_graph_is_exported_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A cached graph was trusted by its file name: a half-written, damaged or hand-copied one
    under the right name was served. Graphs are sealed (sha256 beside them) when written."""
    from ml.inference.onnx_runtime import OnnxMembers, onnx_path_for
    from ml.release import read_manifest

    monkeypatch.setenv("DRSCREEN_ONNX_CACHE", str(tmp_path / "onnx"))
    images = _photos(2)
    expected = [p.probabilities for p in load_ensemble(MODEL, MODELS_DIR, runtime="onnx").predict(images)]
    refs = [m["ref"] for m in read_manifest(MODEL, MODELS_DIR)["members"]]
    graph = onnx_path_for(refs[0], MODELS_DIR)
    assert Path(f"{graph}.sha256").is_file()
    for damage in ("flip", "unseal"):
        if damage == "flip":
            data = bytearray(graph.read_bytes())
            data[len(data) // 2] ^= 0xFF  # one flipped byte in a weight: still a loadable graph
            graph.write_bytes(bytes(data))
        else:
            Path(f"{graph}.sha256").unlink()
        caplog.clear()
        again = [p.probabilities for p in load_ensemble(MODEL, MODELS_DIR, runtime="onnx").predict(images)]
        assert again == expected, damage
        assert any("exporting" in r.getMessage() and "seal" in r.getMessage() for r in caplog.records)
    # an int8 graph is written only by `drscreen export onnx --quantize`: unsealed, it is refused
    int8 = onnx_path_for(refs[0], MODELS_DIR, quantized=True)
    int8.write_bytes(graph.read_bytes())
    with pytest.raises(FileNotFoundError, match=r"no .sha256 seal.*--quantize"):
        OnnxMembers.load(tmp_path, refs[:1], MODELS_DIR, quantized=True)


def test_onnx_worker_process_never_imports_torch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What the memory figure rests on: loading (exporting the missing ONNX files, here the cache is
    empty), predicting and drawing a heatmap import neither torch nor timm."""
    monkeypatch.setenv("DRSCREEN_ONNX_CACHE", str(tmp_path / "onnx"))
    images = _photos(2)
    np.save(tmp_path / "images.npy", np.stack([images[0], images[0]]))
    script = textwrap.dedent(
        f"""
        import sys
        import numpy as np
        from ml.inference import load_ensemble
        import workers.tasks  # everything a pool child imports
        models_dir = {str(MODELS_DIR)!r} if {MODELS_DIR is not None} else None
        ens = load_ensemble({MODEL!r}, models_dir, runtime="onnx", threads=1)
        images = list(np.load({str(tmp_path / "images.npy")!r}))
        ens.predict(images)
        print(sorted(m for m in ("torch", "timm") if m in sys.modules))
        ens.explain(images[0])
        ens.predict(images, heatmaps=[True, True])
        print(sorted(m for m in ("torch", "timm") if m in sys.modules))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300, check=True
    )
    assert out.stdout.split("\n")[:2] == ["[]", "[]"]


def test_torch_is_held_to_the_thread_share_even_if_imported_first() -> None:
    """Grad-CAM or another module may import torch before a member loads its network; the
    worker's share of the cores must still apply (else pool children oversubscribe the cores)."""
    import torch

    from ml.inference.ensemble import _import_torch

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        _import_torch(1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
