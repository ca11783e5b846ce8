"""ONNX Runtime execution of ensemble members (the fast CPU path).

ONNX files are derived data: they are exported from the released safetensors (deterministic)
into a cache folder the first time a worker needs them, so the repository ships each weight
once. Grad-CAM still runs on the PyTorch members (it needs gradients).
"""

from __future__ import annotations

import copy
import itertools
import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ml.models import GradingNet, grade_probabilities
from ml.release import member_dir, sha256_file

log = logging.getLogger(__name__)
OPSET = 17
#: Bumped when the exported graph's form changes (not its numbers), so caches are re-exported.
GRAPH_VERSION = 2


class ProbabilityHead(nn.Module):
    """Wraps a member so the exported graph outputs its 5 grade probabilities directly."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return grade_probabilities(self.model(x))


class StaticSamePad(nn.Module):
    """A timm ``Conv2dSame`` with its TensorFlow-style "same" padding fixed for one input size.

    ``Conv2dSame`` computes its padding from the input's shape at run time, which exports as
    Shape/Gather/Ceil/Pad chains that ONNX Runtime cannot fold while the batch axis is dynamic.
    The input size of a member is fixed, so the padding is a constant: it exports as a constant
    Pad that ONNX Runtime fuses into the convolution (same numbers, fewer nodes).
    """

    def __init__(self, conv: nn.Conv2d, pads: tuple[int, int, int, int]) -> None:
        super().__init__()
        self.conv = conv
        self.pads = pads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.conv
        return F.conv2d(F.pad(x, self.pads), c.weight, c.bias, c.stride, 0, c.dilation, c.groups)


def _same_pad(size: int, kernel: int, stride: int, dilation: int) -> int:
    return max((math.ceil(size / stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)


def with_static_padding(model: GradingNet, size: int) -> nn.Module:
    """A copy of ``model`` whose ``Conv2dSame`` layers pad by constants for ``size`` inputs."""
    model = copy.deepcopy(model).eval()
    same = {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, nn.Conv2d) and type(m).__name__ == "Conv2dSame"
    }
    shapes: dict[str, tuple[int, int]] = {}
    hooks = [
        m.register_forward_pre_hook(
            lambda _m, args, name=name: shapes.__setitem__(name, tuple(args[0].shape[-2:]))
        )
        for name, m in same.items()
    ]
    with torch.no_grad():
        model(torch.zeros(1, 3, size, size))
    for h in hooks:
        h.remove()
    for name, conv in same.items():
        (ih, iw), (kh, kw) = shapes[name], conv.kernel_size
        ph = _same_pad(ih, kh, conv.stride[0], conv.dilation[0])
        pw = _same_pad(iw, kw, conv.stride[1], conv.dilation[1])
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, StaticSamePad(conv, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)))
    return model


def export_member_onnx(model: GradingNet, size: int, out: Path) -> Path:
    """Export with a dynamic batch axis and constant "same" padding (see StaticSamePad)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".{os.getpid()}.tmp.onnx")  # pool children may export at once
    wrapper = ProbabilityHead(with_static_padding(model, size))
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
    name = f"{ref.replace('@', '-')}-{digest}-g{GRAPH_VERSION}{'.int8' if quantized else ''}.onnx"
    return cache_dir() / name


def int8_available(refs: list[str], models_dir: Path | None = None) -> bool:
    """True when `drscreen export onnx --quantize` kept an int8 graph for every member (it writes
    them only when the ensemble's grades and QWK stay within the acceptance limits)."""
    return all(onnx_path_for(ref, models_dir, quantized=True).exists() for ref in refs)


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
        models: dict[str, GradingNet] | None = None,
        sizes: dict[str, int] | None = None,
        quantized: bool = False,
        threads: int | None = None,
    ) -> OnnxMembers:
        import onnxruntime as ort

        threads = threads or int(os.environ.get("DRSCREEN_TORCH_THREADS", "0") or 0) or (os.cpu_count() or 1)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
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
            if ref not in sessions:
                sessions[ref] = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        return cls(sessions, threads)

    def run(self, ref: str, x: np.ndarray) -> np.ndarray:
        return self.run_many([ref], {ref: x})[0]

    def run_many(self, refs: list[str], inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Probabilities (N, 5) of each member in ``refs`` on its input, in that order."""
        if self._pool is None:
            return [self._run_one(ref, inputs[ref]) for ref in refs]
        pieces = []
        for ref in refs:
            x = inputs[ref]
            bounds = np.linspace(0, len(x), max(1, min(self.threads, len(x))) + 1).astype(int)
            submit = self._pool.submit
            pieces.append([submit(self._run_one, ref, x[a:b]) for a, b in itertools.pairwise(bounds)])
        return [np.concatenate([f.result() for f in futures]) for futures in pieces]

    def _run_one(self, ref: str, x: np.ndarray) -> np.ndarray:
        session = self.sessions[ref]
        out = session.run(["probabilities"], {"input": np.ascontiguousarray(x, dtype=np.float32)})  # type: ignore[attr-defined]
        return np.asarray(out[0])
