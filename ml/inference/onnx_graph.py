"""The ONNX graph of a member: what `export_member_onnx` writes into the cache workers read.

Kept apart from :mod:`ml.inference.onnx_runtime` because it needs torch (and timm, through the
member), which a worker scoring with ONNX Runtime never has to import.
"""

from __future__ import annotations

import copy
import math
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ml.inference.onnx_runtime import FEATURES, OPSET, PROBABILITIES, seal
from ml.models import GradingNet, grade_probabilities


class ScoringHead(nn.Module):
    """Wraps a member so the exported graph outputs its 5 grade probabilities and, beside them,
    its last feature map: what a heatmap weighs (ml.inference.cam), so one forward pass gives both."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model  # a GradingNet (with_static_padding's copy)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fmap: torch.Tensor = self.model.features(x)  # type: ignore[operator]
        return grade_probabilities(self.model.heads(fmap)), fmap  # type: ignore[operator]


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


def export_member_onnx(model: GradingNet, size: int, out: Path, batch: int | None = None) -> Path:
    """Export the member's scoring graph (``ScoringHead``) with constant "same" padding (see
    StaticSamePad) and a dynamic batch axis, or a fixed one of ``batch`` images."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".{os.getpid()}.tmp.onnx")  # pool children may export at once
    outputs = [PROBABILITIES, FEATURES]
    torch.onnx.export(
        ScoringHead(with_static_padding(model, size)),
        (torch.randn(batch or 2, 3, size, size),),
        str(tmp),
        input_names=["input"],
        output_names=outputs,
        dynamic_axes=None if batch else {name: {0: "batch"} for name in ["input", *outputs]},
        opset_version=OPSET,
        dynamo=False,
    )
    model.eval()  # the TorchScript exporter leaves the module in training mode (BatchNorm!)
    seal(out, written=tmp)  # first: a graph in place always has its seal
    tmp.rename(out)
    return out


def export_release_member(ref: str, out: Path, models_dir: Path | None = None) -> Path:
    """Export a released member, read from its release folder, to ``out``."""
    from ml.release import load_checkpoint, member_dir

    model, pre, _ = load_checkpoint(member_dir(ref, models_dir))
    return export_member_onnx(model, pre.size, out)


def main(argv: list[str] | None = None) -> None:
    """``python -m ml.inference.onnx_graph REF OUT [MODELS_DIR]``: the export a worker runs in a
    child process (``ml.inference.onnx_runtime.export_in_child``)."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) not in (2, 3):
        raise SystemExit("usage: python -m ml.inference.onnx_graph REF OUT [MODELS_DIR]")
    export_release_member(args[0], Path(args[1]), Path(args[2]) if len(args) == 3 else None)


if __name__ == "__main__":
    main()
