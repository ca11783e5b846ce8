"""A released ensemble, loaded once per worker process and used for every photograph.

With the ONNX Runtime and OpenVINO paths the PyTorch members are not loaded, nor torch imported:
torch and timm alone hold ~700 MB of resident memory per worker process (docs/performance.md).
Heatmaps there come from the feature map each member's graph outputs beside its probabilities
(ml.inference.cam), in the same forward pass when ``predict`` is asked for them; only a member
without a regression head would make ``explain`` load its PyTorch network for autograd.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ml.inference.cam import regression_cam, regression_weight, to_photo_frame
from ml.inference.combine import CombineRule, combine, grade_eye, grade_from_probabilities, rule_problem
from ml.inference.onnx_runtime import FEATURES, PROBABILITIES, OnnxMembers, int8_available
from ml.preprocess import PreprocessConfig, prepare_pixels, to_input
from ml.release import ensemble_dir, member_dir, newest_ensemble, read_manifest, read_release

if TYPE_CHECKING:
    from ml.models import GradingNet

log = logging.getLogger(__name__)

#: The heatmap's full scale, in grade units (the ensemble's map of how much each place raised the
#: members' grade estimate): a map peaking below it is shown faint, in proportion; one peaking at or
#: above it is stretched to 1 at its peak. Measured on the validation photographs with
#: ``python scripts/heatmap_scale_check.py`` (docs/model.md, "Heatmaps").
HEATMAP_FULL_SCALE = 0.05


def _import_torch(threads: int | None) -> Any:
    """torch, held to ``threads`` intra-op threads (a worker shares the cores out among its
    processes). Checked on every call, not only on the first import: another module (Grad-CAM)
    may have imported torch first, and torch's default of one thread per core in each of several
    worker processes oversubscribes the cores (measured: heatmaps 3.4x slower)."""
    import torch

    if threads and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return torch


class Member:
    """One member: its preprocessing, and its PyTorch network, given or loaded on first use.

    A member made with ``model=None`` and its release ``folder`` reads the network from there the
    first time ``model`` is used.
    """

    def __init__(
        self,
        ref: str,
        model: GradingNet | None,
        preprocess: PreprocessConfig,
        config: dict[str, Any],
        folder: Path | None = None,
        threads: int | None = None,
        device: str = "cpu",
    ) -> None:
        if model is None and folder is None:
            raise ValueError(f"member {ref}: give its network or the folder to load it from")
        self.ref = ref
        self._model = model
        self.preprocess = preprocess
        self.config = config
        self.folder = folder
        self.threads = threads
        self.device = device
        self._lock = threading.Lock()

    @classmethod
    def from_release(
        cls, ref: str, models_dir: Path | None = None, threads: int | None = None, device: str = "cpu"
    ) -> Member:
        """The member's preprocessing and config now, its network only when ``model`` is used."""
        folder = member_dir(ref, models_dir)
        # the sha256 check load_checkpoint makes, made now: a bad release fails at load, not at a heatmap
        pre, config = read_release(folder)
        return cls(ref, None, pre, config, folder=folder, threads=threads, device=device)

    @property
    def loaded(self) -> bool:
        return self._model is not None

    @cached_property
    def regression_weight(self) -> np.ndarray | None:
        """The regression head's weights, read from the release (None: no such head, or no folder)."""
        return regression_weight(self.folder) if self.folder is not None else None

    @property
    def model(self) -> GradingNet:
        with self._lock:
            if self._model is None:
                assert self.folder is not None
                _import_torch(self.threads)
                from ml.release import load_checkpoint

                log.info("loading the PyTorch network of %s", self.ref)
                self._model, _, _ = load_checkpoint(self.folder, self.device)
            return self._model

    @model.setter
    def model(self, value: GradingNet) -> None:
        self._model = value


@dataclass
class EnsemblePrediction:
    probabilities: list[float]
    grade: int
    score: float  # expected grade under the combined distribution
    members: dict[str, list[float]] = field(default_factory=dict)
    # (H, W) in [0, 1] over the photograph, when ``predict`` was asked for it and could draw it
    heatmap: np.ndarray | None = field(default=None, repr=False)

    @property
    def referable(self) -> bool:
        return self.grade >= 2


