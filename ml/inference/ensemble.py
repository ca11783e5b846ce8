"""A released ensemble, loaded once per worker process and used for every photograph."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ml.inference.combine import CombineRule, combine, grade_from_probabilities
from ml.inference.gradcam import member_cam, to_photo_frame
from ml.models import GradingNet, grade_probabilities
from ml.preprocess import PreprocessConfig, prepare_pixels, to_input
from ml.release import ensemble_dir, load_checkpoint, member_dir, newest_ensemble, read_manifest

log = logging.getLogger(__name__)


@dataclass
class Member:
    ref: str
    model: GradingNet
    preprocess: PreprocessConfig
    config: dict[str, Any]


@dataclass
class EnsemblePrediction:
    probabilities: list[float]
    grade: int
    score: float  # expected grade under the combined distribution
    members: dict[str, list[float]] = field(default_factory=dict)

    @property
    def referable(self) -> bool:
        return self.grade >= 2


class Ensemble:
    """Members + combination rule. `predict` batches internally; `explain` runs Grad-CAM."""

    def __init__(
        self,
        ref: str,
        members: list[Member],
        rule: CombineRule,
        manifest: dict[str, Any],
        batch_size: int = 8,
        runtime: Any = None,
    ) -> None:
        self.ref = ref
        self._members = members
        self.rule = rule
        self.manifest = manifest
        self.batch_size = batch_size
        self.runtime = runtime  # optional ONNX Runtime sessions (ml.inference.onnx_runtime)

    @property
    def members(self) -> list[str]:
        return [m.ref for m in self._members]

    @property
    def card(self) -> dict[str, Any]:
        card: dict[str, Any] = self.manifest.get("card", {})
        return card

    @property
    def quality_thresholds(self) -> dict[str, float] | None:
        return self.manifest.get("quality_thresholds")

    def pixel_inputs(self, images: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        """Each distinct pixel pipeline runs once per image; members share the result."""
        cache: dict[str, list[np.ndarray]] = {}
        for m in self._members:
            key = m.preprocess.cache_key()
            if key not in cache:
                cache[key] = [prepare_pixels(img, m.preprocess) for img in images]
        # Members with the same pixel pipeline and normalisation share one input array.
        inputs: dict[tuple[str, tuple[float, ...], tuple[float, ...]], np.ndarray] = {}
        out = {}
        for m in self._members:
            norm = (m.preprocess.cache_key(), tuple(m.preprocess.mean), tuple(m.preprocess.std))
            if norm not in inputs:
                inputs[norm] = np.stack([to_input(p, m.preprocess) for p in cache[norm[0]]])
            out[m.ref] = inputs[norm]
        return out

    def member_probabilities(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """(M, N, 5) probabilities of every member on pre-processed inputs."""
        if self.runtime is not None:
            return np.stack(self.runtime.run_many([m.ref for m in self._members], inputs))
        out = []
        for m in self._members:
            x = inputs[m.ref]
            parts = []
            with torch.inference_mode():
                for start in range(0, len(x), self.batch_size):
                    t = torch.from_numpy(x[start : start + self.batch_size]).to(
                        memory_format=torch.channels_last
                    )
                    parts.append(grade_probabilities(m.model(t)).float().numpy())
            out.append(np.concatenate(parts))
        return np.stack(out)

    def predict(self, images: Sequence[np.ndarray]) -> list[EnsemblePrediction]:
        if not images:
            return []
        probs = self.member_probabilities(self.pixel_inputs(images))
        combined, score, grade = combine(self.rule, probs)
        return [
            EnsemblePrediction(
                probabilities=[round(float(v), 6) for v in combined[i]],
                grade=int(grade[i]),
                score=float(score[i]),
                members={
                    m.ref: [round(float(v), 6) for v in probs[j, i]] for j, m in enumerate(self._members)
                },
            )
            for i in range(len(images))
        ]

    def grade_from_probabilities(self, probs: Sequence[float]) -> int:
        return grade_from_probabilities(self.rule, np.asarray(probs))

    def explain(self, image: np.ndarray) -> np.ndarray:
        """Grad-CAM of the ensemble's decision, in the photograph's own frame (H, W) in [0, 1].

        Each member's map is taken for its expected grade (the quantity the decision
        thresholds), then the maps are combined with the ensemble weights.
        """
        weights = np.asarray(self.rule.weights or [1.0] * len(self._members), dtype=np.float64)
        weights = weights / weights.sum()
        inputs = self.pixel_inputs([image])  # shared pipelines run once, as in predict
        total: np.ndarray | None = None
        for w, m in zip(weights, self._members, strict=True):
            cam = member_cam(m.model, torch.from_numpy(inputs[m.ref]))
            total = cam * w if total is None else total + cam * w
        assert total is not None
        if total.max() > 0:
            total = total / total.max()
        return to_photo_frame(total.astype(np.float32), image, self._members[0].preprocess)


def load_ensemble(
    ref: str | None = None,
    models_dir: Path | None = None,
    device: str = "cpu",
    runtime: str = "torch",
    quantized: bool | None = False,
    threads: int | None = None,
) -> Ensemble:
    """Load a released ensemble by name@version (None = newest shipped).

    ``runtime="onnx"`` scores with ONNX Runtime on ``threads`` threads (int8 graphs with
    ``quantized``; None = int8 when `drscreen export onnx --quantize` kept them); Grad-CAM keeps
    using the PyTorch members.
    """
    ref = ref or newest_ensemble(models_dir)
    manifest = read_manifest(ref, models_dir)
    members = []
    for entry in manifest["members"]:
        model, pre, config = load_checkpoint(member_dir(entry["ref"], models_dir), device)
        members.append(Member(entry["ref"], model, pre, config))
    rule = CombineRule.from_dict(manifest["combination"])
    onnx = None
    if runtime == "onnx":
        from ml.inference.onnx_runtime import OnnxMembers, int8_available

        if quantized is None:
            quantized = int8_available([m.ref for m in members], models_dir)

        onnx = OnnxMembers.load(
            ensemble_dir(ref, models_dir),
            [m.ref for m in members],
            models_dir,
            models={m.ref: m.model for m in members},
            sizes={m.ref: m.preprocess.size for m in members},
            quantized=quantized,
            threads=threads,
        )
    log.info("loaded ensemble %s (%d members, rule %s, runtime %s)", ref, len(members), rule.rule, runtime)
    return Ensemble(ref, members, rule, manifest, runtime=onnx)
