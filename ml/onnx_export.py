"""`drscreen export onnx`: ONNX files of an ensemble's members, checked against PyTorch.

For each member of the ensemble:

1. export to ONNX (opset ``OPSET``, dynamic batch axis) into the cache that workers read
   (``ml.inference.onnx_runtime.onnx_path_for``: named by the weights' sha256);
2. parity on the natural-colour validation patients: every probability within ``PARITY_TOL`` of
   PyTorch and the same ensemble grade for every photograph (else the export fails);
3. with ``quantize``: int8 by ONNX Runtime static quantization (QDQ, per-channel weights,
   calibrated on ``CALIBRATION_IMAGES`` natural-colour training photographs) and dynamic
   quantization; the static int8 graph is kept (written as the ``.int8.onnx`` cache file that
   ``load_ensemble(..., quantized=True)`` reads) only if the ensemble's grades change on at most
   ``MAX_GRADE_CHANGE`` of the validation photographs and QWK drops by at most ``MAX_QWK_DROP``;
4. where OpenVINO is installed: the same graphs run by OpenVINO in float32 and bfloat16, judged
   by the same rule, and the fastest choice of bfloat16 members that passes it, recorded in the
   ensemble's release folder for these weights (``ml.inference.openvino_runtime``: what
   ``DRSCREEN_RUNTIME=openvino`` serves).

Speed (ensemble images/s at batch 8, dynamic vs static batch axis, fp32 vs int8) and accuracy are
written either way to a JSON report in the cache folder and under ``docs/perf/``.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ml.inference.combine import combine
from ml.inference.ensemble import Ensemble, load_ensemble
from ml.inference.onnx_graph import export_member_onnx
from ml.inference.onnx_runtime import OPSET, PROBABILITIES, cache_dir, discard, onnx_path_for, seal
from ml.inference.openvino_runtime import (
    PRECISIONS,
    OpenVinoSession,
    bf16_kernels,
    openvino_available,
    record_precisions,
)
from ml.metrics import qwk as quadratic_kappa
from ml.release import ensemble_dir
from ml.training.config import TrainConfig
from ml.training.data import Sample, load_rgb
from ml.training.train import natural_split

log = logging.getLogger(__name__)

PARITY_TOL = 1e-3
MAX_GRADE_CHANGE = 0.01
MAX_QWK_DROP = 0.01
CALIBRATION_IMAGES = 100
SPEED_BATCH = 8


def _sessions(paths: dict[str, Path], threads: int) -> dict[str, Any]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    cpu = ["CPUExecutionProvider"]
    return {ref: ort.InferenceSession(str(p), opts, providers=cpu) for ref, p in paths.items()}


def _run(session: Any, x: np.ndarray) -> np.ndarray:
    return np.asarray(session.run([PROBABILITIES], {"input": np.ascontiguousarray(x, np.float32)})[0])


def _inputs(ens: Ensemble, samples: list[Sample], batch: int = 16) -> Iterator[dict[str, np.ndarray]]:
    for start in range(0, len(samples), batch):
        yield ens.pixel_inputs([load_rgb(s.path) for s in samples[start : start + batch]])


def onnx_probabilities(
    sessions: dict[str, Any], members: list[Any], batches: list[dict[str, np.ndarray]]
) -> np.ndarray:
    """(members, photographs, 5) probabilities of ONNX Runtime sessions over pre-processed batches."""
    chunks = [np.stack([_run(sessions[m.ref], inputs[m.ref]) for m in members]) for inputs in batches]
    return np.concatenate(chunks, axis=1)


def calibration_inputs(ens: Ensemble, train: list[Sample]) -> dict[str, np.ndarray]:
    """Each member's pre-processed int8 calibration photographs: ``CALIBRATION_IMAGES`` training
    photographs drawn with a fixed seed, so every attempt (and scripts/int8_check.py) sees the same."""
    pick = np.random.default_rng(0).choice(
        len(train), size=min(CALIBRATION_IMAGES, len(train)), replace=False
    )
    calib: dict[str, list[np.ndarray]] = {m.ref: [] for m in ens.member_objects}
    for inputs in _inputs(ens, [train[i] for i in sorted(pick)]):
        for ref, batch in calib.items():
            batch.append(inputs[ref])
    return {ref: np.concatenate(batches) for ref, batches in calib.items()}


def _timed(fn: Callable[[], object], repeats: int = 5) -> float:
    """Best-of-``repeats`` seconds of one call (after one warm-up call)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _speed(sessions: dict[str, Any], sizes: dict[str, int], batch: int = SPEED_BATCH) -> float:
    """Ensemble images/s (every member once per image) on random inputs of ``batch`` images."""
    rng = np.random.default_rng(0)
    xs = {ref: rng.standard_normal((batch, 3, s, s)).astype(np.float32) for ref, s in sizes.items()}

    def once() -> None:
        for ref, sess in sessions.items():
            _run(sess, xs[ref])

    return batch / _timed(once)


