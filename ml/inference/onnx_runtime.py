"""ONNX Runtime execution of ensemble members (the fast CPU path).

ONNX files are derived data: they are exported from the released safetensors (deterministic)
into a cache folder the first time a worker needs them, so the repository ships each weight
once. Each graph outputs the member's grade probabilities and its last feature map, from which a
heatmap is a weighted sum (ml.inference.cam): asked for, the map comes with the same forward pass.

This module does not import torch: a worker that scores with ONNX Runtime never loads it (about
700 MB of resident memory with timm) unless a graph has to be exported.
The exporter lives in :mod:`ml.inference.onnx_graph`; a missing file is exported by a child
process, so that this one never holds torch for it.
"""

from __future__ import annotations

import itertools
import logging
import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from ml.environment import env_setting
from ml.release import member_dir, sha256_file

log = logging.getLogger(__name__)
OPSET = 17
#: Bumped when the exported graph's form changes (not its numbers), so caches are re-exported.
#: 3: the feature map became a second output (before, heatmaps ran a second graph per member).
GRAPH_VERSION = 3
#: The graphs' outputs: (N, 5) grade probabilities and the (N, C, h, w) last feature map.
PROBABILITIES = "probabilities"
FEATURES = "features"


def cache_dir() -> Path:
    return Path(
        env_setting("DRSCREEN_ONNX_CACHE", str(Path(env_setting("DRSCREEN_VAR_DIR", "var")) / "onnx"))
    )


def onnx_path_for(ref: str, models_dir: Path | None, quantized: bool = False) -> Path:
    """Cache file named by the weights' sha256, so a changed release never reuses a stale graph."""
    digest = sha256_file(member_dir(ref, models_dir) / "model.safetensors")[:16]
    kind = ".int8" if quantized else ""
    return cache_dir() / f"{ref.replace('@', '-')}-{digest}-g{GRAPH_VERSION}{kind}.onnx"


def seal(path: Path, written: Path | None = None) -> Path:
    """Record a finished graph's sha256 beside ``path`` (``<graph>.sha256``); sessions read only
    graphs whose seal holds (``graph_problem``). The file name says which weights a graph is of;
    the seal says the file is the one the exporter wrote (not a half-written, damaged or
    hand-copied one). ``written``: the graph's temporary file, sealed before it is renamed to
    ``path``, so that another process never finds the graph without its seal (it would export
    it again). The seal itself is replaced atomically (a reader saw it empty, "damaged")."""
    target = _seal_of(path)
    tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    tmp.write_text(sha256_file(written or path) + "\n")
    os.replace(tmp, target)
    return path


def graph_problem(path: Path) -> str | None:
    """Why the cached graph ``path`` must not be used, or None when its seal holds."""
    sealed = _seal_of(path)
    if not path.exists():
        return "is missing"
    if not sealed.is_file():
        return "has no .sha256 seal (an interrupted export, or a cache written before seals)"
    if sealed.read_text().strip() != sha256_file(path):
        return "differs from its .sha256 seal (changed or damaged after it was exported)"
    return None


def discard(path: Path) -> None:
    """Remove a cached graph and its seal (a graph that was only measured, or not kept)."""
    path.unlink(missing_ok=True)
    _seal_of(path).unlink(missing_ok=True)


def _seal_of(graph: Path) -> Path:
    return Path(f"{graph}.sha256")


def export_in_child(ref: str, out: Path, models_dir: Path | None = None) -> Path:
    """Export a released member to ``out`` in a child process.

    Exporting needs torch and the PyTorch network; in this process they would stay resident
    (~1.2 GB measured, freeing the network gives little back) long after the file exists.
    """
    cmd = [sys.executable, "-m", "ml.inference.onnx_graph", ref, str(out)]
    if models_dir is not None:
        cmd.append(str(models_dir))
    root = str(Path(__file__).resolve().parents[2])  # importable without an installed package
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0 or not out.exists():
        raise RuntimeError(f"exporting {ref} to ONNX failed ({done.returncode}): {done.stderr[-2000:]}")
    return out


#: One memory arena for every session of the process (False: an arena per session, as before).
SHARED_ARENA = True
_arena_lock = threading.Lock()
_arena_registered = False


def _register_shared_arena(ort: Any) -> None:
    """Register (once per process) a CPU arena with ONNX Runtime's environment for sessions to share.

    Each session otherwise grows its own arena to the peak of every batch size it has seen: the
    three members' arenas reached ~840 MB after batches of 8, 5 and 1, one shared arena ~410 MB,
    at the same speed (docs/performance.md). Default arena settings otherwise.
    """
    global _arena_registered
    with _arena_lock:
        if not _arena_registered:
            arena = ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR
            info = ort.OrtMemoryInfo("Cpu", arena, 0, ort.OrtMemType.DEFAULT)
            ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, -1, -1, -1))
            _arena_registered = True