class Ensemble:
    """Members + combination rule. `predict` batches internally; `explain` runs Grad-CAM."""

    #: What load_ensemble chose (a worker reports it in its heartbeat): the runtime, and on
    #: OpenVINO each member's precision.
    served_runtime: str = "torch"
    precisions: dict[str, str] | None = None

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
        self.runtime = runtime  # optional ONNX Runtime / OpenVINO sessions (ml.inference.onnx_runtime)

    @property
    def members(self) -> list[str]:
        return [m.ref for m in self._members]

    @property
    def member_objects(self) -> list[Member]:
        """The members themselves (preprocessing, networks), for export, checks and benchmarks."""
        return list(self._members)

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

    @property
    def maps_from_graphs(self) -> bool:
        """Heatmaps come from the graphs' feature maps (no autograd): the ensemble runs on ONNX
        graphs and every member's expected grade is its regression score (ml.inference.cam)."""
        return self.runtime is not None and all(m.regression_weight is not None for m in self._members)

    def member_probabilities(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """(M, N, 5) probabilities of every member on pre-processed inputs."""
        if self.runtime is not None:
            return np.stack(self.runtime.run_many([m.ref for m in self._members], inputs))
        torch = _import_torch(None)
        from ml.models import grade_probabilities

        out = []
        for m in self._members:
            x = inputs[m.ref]
            parts = []
            with torch.inference_mode():
                for start in range(0, len(x), self.batch_size):
                    t = torch.from_numpy(x[start : start + self.batch_size]).to(
                        device=m.device, memory_format=torch.channels_last
                    )
                    parts.append(grade_probabilities(m.model(t)).float().cpu().numpy())
            out.append(np.concatenate(parts))
        return np.stack(out)

    def predict(
        self, images: Sequence[np.ndarray], heatmaps: Sequence[bool] | None = None
    ) -> list[EnsemblePrediction]:
        """Grade ``images``. ``heatmaps`` (one flag per image) asks for the heatmap of those
        images, drawn from the same forward pass where ``maps_from_graphs``; elsewhere (PyTorch)
        ``heatmap`` stays None and ``explain`` draws it by autograd."""
        if not images:
            return []
        inputs = self.pixel_inputs(images)
        wanted = [i for i, flag in enumerate(heatmaps or []) if flag] if self.maps_from_graphs else []
        maps: dict[int, np.ndarray] = {}
        if wanted:
            refs = [m.ref for m in self._members]
            outs = self.runtime.run_outputs(refs, inputs, [PROBABILITIES, FEATURES])
            probs = np.stack([o[0] for o in outs])
            for i in wanted:
                cams = self._cams_from_features([o[1][i : i + 1] for o in outs])
                maps[i] = self._heatmap(cams, images[i])
        else:
            probs = self.member_probabilities(inputs)
        combined, score, _ = combine(self.rule, probs)
        out = []
        for i in range(len(images)):
            stored = [round(float(v), 6) for v in combined[i]]
            members = {m.ref: [round(float(v), 6) for v in probs[j, i]] for j, m in enumerate(self._members)}
            # graded from the values stored, as the photograph's eye is (core.aggregation): from
            # the unrounded ones, a member within 1e-6 of a cut could vote otherwise for the eye
            grade = self.grade_eye(stored, members)
            out.append(
                EnsemblePrediction(
                    probabilities=stored,
                    grade=grade,
                    score=float(score[i]),
                    members=members,
                    heatmap=maps.get(i),
                )
            )
        return out

    def grade_from_probabilities(self, probs: Sequence[float]) -> int:
        return grade_from_probabilities(self.rule, np.asarray(probs))

    def grade_eye(self, probabilities: Sequence[float], members: Mapping[str, Sequence[float]] | None) -> int:
        """An eye's grade from its gradable photographs pooled (``combine.grade_eye``)."""
        return grade_eye(self.rule, [m.ref for m in self._members], probabilities, members)

    def explain(self, image: np.ndarray) -> np.ndarray:
        """Grad-CAM of the ensemble's decision, in the photograph's own frame (H, W) in [0, 1].

        Each member's map is taken for its expected grade (the quantity the decision
        thresholds), then the maps are combined with the ensemble weights.
        """
        return self._heatmap(self._member_cams(image), image)

    def explain_raw(self, image: np.ndarray) -> np.ndarray:
        """``explain`` before its scale: grade units (what ``HEATMAP_FULL_SCALE`` was measured in)."""
        return self.raw_heatmap(self._member_cams(image), image)

    def _member_cams(self, image: np.ndarray) -> list[np.ndarray]:
        inputs = self.pixel_inputs([image])  # shared pipelines run once, as in predict
        if self.maps_from_graphs:
            outs = self.runtime.run_outputs([m.ref for m in self._members], inputs, [FEATURES])
            return self._cams_from_features([o[0] for o in outs])
        torch = _import_torch(None)
        from ml.inference.gradcam import member_cam

        return [member_cam(m.model, torch.from_numpy(inputs[m.ref]).to(m.device)) for m in self._members]

    def _cams_from_features(self, fmaps: list[np.ndarray]) -> list[np.ndarray]:
        """Each member's map from its feature map (1, C, h, w) of one photograph."""
        return [
            regression_cam(fmap, m.regression_weight, m.preprocess.size)  # type: ignore[arg-type]
            for m, fmap in zip(self._members, fmaps, strict=True)
        ]

    def _heatmap(self, cams: list[np.ndarray], image: np.ndarray) -> np.ndarray:
        """The map shown: ``raw_heatmap`` on one scale for every photograph up to
        ``HEATMAP_FULL_SCALE`` (a map that peaks there or above is stretched to 1 at its peak).

        Each map was stretched to 1 at its own peak: a grade-0 photograph's faint evidence came out
        as red as a grade-4 lesion (the Grad-CAM review, session 30)."""
        raw = self.raw_heatmap(cams, image)
        return np.clip(raw / max(float(raw.max()), HEATMAP_FULL_SCALE), 0.0, 1.0).astype(np.float32)

    def raw_heatmap(self, cams: list[np.ndarray], image: np.ndarray) -> np.ndarray:
        """The members' maps (grade units) weighted as the ensemble weighs them, each laid over the
        photograph by its own member's crop and size (members of different geometry were all
        placed by the first member's)."""
        weights = np.asarray(self.rule.weights or [1.0] * len(self._members), dtype=np.float64)
        weights = weights / weights.sum()
        # members that share a geometry are summed first: one placement each, as before
        by_geometry: dict[tuple[bool, tuple[int, ...]], tuple[PreprocessConfig, np.ndarray]] = {}
        for w, cam, member in zip(weights, cams, self._members, strict=True):
            key = (member.preprocess.crop_to_disc, cam.shape)
            cfg, acc = by_geometry.get(key, (member.preprocess, np.zeros(cam.shape, dtype=np.float64)))
            by_geometry[key] = (cfg, acc + w * cam)
        placed = [to_photo_frame(acc.astype(np.float32), image, cfg) for cfg, acc in by_geometry.values()]
        return np.sum(placed, axis=0).astype(np.float32)


def resolve_ref(ref: str | None = None, models_dir: Path | None = None) -> str:
    """The ensemble ``load_ensemble(ref)`` would load, as name@version, without loading it."""
    return ref or newest_ensemble(models_dir)


def check_release(ref: str | None = None, models_dir: Path | None = None) -> str:
    """The ensemble ``load_ensemble(ref)`` would load, after checking without torch that its
    manifest and every member's release (weights against their recorded sha256) are there.
    Raises OSError or ValueError saying what is missing or wrong."""
    ref = resolve_ref(ref, models_dir)
    manifest = read_manifest(ref, models_dir)
    check_combination(ref, manifest)
    metadata = {
        entry["ref"]: read_release(member_dir(entry["ref"], models_dir))[1]["metadata"]
        for entry in manifest["members"]
    }
    check_manifest_members(ref, manifest, models_dir, metadata)
    return ref


def check_combination(ref: str, manifest: dict[str, Any]) -> CombineRule:
    """The manifest's combination rule, refused (ValueError) when it cannot grade its members."""
    members = manifest.get("members")
    if not isinstance(members, list) or not all(isinstance(m, dict) and "ref" in m for m in members):
        raise ValueError(f"{ref}: the manifest's members must be a list of {{'ref': NAME@VERSION, ...}}")
    combination = manifest.get("combination")
    if not isinstance(combination, dict):
        raise ValueError(f"{ref}: the manifest has no combination")
    rule = CombineRule.from_dict(combination)
    problem = rule_problem(rule, len(members))
    if problem is not None:
        raise ValueError(f"{ref}: the manifest's combination cannot be used: {problem}")
    return rule


def check_manifest_members(
    ref: str,
    manifest: dict[str, Any],
    models_dir: Path | None,
    metadata: Mapping[str, Mapping[str, Any]] | None = None,
) -> None:
    """Each member's release must hold the weights the manifest was fitted with: a member
    re-exported under its version would otherwise load silently with other weights (its own
    metadata checks its file, not which file the ensemble meant).

    ``metadata``: members' metadata already read (``read_release(...)[1]["metadata"]`` by ref);
    a member not in it has its ``metadata.json`` read here."""
    for entry in manifest["members"]:
        wanted = entry.get("weights_sha256") if isinstance(entry, dict) else None
        if not wanted:
            continue
        if metadata is not None and entry["ref"] in metadata:
            recorded = metadata[entry["ref"]].get("weights_sha256")
        else:
            meta_path = member_dir(entry["ref"], models_dir) / "metadata.json"
            recorded = json.loads(meta_path.read_text()).get("weights_sha256") if meta_path.exists() else None
        if recorded != wanted:
            raise ValueError(
                f"{ref}: member {entry['ref']} holds other weights than the ensemble was fitted with "
                f"(sha256 {str(recorded)[:12]}..., manifest {wanted[:12]}...): re-exported under its version?"
            )


def load_ensemble(
    ref: str | None = None,
    models_dir: Path | None = None,
    device: str = "cpu",
    runtime: str = "torch",
    quantized: bool | None = False,
    threads: int | None = None,
    precision: str = "auto",
) -> Ensemble:
    """Load a released ensemble by name@version (None = newest shipped).

    ``runtime="onnx"`` scores with ONNX Runtime on ``threads`` threads (int8 graphs with
    ``quantized``; None = int8 when `drscreen export onnx --quantize` kept them);
    ``runtime="openvino"`` runs the same graphs with OpenVINO at ``precision`` (``auto``: bfloat16
    for the members `drscreen export onnx` accepted it for, with these weights; float32 otherwise).
    With either, heatmaps come from the feature maps the graphs output (ml.inference.cam), and the
    PyTorch networks load only if a member has no regression head (a missing ONNX file is
    exported by a child process). ``threads`` is also torch's
    intra-op thread count when loading the members is what first imports torch.
    """
    ref = resolve_ref(ref, models_dir)
    manifest = read_manifest(ref, models_dir)
    rule = check_combination(ref, manifest)
    check_manifest_members(ref, manifest, models_dir)
    refs = [entry["ref"] for entry in manifest["members"]]
    onnx = None
    served = runtime
    precisions: dict[str, str] | None = None  # set on OpenVINO only
    if runtime == "onnx":
        members = [Member.from_release(r, models_dir, threads, device) for r in refs]
        if quantized is None:
            quantized = int8_available(refs, models_dir)
        # a missing graph is exported by a child process: the networks stay unloaded here
        onnx = OnnxMembers.load(
            ensemble_dir(ref, models_dir), refs, models_dir, quantized=quantized, threads=threads
        )
    elif runtime == "openvino":
        from ml.inference.openvino_runtime import accepted_precisions, bf16_kernels

        members = [Member.from_release(r, models_dir, threads, device) for r in refs]
        precisions = (
            accepted_precisions(ensemble_dir(ref, models_dir), refs, models_dir, bf16_kernels())
            if precision == "auto"
            else dict.fromkeys(refs, precision)
        )
        onnx = OnnxMembers.load(
            ensemble_dir(ref, models_dir),
            refs,
            models_dir,
            threads=threads,
            engine="openvino",
            precision=precisions,
        )
        runtime = "openvino " + ",".join(sorted(set(precisions.values())))
    else:
        _import_torch(threads)
        from ml.release import load_checkpoint

        members = [
            Member(r, *load_checkpoint(member_dir(r, models_dir), device), device=device) for r in refs
        ]
    # the model card's name for the rule (equal_average is a weighted_average of equal weights)
    chosen = manifest.get("card", {}).get("chosen_rule") or rule.rule
    log.info("loaded ensemble %s (%d members, rule %s, runtime %s)", ref, len(members), chosen, runtime)
    ensemble = Ensemble(ref, members, rule, manifest, runtime=onnx)
    ensemble.served_runtime, ensemble.precisions = served, precisions
    return ensemble
