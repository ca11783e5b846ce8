"""The figure-computing parts of ``drscreen bench`` (the timed runs themselves are not tested)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

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
    machine = figures["machine"]  # what the figures depend on besides the code
    assert machine["cpus_usable"] >= 1 and machine["photos_distinct"] == 1
    assert set(machine["versions"]) == {"torch", "onnxruntime", "openvino"}
    assert "cpu_model" in machine and "commit" in machine and "photo_long_side_px" in machine


def test_a_figure_that_could_not_be_measured_is_null_in_strict_json(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """images_per_second of a zero duration is inf, and json.dumps wrote `Infinity` (not JSON)."""
    monkeypatch.setattr(bench, "photo_sources", lambda: [Path("x.jpeg")])
    monkeypatch.setattr(bench, "forward_figures", lambda plan, sources, log: _forward(inf=True))
    monkeypatch.setattr(bench, "service_figures", lambda plan, sources, log: _service())
    assert bench.run_bench(True, quick=True) == 0
    figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1], parse_constant=_refuse)
    assert figures["forward_ips_torch"] is None and figures["e2e_over_forward"] == 0.0


def _refuse(name: str) -> None:
    raise AssertionError(f"{name} in the JSON line")


def _forward(inf: bool = False) -> dict[str, float]:
    figures = dict.fromkeys(
        ["forward_ips_onnx", "forward_ips_openvino", "forward_ips_torch_bf16", "latency_ms_torch_b1",
         "latency_ms_onnx_b1", "latency_ms_openvino_b1", "explain_forward_passes",
         "explain_forward_passes_onnx", "explain_forward_passes_openvino"],
        10.0,
    )  # fmt: skip
    figures["forward_ips_torch"] = float("inf") if inf else 10.0
    return figures


def _service() -> dict[str, float | str]:
    return {"runtime": "torch", "e2e_ips": 5.0, "e2e_ips_explain": 1.0, "scaling_ratio": 1.0,
            "worker_rss_mb": 900.0, "api_p95_ms": 500.0}  # fmt: skip


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
    few = tmp_path / "few"
    few.mkdir()
    for path in sorted(samples.rglob("*.jpg"))[:3]:
        (few / path.name).write_bytes(path.read_bytes())
    with pytest.raises(SystemExit, match=r"3 photographs under .*few.*at least 8 needed"):
        bench.photo_sources(few)  # a batch of 8 of 3 photographs was divided by 8 all the same


class _JobClient:
    """Stands for the API: the job it was given ends as ``final``."""

    def __init__(self, final: dict[str, object]) -> None:
        self.final = final

    def post(self, path: str, json: object) -> Any:
        return _Reply({"id": "j1"})

    def get(self, path: str) -> Any:
        return _Reply(self.final)


class _Reply:
    def __init__(self, body: dict[str, object]) -> None:
        self.body = body

    def raise_for_status(self) -> None:
        return None

    def json(self) -> dict[str, object]:
        return self.body


@pytest.mark.parametrize(
    "final",
    [
        {"status": "failed", "done": 0, "failed": 0},  # a refused folder, an expansion that died
        {"status": "done", "done": 3, "failed": 0},  # fewer photographs graded than sent
        {"status": "done", "done": 3, "failed": 1},
    ],
)
def test_a_job_that_did_not_grade_every_photograph_gives_no_figure(
    tmp_path: Path, final: dict[str, object]
) -> None:
    """The bench review (session 30): a job `failed` with no failed photograph was timed as a
    finished one, so a few photographs' time would have read as the whole job's images/s."""
    for i in range(4):
        (tmp_path / f"p{i}_left.jpeg").write_bytes(b"x")
    with pytest.raises(RuntimeError, match="no figure from it"):
        bench.run_job(None, _JobClient(final), tmp_path, explain=False, timeout=5)  # type: ignore[arg-type]
    done = {"status": "done", "done": 4, "failed": 0}
    assert bench.run_job(None, _JobClient(done), tmp_path, explain=False, timeout=5) >= 0  # type: ignore[arg-type]


def test_the_machine_is_described_without_git(monkeypatch: pytest.MonkeyPatch) -> None:
    """The review of session 30: with no git binary (the worker image), the commit lookup raised
    and the bench printed no figure at all."""
    import subprocess

    def no_git(*args: object, **kwargs: object) -> None:
        raise FileNotFoundError("git")

    monkeypatch.setattr(subprocess, "run", no_git)
    samples = Path(__file__).resolve().parents[2] / "samples"
    machine = bench.machine_description(sorted(samples.rglob("*.jpg")))
    assert machine["commit"] is None and machine["photo_long_side_px"] == 512
