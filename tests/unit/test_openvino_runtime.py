"""OpenVINO over the exported ONNX graphs (ml/inference/openvino_runtime.py), on the dev ensemble.
The export's OpenVINO check is tested with the export itself (tests/unit/test_onnx_export.py)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest

from ml.inference import load_ensemble
from ml.inference.onnx_runtime import onnx_path_for
from ml.inference.openvino_runtime import (
    VERDICT_FILE,
    OpenVinoSession,
    accepted_precisions,
    bf16_kernels,
    record_precisions,
)
from ml.training.data import load_rgb, read_labels

NATURAL = Path("/work/shared/data/eyepacs-natural-512")
DEV = "drscreen-dev@0.1.0"


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("DRSCREEN_ONNX_CACHE", str(tmp_path / "onnx"))
    return tmp_path / "onnx"


def _photos(n: int) -> list[np.ndarray]:
    if not (NATURAL / "labels.csv").exists():
        pytest.fail(f"natural-colour photographs missing at {NATURAL}")
    return [load_rgb(s.path) for s in read_labels(NATURAL)[:n]]


def test_openvino_f32_predicts_what_onnx_runtime_predicts(cache: Path) -> None:
    images = _photos(6)
    ort = load_ensemble(DEV, runtime="onnx", threads=1).predict(images)
    ens = load_ensemble(DEV, runtime="openvino", threads=1)  # precision auto: nothing accepted here
    assert isinstance(next(iter(ens.runtime.sessions.values())), OpenVinoSession)  # type: ignore[union-attr]
    assert next(iter(ens.runtime.sessions.values())).precision == "f32"  # type: ignore[union-attr]
    ov = ens.predict(images)
    assert [p.grade for p in ov] == [p.grade for p in ort]
    diff = np.abs(np.array([p.probabilities for p in ov]) - np.array([p.probabilities for p in ort]))
    assert diff.max() < 1e-4


def test_bf16_session_runs_and_stays_near_float32(cache: Path) -> None:
    load_ensemble(DEV, runtime="onnx", threads=1)  # exports the graph into the cache
    path = onnx_path_for("dev-mnv2-64@0.1.0", None)
    x = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)
    f32 = OpenVinoSession(path, "f32").run(["probabilities"], {"input": x})[0]
    bf16 = OpenVinoSession(path, "bf16").run(["probabilities"], {"input": x})[0]
    assert f32.shape == bf16.shape == (2, 5)
    assert np.allclose(bf16.sum(axis=1), 1, atol=1e-2) and np.abs(bf16 - f32).max() < 0.2
    with pytest.raises(ValueError, match="precision"):
        OpenVinoSession(path, "int4")


def test_bf16_is_served_only_for_the_graphs_the_check_accepted(tmp_path: Path) -> None:
    refs = ["dev-mnv2-64@0.1.0"]
    assert accepted_precisions(tmp_path, refs, None, "avx512_bf16") == {refs[0]: "f32"}
    record_precisions(tmp_path, None, {"precisions": {refs[0]: "bf16"}, "grades_changed": 0}, "avx512_bf16")
    assert accepted_precisions(tmp_path, refs, None, "avx512_bf16") == {refs[0]: "bf16"}
    record = json.loads((tmp_path / VERDICT_FILE).read_text())
    record["by_cpu"]["avx512_bf16"]["graphs"][refs[0]] = "dev-mnv2-64-0.1.0-0000000000000000-g2.onnx"
    (tmp_path / VERDICT_FILE).write_text(json.dumps(record))  # written for other weights
    assert accepted_precisions(tmp_path, refs, None, "avx512_bf16") == {refs[0]: "f32"}
    record_precisions(tmp_path, None, {"precisions": {refs[0]: "f32"}}, "avx512_bf16")  # nothing passed
    assert accepted_precisions(tmp_path, refs, None, "avx512_bf16") == {refs[0]: "f32"}


def test_a_bf16_verdict_holds_only_on_the_kind_of_cpu_it_was_measured_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """AMX and AVX-512 BF16 kernels give different numbers (1.6.0's mix: 0 validation grades
    changed on one, 1 on the other; all-bf16 4 on AMX): one deployment's workers may run on both,
    so a verdict is kept per kind of CPU and serves only there; a CPU with neither runs f32."""
    refs = ["dev-mnv2-64@0.1.0"]
    record_precisions(tmp_path, None, {"precisions": {refs[0]: "bf16"}}, "avx512_bf16")
    with caplog.at_level("WARNING"):
        assert accepted_precisions(tmp_path, refs, None, "amx_bf16") == {refs[0]: "f32"}
    assert "not on this one (amx_bf16)" in caplog.text and "drscreen export onnx" in caplog.text
    record_precisions(tmp_path, None, {"precisions": {refs[0]: "f32"}}, "amx_bf16")
    assert accepted_precisions(tmp_path, refs, None, "amx_bf16") == {refs[0]: "f32"}
    assert accepted_precisions(tmp_path, refs, None, "avx512_bf16") == {refs[0]: "bf16"}  # kept
    assert accepted_precisions(tmp_path, refs, None, None) == {refs[0]: "f32"}
    record_precisions(tmp_path, None, {"precisions": {refs[0]: "bf16"}}, None)  # nothing measured
    assert set(json.loads((tmp_path / VERDICT_FILE).read_text())["by_cpu"]) == {"amx_bf16", "avx512_bf16"}
    # a file from before verdicts were kept per CPU: not trusted on any
    (tmp_path / VERDICT_FILE).write_text(json.dumps({"precisions": {refs[0]: "bf16"}, "graphs": {}}))
    assert accepted_precisions(tmp_path, refs, None, "avx512_bf16") == {refs[0]: "f32"}


def test_a_bf16_verdict_holds_only_for_the_openvino_release_that_measured_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pyproject allowed any newer OpenVINO, whose bf16 kernels nobody measured: a verdict names
    its release, and another release (or none recorded) serves float32 and says why once."""
    from ml.inference import openvino_runtime

    refs = ["dev-mnv2-64@0.1.0"]
    record_precisions(tmp_path, None, {"precisions": {refs[0]: "bf16"}}, "avx512_bf16")
    measured = json.loads((tmp_path / VERDICT_FILE).read_text())["by_cpu"]["avx512_bf16"]["openvino"]
    assert measured == openvino_runtime.openvino_release() and measured.count(".") == 1
    assert accepted_precisions(tmp_path, refs, None, "avx512_bf16") == {refs[0]: "bf16"}
    monkeypatch.setattr(openvino_runtime, "openvino_release", lambda: "2099.1")
    with caplog.at_level("WARNING"):
        assert accepted_precisions(tmp_path, refs, None, "avx512_bf16") == {refs[0]: "f32"}
        assert accepted_precisions(tmp_path, refs, None, "avx512_bf16") == {refs[0]: "f32"}
    assert caplog.text.count(f"checked with OpenVINO {measured}, this is 2099.1") == 1
    record = json.loads((tmp_path / VERDICT_FILE).read_text())
    del record["by_cpu"]["avx512_bf16"]["openvino"]  # an export from before releases were recorded
    (tmp_path / VERDICT_FILE).write_text(json.dumps(record))
    monkeypatch.undo()
    assert accepted_precisions(tmp_path, refs, None, "avx512_bf16") == {refs[0]: "f32"}


