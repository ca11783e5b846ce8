"""The figure-computing parts of ``drscreen bench`` (the timed runs themselves are not tested)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cli import bench
from ml.imageio import decode_image
from ml.inference.openvino_runtime import bf16_kernels
from workers.naming import match_name


def _jpeg() -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (80, 96, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def test_distinct_jpeg_same_pixels_other_bytes() -> None:
    data = _jpeg()
    a, b = bench.distinct_jpeg(data, "a-1"), bench.distinct_jpeg(data, "a-2")
    assert len({data, a, b}) == 3
    assert np.array_equal(decode_image(a), decode_image(data))
    assert np.array_equal(decode_image(b), decode_image(data))
    with pytest.raises(ValueError):
        bench.distinct_jpeg(b"\x89PNG....", "x")


def test_make_folder_names_match_the_eyepacs_rule(tmp_path: Path) -> None:
    src = tmp_path / "src.jpeg"
    src.write_bytes(_jpeg())
    folder = bench.make_folder(tmp_path / "job", [src], 5, "t")
    files = sorted(folder.iterdir())
    assert len(files) == 5 and len({f.read_bytes() for f in files}) == 5
    matches = [match_name(f.name) for f in files]
    assert all(m is not None for m in matches)
    assert {(m.patient_id, m.eye) for m in matches if m} >= {("tp0", "left"), ("tp0", "right")}


def test_figures() -> None:
    assert bench.images_per_second(10, 2.0) == 5.0
    assert bench.scaling_ratio((100, 10.0), (1000, 110.0)) == pytest.approx(1.1)
    values = [float(v) for v in range(1, 101)]
    assert bench.percentile(values, 95) == 95.0
    assert bench.percentile(values, 50) == 50.0
    assert bench.percentile([3.0], 95) == 3.0
    assert bench.QUICK.e2e_images < bench.Plan().e2e_images
    assert bench.Plan().e2e_images >= 200 and bench.Plan().scaling_large == 1000
    assert bench.Plan().api_requests == 100 and bench.Plan().api_clients == 4


def test_json_line_holds_every_figure(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """run_bench's last line is one JSON object with the contract's keys (measurements stubbed)."""
    keys = {
        "forward_ips_torch": 10.0,
        "forward_ips_onnx": 40.0,
        "latency_ms_torch_b1": 100.0,
        "latency_ms_onnx_b1": 20.0,
        "forward_ips_openvino": 70.0,
        "forward_ips_torch_bf16": 25.0,
        "latency_ms_openvino_b1": 12.0,
        "explain_forward_passes": 1.1,
        "explain_forward_passes_onnx": 1.7,
        "explain_forward_passes_openvino": 1.8,
    }
    service = {
        "runtime": "onnx",
        "e2e_ips": 35.0,
        "e2e_ips_explain": 5.0,
        "scaling_ratio": 1.0,
        "worker_rss_mb": 900.0,
        "api_p95_ms": 500.0,
    }
    monkeypatch.setattr(bench, "photo_sources", lambda: [Path("x.jpeg")])
    monkeypatch.setattr(bench, "forward_figures", lambda plan, sources, log: dict(keys))
    monkeypatch.setattr(bench, "service_figures", lambda plan, sources, log: dict(service))
    assert bench.run_bench(True, quick=True) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    figures = json.loads(line)
    for key in [*keys, *service]:
        assert isinstance(figures[key], (int, float, str)), key
    assert figures["e2e_over_forward"] == pytest.approx(35.0 / 40.0)
    assert figures["quick"] is True


def test_e2e_is_compared_with_the_forward_pass_of_the_runtime_in_use() -> None:
    assert bench.forward_key("onnx") == "forward_ips_onnx"
    assert bench.forward_key("openvino") == "forward_ips_openvino"
    assert bench.forward_key("torch") == "forward_ips_torch"


def test_runtime_figures_are_the_median_of_fresh_processes() -> None:
    runs = [
        {"forward_ips": 40.6, "latency_ms_b1": 24.0, "precision": {"a@1": "bf16"}},
        {"forward_ips": 64.9, "latency_ms_b1": 27.0, "precision": {"a@1": "bf16"}},
        {"forward_ips": 60.0, "latency_ms_b1": 20.0, "precision": {"a@1": "bf16"}},
    ]
    for run, (ms, passes) in zip(runs, [(60.0, 2.0), (50.0, 1.8), (70.0, 2.4)], strict=True):
        run.update(explain_ms=ms, explain_forward_passes=passes)
        run.update(explain_in_pass_ms=ms / 2, explain_in_pass_forward_passes=passes / 2)
    out = bench.summarise_runtime_runs("openvino", runs)
    assert out["forward_ips_openvino"] == 60.0
    assert out["forward_ips_openvino_runs"] == [40.6, 64.9, 60.0]
    assert out["latency_ms_openvino_b1"] == 24.0
    assert out["openvino_precision"] == {"a@1": "bf16"}
    assert out["bf16_kernels"] == bf16_kernels()  # whose verdict chose those precisions
    assert out["explain_ms_openvino"] == 60.0 and out["explain_forward_passes_openvino"] == 2.0
    assert out["explain_in_pass_ms_openvino"] == 30.0
    assert out["explain_in_pass_forward_passes_openvino"] == 1.0
    assert "openvino_precision" not in bench.summarise_runtime_runs("onnx", runs)
    assert "bf16_kernels" not in bench.summarise_runtime_runs("onnx", runs)
    assert bench.Plan().runtime_processes >= 3


def test_photo_sources_reads_subfolders_and_names_a_missing_folder(tmp_path: Path) -> None:
    """The README review: a missing folder was a FileNotFoundError traceback, and `samples/`
    (a subfolder per patient) had "no photographs"."""
    samples = Path(__file__).resolve().parents[2] / "samples"
    assert len(bench.photo_sources(samples)) == len(list(samples.rglob("*.jpg")))
    with pytest.raises(SystemExit, match=r"no photographs under .*nowhere"):
        bench.photo_sources(tmp_path / "nowhere")