def _export_static(ens: Ensemble, ref: str, out: Path, batch: int = SPEED_BATCH) -> Path:
    """The same member with a fixed batch axis (only to measure static vs dynamic)."""
    member = next(m for m in ens.member_objects if m.ref == ref)
    return export_member_onnx(member.model, member.preprocess.size, out, batch=batch)


class _Calibration:
    """ONNX Runtime CalibrationDataReader over pre-processed training photographs."""

    def __init__(self, x: np.ndarray, batch: int = 10) -> None:
        self._batches = [x[i : i + batch] for i in range(0, len(x), batch)]
        self._it = iter(self._batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        nxt = next(self._it, None)
        return None if nxt is None else {"input": np.ascontiguousarray(nxt, np.float32)}

    def rewind(self) -> None:
        self._it = iter(self._batches)


def conv_nodes(path: Path) -> list[tuple[str, bool]]:
    """(name, is depthwise) of the graph's Conv nodes, in graph (topological) order."""
    import onnx

    def groups(node: Any) -> int:
        return next((int(a.i) for a in node.attribute if a.name == "group"), 1)

    return [(n.name, groups(n) > 1) for n in onnx.load(str(path)).graph.node if n.op_type == "Conv"]


def float_convs(convs: list[tuple[str, bool]], float_fraction: float, depthwise_float: bool) -> list[str]:
    """Convolutions an int8 variant keeps in float32: the stem, the last (head) convolution, the
    first ``float_fraction`` of them and, with ``depthwise_float``, every depthwise one."""
    names = [name for name, _ in convs]
    keep = names[: max(1, int(len(names) * float_fraction))] + names[-1:]
    if depthwise_float:
        keep += [name for name, depthwise in convs if depthwise and name not in keep]
    return keep


#: Static int8 attempts, most quantized first: (label, fraction of the first convolutions kept in
#: float32, depthwise convolutions kept in float32). Measured on EfficientNet-Lite0 at 256 px:
#: quantizing the stem alone moved the expected grade by ~0.4 on average (the Ben-Graham input's
#: range); the later layers quantize well. Depthwise convolutions are the usual suspects for
#: MobileNet-style int8 losses (per-channel ranges that differ widely): session 10 tried keeping
#: them float too (docs/performance.md).
STATIC_LADDER = (
    ("stem and head conv fp32", 0.0, False),
    ("stem, head and depthwise convs fp32", 0.0, True),
    ("first quarter fp32", 0.25, False),
    ("first quarter and depthwise convs fp32", 0.25, True),
    ("first half fp32", 0.5, False),
)


def quantize_member(
    src: Path,
    out: Path,
    calibration: np.ndarray | None,
    float_fraction: float = 0.0,
    depthwise_float: bool = False,
    method: Any = None,
) -> Path:
    """int8 copy of one member: static QDQ per-channel (given calibration inputs) or dynamic.

    Static: the convolutions ``float_convs`` names stay float32; ``method`` is an ONNX Runtime
    ``CalibrationMethod`` (MinMax unless given; Percentile uses the 99.99th percentile).
    """
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = out.with_suffix(".prep.onnx")
    quant_pre_process(str(src), str(prepared), skip_symbolic_shape=True)
    try:
        if calibration is None:
            quantize_dynamic(
                str(prepared),
                str(out),
                per_channel=True,
                weight_type=QuantType.QInt8,
                op_types_to_quantize=["Conv"],
            )
        else:
            keep_float = float_convs(conv_nodes(prepared), float_fraction, depthwise_float)
            quantize_static(
                str(prepared),
                str(out),
                _Calibration(calibration),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=method or CalibrationMethod.MinMax,
                extra_options={"CalibPercentile": 99.99} if method == CalibrationMethod.Percentile else {},
                # the convolutions carry the time; the small heads that turn pooled features into
                # grade probabilities stay float (quantizing them moved grades for nothing)
                op_types_to_quantize=["Conv"],
                nodes_to_exclude=keep_float,
            )
    finally:
        prepared.unlink(missing_ok=True)
    return out


def _grades_and_qwk(ens: Ensemble, probs: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
    _, _, grade = combine(ens.rule, probs)
    # an undefined QWK (labels all of one grade) is 0.0 on both sides here, as in fitting: NaN
    # would fail "QWK drops by at most 0.01" for precisions that change no grade
    return grade, quadratic_kappa(y, grade)


def judge_reduced_precision(
    ens: Ensemble, probs: np.ndarray, y: np.ndarray, p_fp32: np.ndarray
) -> dict[str, Any]:
    """A reduced-precision variant's (members, photographs, 5) probabilities (int8 graphs, OpenVINO
    bf16) against float32 on the validation photographs: kept only if at most ``MAX_GRADE_CHANGE``
    of the grades change and QWK drops by at most ``MAX_QWK_DROP``."""
    g_fp32, qwk_fp32 = _grades_and_qwk(ens, p_fp32, y)
    grades, qwk = _grades_and_qwk(ens, probs, y)
    changed = int((grades != g_fp32).sum())
    return {
        "grades_changed": changed,
        "grades_changed_fraction": changed / max(1, len(y)),
        "qwk_fp32": qwk_fp32,
        "qwk": qwk,
        "max_abs_probability_diff": float(np.abs(probs - p_fp32).max()),
        "passes_criteria": bool(changed <= MAX_GRADE_CHANGE * len(y) and qwk_fp32 - qwk <= MAX_QWK_DROP),
    }


def fastest_passing_mix(
    ens: Ensemble,
    p_bf16: np.ndarray,
    p_fp32: np.ndarray,
    y: np.ndarray,
    ips: dict[str, dict[str, float]],
    reference: np.ndarray | None = None,
    bf16_instructions: bool = True,
) -> dict[str, Any]:
    """Which members to run in bfloat16: of every subset (2^members, recombined from the two runs'
    probabilities, no new inference), the one whose ensemble passes ``judge_reduced_precision``
    against ``reference`` (ONNX Runtime float32; default ``p_fp32``) with the highest estimated
    speed (``ips[ref][precision]``: each member's images/s alone). If no subset passes (not even
    all float32: the runtime itself disagrees with the reference), all float32 is returned with
    ``passes_criteria`` False, so nothing runs in bfloat16. ``bf16_instructions`` False (a CPU
    without them, e.g. AVX2 only): all float32, the only subset judged: the bf16 hint runs as
    float32 there, and its "faster" was timing noise (an AVX2 machine chose bf16 by it)."""
    refs = [m.ref for m in ens.member_objects]
    reference = p_fp32 if reference is None else reference
    best: dict[str, Any] = {}
    choices = (False, True) if bf16_instructions else (False,)
    for mask in itertools.product(choices, repeat=len(refs)):
        probs = np.where(np.array(mask)[:, None, None], p_bf16, p_fp32)
        figures = judge_reduced_precision(ens, probs, y, reference)
        precisions = {ref: "bf16" if bf16 else "f32" for ref, bf16 in zip(refs, mask, strict=True)}
        speed = 1 / sum(1 / ips[ref][precisions[ref]] for ref in refs)
        if not any(mask) and not best:  # the fallback, replaced by any subset that passes
            best = {"precisions": precisions, "ensemble_ips_batch8_estimated": speed, **figures}
        if figures["passes_criteria"] and (
            not best["passes_criteria"] or speed > best["ensemble_ips_batch8_estimated"]
        ):
            best = {"precisions": precisions, "ensemble_ips_batch8_estimated": speed, **figures}
    return best


def export_onnx(
    ref: str | None,
    models_dir: Path | None,
    quantize: bool = False,
    val: list[Sample] | None = None,
    train: list[Sample] | None = None,
    report_dir: Path | None = None,
    verdict_dir: Path | None = None,
) -> dict[str, Any]:
    """Export, check and (optionally) quantize every member; returns the report (also written).
    ``verdict_dir``: where the OpenVINO bf16 verdict goes (default: the ensemble's release folder)."""
    threads = int(os.environ.get("DRSCREEN_TORCH_THREADS", "0") or 0) or (os.cpu_count() or 1)
    torch.set_num_threads(threads)
    ens = load_ensemble(ref, models_dir=models_dir)
    members = ens.member_objects
    sizes = {m.ref: m.preprocess.size for m in members}
    if val is None or (quantize and train is None):
        split = natural_split(TrainConfig(), Path.cwd())
        val = split["val"] if val is None else val
        train = split["train"] if train is None else train
    fp32 = {}
    for m in members:
        path = onnx_path_for(m.ref, models_dir)
        export_member_onnx(m.model, m.preprocess.size, path)
        fp32[m.ref] = path
    sessions = _sessions(fp32, threads)

    y = np.array([s.grade for s in val])
    inputs_cache = list(_inputs(ens, val))  # ~270 MB for 114 photographs: reused by every check below
    pt = np.concatenate([ens.member_probabilities(inputs) for inputs in inputs_cache], axis=1)
    po = onnx_probabilities(sessions, members, inputs_cache)
    g_torch, qwk_torch = _grades_and_qwk(ens, pt, y)
    g_onnx, qwk_onnx = _grades_and_qwk(ens, po, y)
    per_member_diff = {m.ref: float(np.abs(pt[i] - po[i]).max()) for i, m in enumerate(members)}
    parity = {
        "n_images": len(val),
        "max_abs_probability_diff": float(np.abs(pt - po).max()),
        "per_member_max_abs_diff": per_member_diff,
        "grades_changed": int((g_torch != g_onnx).sum()),
        "qwk_torch": qwk_torch,
        "qwk_onnx": qwk_onnx,
        "ok": bool(np.abs(pt - po).max() <= PARITY_TOL and (g_torch == g_onnx).all()),
    }
    log.info("ONNX parity: %s", parity)

    speed: dict[str, Any] = {"threads": threads, "batch": SPEED_BATCH}
    speed["fp32_dynamic_batch_ips"] = _speed(sessions, sizes)
    static_paths = {m.ref: _export_static(ens, m.ref, fp32[m.ref].with_suffix(".b8.onnx")) for m in members}
    try:
        speed["fp32_static_batch8_ips"] = _speed(_sessions(static_paths, threads), sizes)
    finally:
        for p in static_paths.values():
            discard(p)

    report: dict[str, Any] = {
        "ensemble": ens.ref,
        "opset": OPSET,
        "batch_axis": "dynamic",
        "members": {m.ref: str(fp32[m.ref]) for m in members},
        "parity": parity,
        "speed": speed,
        "machine": {
            "cpus": os.cpu_count(),
            "bf16_kernels": bf16_kernels(),
            "onnxruntime": _ort_version(),
            "torch": torch.__version__,
        },
    }
    if openvino_available():
        report["openvino"] = _openvino_check(ens, fp32, inputs_cache, y, po, sizes)
        verdict_folder = verdict_dir or ensemble_dir(ens.ref, models_dir)
        record_precisions(
            verdict_folder, models_dir, report["openvino"]["mix"], report["machine"]["bf16_kernels"]
        )
    if quantize:
        report["quantization"] = _quantize_all(
            ens, fp32, inputs_cache, train or [], y, po, threads, sizes, models_dir
        )
    if report_dir is None and (Path.cwd() / "docs").is_dir():
        report_dir = Path.cwd() / "docs" / "perf"
    _write_report(report, ens.ref, report_dir)
    if not parity["ok"]:
        raise RuntimeError(f"ONNX parity failed: {parity}")
    return report


def _openvino_check(
    ens: Ensemble,
    fp32: dict[str, Path],
    val_inputs: list[dict[str, np.ndarray]],
    y: np.ndarray,
    p_fp32: np.ndarray,
    sizes: dict[str, int],
) -> dict[str, Any]:
    """OpenVINO at each precision against ONNX Runtime float32 on the validation photographs, and
    the fastest per-member mix of the two that passes the rule (``fastest_passing_mix``)."""
    import openvino as ov

    out: dict[str, Any] = {
        "openvino": ov.__version__,
        "criteria": {"max_grade_change_fraction": MAX_GRADE_CHANGE, "max_qwk_drop": MAX_QWK_DROP},
        "onnxruntime_fp32_ips_batch8_one_thread": _speed(_sessions(fp32, 1), sizes),
    }
    probs: dict[str, np.ndarray] = {}
    ips: dict[str, dict[str, float]] = {ref: {} for ref in fp32}
    for precision in PRECISIONS:
        sessions = {ref: OpenVinoSession(path, precision) for ref, path in fp32.items()}
        probs[precision] = onnx_probabilities(sessions, ens.member_objects, val_inputs)
        for ref, session in sessions.items():
            ips[ref][precision] = _speed({ref: session}, {ref: sizes[ref]})
        out[precision] = {
            **judge_reduced_precision(ens, probs[precision], y, p_fp32),
            "ensemble_ips_batch8": _speed(sessions, sizes),
        }
        log.info("OpenVINO %s: %s", precision, out[precision])
    out["member_ips_batch8"] = ips
    # judged against ONNX Runtime float32 (what the other CPU runtime serves), not OpenVINO's own f32
    has_bf16 = bf16_kernels() is not None
    out["mix"] = fastest_passing_mix(
        ens, probs["bf16"], probs["f32"], y, ips, reference=p_fp32, bf16_instructions=has_bf16
    )
    log.info("OpenVINO per-member precisions: %s", out["mix"])
    return out


def _ort_version() -> str:
    import onnxruntime as ort

    return str(ort.__version__)


def _quantize_all(
    ens: Ensemble,
    fp32: dict[str, Path],
    val_inputs: list[dict[str, np.ndarray]],
    train: list[Sample],
    y: np.ndarray,
    p_fp32: np.ndarray,
    threads: int,
    sizes: dict[str, int],
    models_dir: Path | None,
) -> dict[str, Any]:
    members = ens.member_objects
    calib = calibration_inputs(ens, train)
    out: dict[str, Any] = {
        "calibration_images": min(CALIBRATION_IMAGES, len(train)),
        "calibration_set": "natural-colour training patients",
        "criteria": {"max_grade_change_fraction": MAX_GRADE_CHANGE, "max_qwk_drop": MAX_QWK_DROP},
    }
    attempts = [(f"static: {label}", "static", frac, dw) for label, frac, dw in STATIC_LADDER]
    attempts.append(("dynamic", "dynamic", 0.0, False))
    kept_label: str | None = None
    for label, kind, frac, depthwise in attempts:
        if kind == "static" and kept_label is not None:
            continue  # a more quantized variant already passed
        paths: dict[str, Path] = {}
        try:
            for m in members:
                target = onnx_path_for(m.ref, models_dir, quantized=True)
                target = target if kind == "static" else target.with_suffix(".dyn.onnx")
                x = calib[m.ref] if kind == "static" else None
                paths[m.ref] = quantize_member(fp32[m.ref], target, x, frac, depthwise)
            sessions = _sessions(paths, threads)
            probs = onnx_probabilities(sessions, members, val_inputs)
            out[label] = {
                **judge_reduced_precision(ens, probs, y, p_fp32),
                "ensemble_ips_batch8": _speed(sessions, sizes),
            }
        except Exception as exc:  # a quantizer failure is a result to report, not a crash
            log.exception("%s int8 quantization failed", label)
            out[label] = {"error": f"{type(exc).__name__}: {exc}", "passes_criteria": False}
        log.info("int8 %s: %s", label, out[label])
        if kind == "static" and out[label]["passes_criteria"]:
            kept_label = label
            for p in paths.values():
                seal(p)  # workers take int8 graphs only sealed, i.e. kept whole
        else:
            for p in paths.values():
                discard(p)
    out["fp32_ips_batch8"] = _speed(_sessions(fp32, threads), sizes)  # same moment, same load
    out["kept"] = kept_label
    return out


def _write_report(report: dict[str, Any], ref: str, report_dir: Path | None) -> None:
    name = f"onnx-report-{ref.replace('@', '-')}.json"
    text = json.dumps(report, indent=2, default=float)
    targets = [cache_dir() / name]
    if report_dir is not None:
        targets.append(report_dir / name)
    for path in targets:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        log.info("wrote %s", path)