def test_the_shipped_verdicts_were_measured_with_the_pinned_openvino() -> None:
    """A new OpenVINO pin without a re-run export would turn every shipped bf16 verdict off."""
    import tomllib

    from ml.inference.openvino_runtime import openvino_release
    from ml.release import ensemble_dir

    pin = next(
        d
        for d in tomllib.loads(Path("pyproject.toml").read_text())["project"]["optional-dependencies"]["ml"]
        if d.startswith("openvino")
    )
    for version in ("1.5.0", "1.6.0"):
        record = json.loads((ensemble_dir(f"drscreen-ensemble@{version}", None) / VERDICT_FILE).read_text())
        for kernels, verdict in record["by_cpu"].items():
            assert f">={verdict['openvino']}," in pin, (version, kernels, pin)
            assert verdict["openvino"] == openvino_release(), "installed OpenVINO is not the pinned release"


@pytest.mark.parametrize(
    ("flags", "kernels"),
    [
        ("fpu sse avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8", "amx_bf16"),
        ("fpu sse avx2 avx512f avx512_bf16 avx512_vnni", "avx512_bf16"),
        ("fpu sse avx2 fma", None),
    ],
)
def test_bf16_kernels_read_off_the_cpu_flags(flags: str, kernels: str | None) -> None:
    cpuinfo = f"processor\t: 0\nmodel name\t: x\nflags\t\t: {flags}\n\nprocessor\t: 1\n"
    assert bf16_kernels(cpuinfo) == kernels


