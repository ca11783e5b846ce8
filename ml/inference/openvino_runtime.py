"""OpenVINO execution of the exported ONNX members (an alternative CPU engine to ONNX Runtime).

OpenVINO reads the same ``.onnx`` files the ONNX Runtime path caches (``onnx_runtime.cache_dir``)
and compiles them for the CPU it runs on. Two precisions, chosen per member:

- ``f32``: the exported graph's numbers (probabilities within ~1e-6 of ONNX Runtime);
- ``bf16``: on CPUs with AVX-512 BF16 or AMX, convolutions run in bfloat16 with float32
  accumulation. Faster, but not the same numbers: it is held to the rule issue 7 sets for any
  reduced precision (grades changed on at most 1% of the natural-colour validation photographs,
  QWK drop at most 0.01). `drscreen export onnx` picks the fastest set of members that may run
  in bf16 under that rule and records it in the release folder (``VERDICT_FILE``), **per kind of
  bf16 kernel** (``bf16_kernels``: Intel AMX tiles or AVX-512 BF16 dot products): the two give
  different numbers (1.6.0's chosen mix changed 0 validation grades on AVX-512 BF16 and 1 on AMX,
  where all-bf16 changed 4; session 18), and the workers of one deployment may run on both. A
  worker serves bf16 only from the verdict measured on its own kind of CPU; on another it runs
  float32 and says so once (run `drscreen export onnx` on that CPU type to measure it there).
  The same holds for the **OpenVINO release** that measured it (``openvino_release``): another
  release's kernels are not the measured ones, so a worker with another runs float32 until the
  export is re-run with it (pyproject pins the release the shipped verdicts were measured with).

A session here answers ONNX Runtime's ``run(output_names, feeds)`` call, so ``OnnxMembers`` and
the export's checks use either engine unchanged. This module does not import torch.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np

from ml.inference.onnx_runtime import onnx_path_for

log = logging.getLogger(__name__)
PRECISIONS = ("f32", "bf16")


class OpenVinoSession:
    """One ONNX graph compiled by OpenVINO for the CPU with ``threads`` single-threaded streams.

    A stream runs one inference at a time: with one stream, the (member, half batch) pieces that
    ``OnnxMembers`` runs in parallel queued behind each other (31 images/s for 1.5.0 on 2 cores,
    ONNX Runtime 40); one stream per thread ran them side by side (60 images/s; session 11)."""

    def __init__(self, path: Path, precision: str = "f32", threads: int = 1) -> None:
        import openvino as ov

        if precision not in PRECISIONS:
            raise ValueError(f"OpenVINO precision {precision!r}: choose from {PRECISIONS}")
        config = {
            "INFERENCE_PRECISION_HINT": precision,
            "INFERENCE_NUM_THREADS": threads,
            "NUM_STREAMS": threads,
            "PERFORMANCE_HINT": "LATENCY",
            # pinned, the stream threads of two worker processes (one thread each) landed on the
            # same core and took turns; the kernel's scheduler spreads them
            "ENABLE_CPU_PINNING": False,
        }
        self.precision = precision
        self.compiled = ov.Core().compile_model(str(path), "CPU", config)
        self._local = threading.local()
        self._outputs = {name: port for port in self.compiled.outputs for name in port.get_names()}
        # pybind11 sets up its NumPy bridge on first use; two pool threads making that first call
        # at once deadlocked a worker (session 11): one warm-up call here, in the loading thread
        first = self.compiled.inputs[0]
        shape = [1 if dim.is_dynamic else dim.get_length() for dim in first.get_partial_shape()]
        self.run(list(self._outputs)[:1], {first.get_any_name(): np.zeros(shape, np.float32)})

    def run(self, output_names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        request = self._request()
        result: Any = request.infer({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in feeds.items()})
        # copies: the request's output tensors are overwritten by this thread's next call
        return [np.array(result[self._outputs[name]], copy=True) for name in output_names]

    def _request(self) -> Any:
        """This thread's infer request, made on its first call and kept. Sessions are shared by
        the worker's threads, so each needs its own; a new request per call left the two pieces
        ``OnnxMembers`` runs side by side not overlapping in ~1 of 3 processes for the process's
        whole life (46 instead of 69-77 images/s; 0 slow of 12 with kept requests, session 14)."""
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self.compiled.create_infer_request()
        return request


VERDICT_FILE = "openvino-precisions.json"
_CPUINFO = Path("/proc/cpuinfo")
_warned: set[tuple[str, str]] = set()


def bf16_kernels(cpuinfo: str | None = None) -> str | None:
    """The bfloat16 kernels OpenVINO runs on this CPU, which decide what bf16 does to the grades:
    ``amx_bf16`` (Intel AMX tiles; such CPUs also have AVX-512 BF16), ``avx512_bf16`` (AVX-512
    BF16 dot products) or None (no bf16 instructions: the hint has no effect, members run f32).
    Read from the CPU flags in ``/proc/cpuinfo`` (Linux; elsewhere None, i.e. float32)."""
    if cpuinfo is None:
        try:
            cpuinfo = _CPUINFO.read_text()
        except OSError:
            return None
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags = set(line.partition(":")[2].split())
            break
    for kernels in ("amx_bf16", "avx512_bf16"):
        if kernels in flags:
            return kernels
    return None


def openvino_release() -> str | None:
    """The installed OpenVINO's release, "YEAR.N" (None when it is not installed). A bf16 verdict
    holds for the kernels of the release that measured it: pyproject allows any newer OpenVINO,
    and a new release may compute bf16 differently (as AMX and AVX-512 BF16 kernels do)."""
    try:
        version = importlib.metadata.version("openvino")
    except importlib.metadata.PackageNotFoundError:
        return None
    return ".".join(version.split(".")[:2])


def _verdicts(path: Path) -> dict[str, Any]:
    """The verdict file's entries by kind of bf16 kernel ({} when there is none)."""
    if not path.exists():
        return {}
    record = json.loads(path.read_text())
    by_cpu = record.get("by_cpu")
    if not isinstance(by_cpu, dict):  # written before verdicts were kept per kind of CPU
        log.warning("%s: not kept per CPU type (an older export): every member runs in f32", path)
        return {}
    return by_cpu