def int8_available(refs: list[str], models_dir: Path | None = None) -> bool:
    """True when `drscreen export onnx --quantize` kept an int8 graph for every member (it writes
    them only when the ensemble's grades and QWK stay within the acceptance limits)."""
    return all(graph_problem(onnx_path_for(ref, models_dir, quantized=True)) is None for ref in refs)


def ort_session(path: Path) -> Any:
    """An ONNX Runtime session on one thread, all graph optimisations, the shared arena."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if SHARED_ARENA:
        _register_shared_arena(ort)
        opts.add_session_config_entry("session.use_env_allocators", "1")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


class OnnxMembers:
    """One ONNX Runtime session per member, each single-threaded; ``threads`` > 1 runs the
    (member, slice of the batch) pieces on a thread pool of that size instead.

    Measured on 2 cores (docs/performance.md): three sessions with 2 intra-op threads each, run
    one after the other, reached ~22 images/s; the same work as six single-threaded pieces on
    2 threads ~36 images/s, and batch-1 latency fell from ~85 to ~28 ms. Separate intra-op pools
    per session spin and compete; small convolutions at batch 8 do not split well across threads.
    """

    def __init__(self, sessions: dict[str, object], threads: int = 1) -> None:
        self.sessions = sessions
        self.threads = max(1, threads)
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="onnx") if self.threads > 1 else None

    @classmethod
    def load(
        cls,
        folder: Path,
        refs: list[str],
        models_dir: Path | None = None,
        export: bool = True,
        quantized: bool = False,
        threads: int | None = None,
        engine: str = "onnxruntime",
        precision: str | dict[str, str] = "f32",
    ) -> OnnxMembers:
        """Sessions of every member's graph: ONNX Runtime's, or with ``engine="openvino"`` the same
        graphs compiled by OpenVINO at ``precision`` (one for all, or per member ref;
        ``ml.inference.openvino_runtime``)."""
        threads = threads or int(os.environ.get("DRSCREEN_TORCH_THREADS", "0") or 0) or (os.cpu_count() or 1)
        if engine == "openvino":
            from ml.inference.openvino_runtime import OpenVinoSession

            def new_session(path: Path, ref: str) -> object:
                return OpenVinoSession(
                    path, precision if isinstance(precision, str) else precision[ref], threads
                )
        elif engine == "onnxruntime":

            def new_session(path: Path, ref: str) -> object:
                return ort_session(path)
        else:
            raise ValueError(f"unknown engine {engine!r}: onnxruntime or openvino")
        sessions: dict[str, object] = {}
        for ref in refs:
            path = onnx_path_for(ref, models_dir, quantized)
            problem = graph_problem(path)
            if problem is not None:
                if quantized:
                    raise FileNotFoundError(f"{path} {problem}: run `drscreen export onnx --quantize`")
                if not export:
                    raise FileNotFoundError(f"{path} {problem}: run `drscreen export onnx`")
                (log.info if problem == "is missing" else log.warning)(
                    "%s %s: exporting %s to ONNX again", path, problem, ref
                )
                export_in_child(ref, path, models_dir)
            if ref not in sessions:
                sessions[ref] = new_session(path, ref)
        return cls(sessions, threads)

    def run(self, ref: str, x: np.ndarray) -> np.ndarray:
        return self.run_many([ref], {ref: x})[0]

    def run_many(self, refs: list[str], inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Probabilities (N, 5) of each member in ``refs`` on its input, in that order."""
        return [outs[0] for outs in self.run_outputs(refs, inputs, [PROBABILITIES])]

    def run_outputs(
        self, refs: list[str], inputs: dict[str, np.ndarray], names: list[str]
    ) -> list[list[np.ndarray]]:
        """The outputs ``names`` (PROBABILITIES, FEATURES) of each member in ``refs`` on its input."""
        if self._pool is None:
            return [self._run_one(ref, inputs[ref], names) for ref in refs]
        pieces = []
        for ref in refs:
            x = inputs[ref]
            bounds = np.linspace(0, len(x), max(1, min(self.threads, len(x))) + 1).astype(int)
            submit = self._pool.submit
            pieces.append([submit(self._run_one, ref, x[a:b], names) for a, b in itertools.pairwise(bounds)])
        out = []
        for futures in pieces:
            parts = [f.result() for f in futures]
            out.append([np.concatenate([p[k] for p in parts]) for k in range(len(names))])
        return out

    def _run_one(self, ref: str, x: np.ndarray, names: list[str]) -> list[np.ndarray]:
        session = self.sessions[ref]
        out = session.run(names, {"input": np.ascontiguousarray(x, dtype=np.float32)})  # type: ignore[attr-defined]
        return [np.asarray(o) for o in out]