def test_the_shipped_verdicts_name_the_cpus_they_were_measured_on() -> None:
    from ml.release import ensemble_dir

    for version in ("1.5.0", "1.6.0"):
        record = json.loads((ensemble_dir(f"drscreen-ensemble@{version}", None) / VERDICT_FILE).read_text())
        assert set(record["by_cpu"]) <= {"amx_bf16", "avx512_bf16"} and record["by_cpu"]
        for verdict in record["by_cpu"].values():
            assert verdict["figures"]["passes_criteria"]


def test_a_session_makes_its_first_call_while_loading(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """pybind11 sets up OpenVINO's NumPy bridge on the first call; two pool threads making that
    first call at once deadlocked a worker in the test suite (once in a few runs; 30 fresh
    processes here did not hit it). The remedy is a warm-up call in the loading thread: checked."""
    load_ensemble(DEV, runtime="onnx", threads=1)  # exports the graph into the cache
    calls: list[str] = []
    original = OpenVinoSession.run

    def counted(self: OpenVinoSession, names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        calls.append(threading.current_thread().name)
        return original(self, names, feeds)

    monkeypatch.setattr(OpenVinoSession, "run", counted)
    OpenVinoSession(onnx_path_for("dev-mnv2-64@0.1.0", None), "f32", threads=2)
    assert calls == [threading.current_thread().name]


def test_each_thread_keeps_its_request_and_results_are_not_overwritten(cache: Path) -> None:
    """Requests are kept per thread (a new one per call left the two pieces of a batch running one
    after the other in ~1 of 3 processes): threads must not share one, and a returned array must
    survive the same thread's next call."""
    load_ensemble(DEV, runtime="onnx", threads=1)
    session = OpenVinoSession(onnx_path_for("dev-mnv2-64@0.1.0", None), "f32", threads=2)
    rng = np.random.default_rng(1)
    xs = [rng.standard_normal((3, 3, 64, 64)).astype(np.float32) for _ in range(2)]
    alone = [session.run(["probabilities"], {"input": x})[0] for x in xs]
    assert not np.allclose(alone[0], alone[1])
    first = session.run(["probabilities"], {"input": xs[0]})[0]
    session.run(["probabilities"], {"input": xs[1]})
    assert np.array_equal(first, alone[0])  # not overwritten by the next call

    results: dict[int, list[np.ndarray]] = {0: [], 1: []}
    requests: dict[int, object] = {}

    def work(i: int) -> None:
        for _ in range(20):
            results[i].append(session.run(["probabilities"], {"input": xs[i]})[0])
        requests[i] = session._request()

    threads = [threading.Thread(target=work, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert requests[0] is not requests[1]
    for i in (0, 1):
        assert all(np.allclose(r, alone[i], atol=1e-6) for r in results[i])