def record_precisions(
    folder: Path, models_dir: Path | None, mix: dict[str, Any], kernels: str | None
) -> None:
    """Written into the ensemble's release folder by `drscreen export onnx` (so it ships with the
    release): each member's precision in the fastest mix that passed the accuracy rule on a CPU
    with ``kernels`` (``bf16_kernels()``), tied to its graph (named by the weights' sha256).
    Verdicts measured on other kinds of CPU are kept. Nothing is recorded for a CPU without bf16
    instructions (its "bf16" runs were float32: nothing was measured)."""
    if kernels is None:
        return
    path = folder / VERDICT_FILE
    by_cpu = _verdicts(path)
    precisions: dict[str, str] = mix.get("precisions", {})
    graphs = {ref: onnx_path_for(ref, models_dir).name for ref in precisions}
    by_cpu[kernels] = {
        "precisions": precisions,
        "graphs": graphs,
        "openvino": openvino_release(),
        "figures": mix,
    }
    path.write_text(json.dumps({"by_cpu": dict(sorted(by_cpu.items()))}, indent=2) + "\n")


def accepted_precisions(
    folder: Path, refs: list[str], models_dir: Path | None, kernels: str | None
) -> dict[str, str]:
    """Each member's precision: ``bf16`` where the export's check accepted it for exactly this
    member's graph on a CPU with these bf16 ``kernels`` (a worker passes ``bf16_kernels()``) with
    this OpenVINO release, ``f32`` otherwise."""
    if kernels is None:
        return dict.fromkeys(refs, "f32")
    path = folder / VERDICT_FILE
    by_cpu = _verdicts(path)
    record = by_cpu.get(kernels, {})
    if by_cpu and not record and (str(path), kernels) not in _warned:
        _warned.add((str(path), kernels))
        log.warning(
            "%s: bf16 was checked on %s CPUs, not on this one (%s): every member runs in f32; "
            "`drscreen export onnx` on this CPU type checks it here",
            path,
            ", ".join(sorted(by_cpu)),
            kernels,
        )
    measured_on = record.get("openvino")
    if record and measured_on != openvino_release():
        if (str(path), f"openvino {measured_on}") not in _warned:
            _warned.add((str(path), f"openvino {measured_on}"))
            log.warning(
                "%s: bf16 was checked with OpenVINO %s, this is %s: every member runs in f32; "
                "`drscreen export onnx` checks it with this release",
                path,
                measured_on or "(not recorded)",
                openvino_release(),
            )
        return dict.fromkeys(refs, "f32")
    out = {}
    for ref in refs:
        same_graph = record.get("graphs", {}).get(ref) == onnx_path_for(ref, models_dir).name
        if record and not same_graph:
            log.warning("%s: written for other weights of %s, which runs in f32", path, ref)
        out[ref] = record["precisions"].get(ref, "f32") if same_graph else "f32"
    return out


def openvino_available() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True
