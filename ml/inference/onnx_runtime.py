"""ONNX Runtime execution of ensemble members (the fast CPU path).

ONNX files are derived data: they are exported from the released safetensors (deterministic)
into a cache folder the first time a worker needs them, so the repository ships each weight
once. Grad-CAM still runs on the PyTorch members (it needs gradients).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ml.models import GradingNet, grade_probabilities
from ml.release import member_dir, sha256_file

log = logging.getLogger(__name__)
OPSET = 17


class ProbabilityHead(nn.Module):
    """Wraps a member so the exported graph outputs its 5 grade probabilities directly."""

    def __init__(self, model: GradingNet) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return grade_probabilities(self.model(x))


def export_member_onnx(model: GradingNet, size: int, out: Path) -> Path:
    """Export with a dynamic batch axis (measured: as fast as static batch 8 on CPU)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".{os.getpid()}.tmp.onnx")  # pool children may export at once
    wrapper = ProbabilityHead(model.eval())
    dummy = torch.randn(2, 3, size, size)
    torch.onnx.export(
        wrapper,
        (dummy,),
        str(tmp),
        input_names=["input"],
        output_names=["probabilities"],
        dynamic_axes={"input": {0: "batch"}, "probabilities": {0: "batch"}},
        opset_version=OPSET,
        dynamo=False,
    )
    model.eval()  # the TorchScript exporter leaves the module in training mode (BatchNorm!)
    tmp.rename(out)
    return out


def cache_dir() -> Path:
    return Path(
        os.environ.get("DRSCREEN_ONNX_CACHE", Path(os.environ.get("DRSCREEN_VAR_DIR", "var")) / "onnx")
    )


def onnx_path_for(ref: str, models_dir: Path | None, quantized: bool = False) -> Path:
    """Cache file named by the weights' sha256, so a changed release never reuses a stale graph."""
    digest = sha256_file(member_dir(ref, models_dir) / "model.safetensors")[:16]
    return cache_dir() / f"{ref.replace('@', '-')}-{digest}{'.int8' if quantized else ''}.onnx"


class OnnxMembers:
    def __init__(self, sessions: dict[str, object]) -> None:
        self.sessions = sessions

    @classmethod
    def load(
        cls,
        folder: Path,
        refs: list[str],
        models_dir: Path | None = None,
        models: dict[str, GradingNet] | None = None,
        sizes: dict[str, int] | None = None,
        quantized: bool = False,
        threads: int | None = None,
    ) -> OnnxMembers:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = (
            threads or int(os.environ.get("DRSCREEN_TORCH_THREADS", "0") or 0) or (os.cpu_count() or 1)
        )
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        sessions: dict[str, object] = {}
        for ref in refs:
            path = onnx_path_for(ref, models_dir, quantized)
            if not path.exists():
                if models is None or sizes is None:
                    raise FileNotFoundError(f"{path} missing: run `drscreen export onnx`")
                log.info("exporting %s to ONNX at %s", ref, path)
                export_member_onnx(models[ref], sizes[ref], onnx_path_for(ref, models_dir))
                if quantized:
                    raise FileNotFoundError(f"{path} missing: run `drscreen export onnx --quantize`")
            sessions[ref] = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        return cls(sessions)

    def run(self, ref: str, x: np.ndarray) -> np.ndarray:
        session = self.sessions[ref]
        out = session.run(["probabilities"], {"input": np.ascontiguousarray(x, dtype=np.float32)})  # type: ignore[attr-defined]
        return np.asarray(out[0])
