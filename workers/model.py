"""The process's ensemble: loaded once per worker process (after the fork), lazily elsewhere.

``torch`` is imported only inside these functions, so importing ``workers`` (which the Celery
parent process does) never initialises torch threads or CUDA before the pool forks. With the ONNX
Runtime and OpenVINO paths a pool child does not import torch at all, heatmaps included (torch
and timm are ~700 MB of its resident memory; docs/performance.md).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from core.settings import Settings, get_settings
from workers.settings import get_worker_settings

if TYPE_CHECKING:
    from ml.quality import QualityThresholds

log = logging.getLogger(__name__)


class Prediction(Protocol):
    probabilities: list[float]
    grade: int
    members: dict[str, list[float]]
    heatmap: np.ndarray | None  # drawn in the same pass when asked for and cheap (else None)


class EnsembleLike(Protocol):
    """What workers need of :class:`ml.inference.Ensemble` (tests may pass a look-alike)."""

    ref: str

    @property
    def card(self) -> dict[str, Any]: ...

    @property
    def quality_thresholds(self) -> dict[str, float] | None: ...

    def predict(
        self, images: Sequence[np.ndarray], heatmaps: Sequence[bool] | None = None
    ) -> Sequence[Prediction]: ...

    def grade_from_probabilities(self, probs: Sequence[float]) -> int: ...

    def grade_eye(
        self, probabilities: Sequence[float], members: Mapping[str, Sequence[float]] | None
    ) -> int: ...

    def explain(self, image: np.ndarray) -> np.ndarray: ...


_lock = threading.Lock()
_ensemble: EnsembleLike | None = None


def torch_threads_for(concurrency: int | None, configured: int = 0) -> int:
    """Intra-op threads per process: the configured number, else the CPUs shared out among the
    worker processes (oversubscribing cores makes every process slower, not faster)."""
    if configured > 0:
        return configured
    cpus = os.cpu_count() or 1
    return max(1, cpus // max(1, concurrency or 1))


_threads: int | None = None  # this process's intra-op thread count, set by configure_torch


def configure_torch(concurrency: int | None) -> int:
    """Give this process its share of the cores: OpenCV now, torch now if it is already imported,
    else when loading the ensemble first imports it (``load_ensemble(threads=...)``)."""
    global _threads
    threads = torch_threads_for(concurrency, get_worker_settings().torch_threads)
    _threads = threads
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)
    import cv2

    # OpenCV's own pool (resize, blurs of the quality gate and preprocessing) gets the same share
    cv2.setNumThreads(threads)
    return threads


#: Device files without which torch cannot see a GPU (NVIDIA CUDA, AMD ROCm, CUDA on WSL2).
GPU_DEVICE_FILES = ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd", "/dev/dxg")


def resolve_runtime(settings: Settings) -> str:
    """``DRSCREEN_RUNTIME``; ``auto`` is PyTorch when CUDA is there, otherwise OpenVINO where it is
    installed (the `ml` extra has it: 33.6 images/s end to end for 1.5.0 on 2 cores against ONNX
    Runtime's 27.1, docs/performance.md) and ONNX Runtime without it.

    Without any GPU device file the answer is known without importing torch (which would cost
    a CPU worker ~700 MB for nothing); with one, torch decides.
    """
    if settings.runtime != "auto":
        return settings.runtime
    if _cuda_available():
        return "torch"
    from ml.inference.openvino_runtime import openvino_available

    return "openvino" if openvino_available() else "onnx"


def resolve_device(runtime: str) -> str:
    """Where a PyTorch worker runs its networks: the GPU when CUDA is there. ``auto`` chose PyTorch
    for a GPU host, and the networks then ran on its CPU all the same (the bench review, session
    30: load_ensemble's device was never given)."""
    return "cuda" if runtime == "torch" and _cuda_available() else "cpu"


def _cuda_available() -> bool:
    """Without any GPU device file the answer is known without importing torch; with one, torch
    decides."""
    if not any(os.path.exists(f) for f in GPU_DEVICE_FILES):
        return False
    import torch

    return bool(torch.cuda.is_available())


def load(settings: Settings | None = None) -> EnsembleLike:
    """Load the configured ensemble (``DRSCREEN_MODEL``, newest shipped when unset) and keep it."""
    global _ensemble
    settings = settings or get_settings()
    from ml.inference import load_ensemble

    runtime = resolve_runtime(settings)
    device = resolve_device(runtime)
    with _lock:
        ens = load_ensemble(
            settings.model,
            models_dir=settings.models_dir,
            runtime=runtime,
            device=device,
            # ONNX Runtime (and torch, if loading imports it) get the share configure_torch chose;
            # the CLI path does not call it: ONNX Runtime takes every CPU, torch its own default
            threads=_threads,
            quantized=None,  # int8 only where the export kept it (docs/performance.md)
            precision=settings.openvino_precision,
        )
        _ensemble = ens
    log.info("worker process %d serves %s (%s)", os.getpid(), ens.ref, device)
    return ens


def get_ensemble() -> EnsembleLike:
    """The loaded ensemble; loads it on first use (the CLI path has no ``worker_process_init``)."""
    ens = _ensemble
    if ens is None:
        ens = load()
    return ens


def serving_ref(settings: Settings | None = None) -> str:
    """The ensemble this process scores with (``name@version``), without loading it when it is not
    loaded yet: folder expansion uses it to tell a photograph scored by this model from one scored
    by an earlier release."""
    ens = _ensemble
    if ens is not None:
        return ens.ref
    settings = settings or get_settings()
    from ml.inference import resolve_ref

    return resolve_ref(settings.model, settings.models_dir)


def check_release(settings: Settings | None = None) -> str:
    """The configured ensemble's ``name@version`` after checking, without torch or loading it,
    that its manifest and every member's release (weights against their sha256) are there.

    ``drscreen worker`` calls it before consuming anything: a pool child that cannot load its
    model would otherwise take photographs off the queue and fail each one."""
    settings = settings or get_settings()
    from ml.inference import check_release as check

    return check(settings.model, settings.models_dir)


def set_ensemble(ens: EnsembleLike | None) -> None:
    """Install (or forget, with None) the process's ensemble; for tests and the embedded CLI."""
    global _ensemble
    with _lock:
        _ensemble = ens


def quality_thresholds(ens: EnsembleLike) -> QualityThresholds | None:
    """The quality gate calibration shipped with the ensemble, or None (the gate's own default)."""
    from ml.quality import thresholds_for_manifest

    return thresholds_for_manifest(getattr(ens, "quality_thresholds", None))
