"""Release folders: the only form in which a trained model leaves `runs/`.

A member release is ``models/members/<name>/<version>/`` with ``config.json`` (architecture,
head, preprocessing, labels), ``model.safetensors`` (weights only) and ``metadata.json``
(version, changelog, metrics, data-split hash, library versions, weights sha256).
An ensemble release is ``models/ensembles/<name>/<version>/manifest.json`` naming its members
(as ``name@version``), their weights, the combination rule and grade thresholds, plus
``MODEL_CARD.md``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ml.preprocess import PreprocessConfig
from ml.publish import checked_sums, default_release, is_candidate, sha256_file, version_key

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from ml.models import GradingNet

# torch, safetensors.torch and ml.models (timm) are imported inside the functions that use them:
# a worker scoring with ONNX Runtime reads releases but never needs torch (~700 MB resident).

GRADE_LABELS = ["no DR", "mild NPDR", "moderate NPDR", "severe NPDR", "proliferative DR"]


def default_models_dir() -> Path:
    """``DRSCREEN_MODELS_DIR`` when set (as core.settings reads it for the service), else the
    repository's models/ folder (shipped next to the packages)."""
    configured = os.environ.get("DRSCREEN_MODELS_DIR")
    if configured:
        return Path(configured).expanduser().resolve()
    return Path(__file__).resolve().parent.parent / "models"


def library_versions() -> dict[str, str]:
    """The versions a checkpoint's numbers depend on: the network's libraries and the decoding and
    resizing ones that make its pixels (the training review of session 31: they were missing)."""
    import cv2
    import numpy
    import PIL
    import timm
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "numpy": numpy.__version__,
        "opencv": cv2.__version__,
        "pillow": PIL.__version__,
    }


def code_commit() -> str | None:
    """The repository's commit (``-dirty`` when its files were edited), None where there is no git
    (a worker's image) or the code is not a checkout of its own."""
    root = Path(__file__).resolve().parents[1]
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        top = subprocess.run(
            ["git", "rev-parse", "--show-toplevel"], cwd=root, capture_output=True, text=True, timeout=5
        )  # fmt: skip
        if top.returncode != 0 or Path(top.stdout.strip()).resolve() != root:
            return None  # installed inside another project's checkout: not this code's commit
        found = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=12"], cwd=root,
            capture_output=True, text=True, timeout=5,
        )  # fmt: skip
        if found.returncode != 0:
            return None
        return found.stdout.strip() or None
    return None


def split_ref(ref: str) -> tuple[str, str]:
    name, sep, version = ref.partition("@")
    if not sep or not name or not version or "@" in version or ref != ref.strip():
        raise ValueError(f"expected NAME@VERSION, got {ref!r}")
    return name, version


def save_checkpoint(
    folder: Path,
    model: GradingNet,
    preprocess: PreprocessConfig,
    name: str,
    version: str,
    metadata: dict[str, Any],
    half: bool = False,
) -> Path:
    """Write config.json + model.safetensors + metadata.json for one model."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if half:
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    weights = folder / "model.safetensors"
    save_file(state, str(weights))
    weights.chmod(0o644)  # safetensors writes 0600; releases are read by other users (containers)
    config = {
        "name": name,
        "version": version,
        "model": model.spec.to_dict(),
        "preprocess": preprocess.to_dict(),
        "labels": GRADE_LABELS,
        "weights_dtype": "float16" if half else "float32",
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    meta = {
        "name": name,
        "version": version,
        "libraries": library_versions(),
        "weights_sha256": sha256_file(weights),
        **metadata,
    }
    (folder / "metadata.json").write_text(json.dumps(meta, indent=2, default=float))
    return folder


def read_release(folder: Path) -> tuple[PreprocessConfig, dict[str, Any]]:
    """A release folder's preprocessing and config (with its metadata under "metadata"), after
    checking its files against its SHA256SUMS and the weights against the sha256 the metadata
    records; needs no torch."""
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"no member release at {folder} (its config.json is missing)")
    sums = checked_sums(folder)
    config = json.loads((folder / "config.json").read_text())
    meta_path = folder / "metadata.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    weights = folder / "model.safetensors"
    expected = meta.get("weights_sha256")
    if expected and (sums.get(weights.name) or sha256_file(weights)) != expected:
        raise ValueError(f"{weights} does not match the sha256 recorded in its metadata")
    return PreprocessConfig.from_dict(config["preprocess"]), {**config, "metadata": meta}


def load_checkpoint(folder: Path, device: str = "cpu") -> tuple[GradingNet, PreprocessConfig, dict[str, Any]]:
    """Rebuild the network from the factory and load its weights (strict), verifying sha256."""
    from safetensors.torch import load_file

    from ml.models import ModelSpec, build_model

    pre, config = read_release(folder)
    model = build_model(ModelSpec.from_dict(config["model"]), pretrained=False)
    weights = folder / "model.safetensors"
    state = {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(weights)).items()}
    model.load_state_dict(state, strict=True)
    model.eval().to(device)
    return model, pre, config


def member_dir(ref: str, models_dir: Path | None = None) -> Path:
    name, version = split_ref(ref)
    return (models_dir or default_models_dir()) / "members" / name / version


def ensemble_dir(ref: str, models_dir: Path | None = None) -> Path:
    name, version = split_ref(ref)
    return (models_dir or default_models_dir()) / "ensembles" / name / version


def list_ensembles(models_dir: Path | None = None) -> list[str]:
    """Every shipped ensemble as name@version, oldest first."""
    root = (models_dir or default_models_dir()) / "ensembles"
    refs = [(p.parent.name, p.name) for p in root.glob("*/*") if (p / "manifest.json").exists()]
    refs.sort(key=lambda nv: (nv[0], version_key(nv[1])))
    return [f"{n}@{v}" for n, v in refs]


def _servable(folder: Path) -> bool:
    """A release the default may be: not a candidate, and its manifest as exported (the API leaves
    out one whose SHA256SUMS fails, so the workers must too, or /readyz describes another model)."""
    if is_candidate(folder):
        return False
    try:
        checked_sums(folder)
    except (OSError, ValueError) as exc:
        log.warning("release %s is not a default model: %s", folder, exc)
        return False
    return True


def newest_ensemble(models_dir: Path | None = None) -> str:
    """The default model (``DRSCREEN_MODEL`` unset): ``ml.publish.default_release`` of the
    releases, never a candidate that happens to carry a higher number (served only when named)."""
    refs = [r for r in list_ensembles(models_dir) if _servable(ensemble_dir(r, models_dir))]
    chosen = default_release(refs)
    if chosen is None:
        raise FileNotFoundError(
            f"no released ensemble under {(models_dir or default_models_dir()) / 'ensembles'}"
        )
    return chosen


def read_manifest(ref: str, models_dir: Path | None = None) -> dict[str, Any]:
    """An ensemble's manifest, checked against its SHA256SUMS (cut points and weights are in it)."""
    folder = ensemble_dir(ref, models_dir)
    if not (folder / "manifest.json").is_file():
        known = ", ".join(list_ensembles(models_dir)) or "none"
        raise FileNotFoundError(f"no ensemble release {ref} under {folder.parent.parent} (there: {known})")
    checked_sums(folder)
    manifest: dict[str, Any] = json.loads((folder / "manifest.json").read_text())
    return manifest


def models_root_has_member(ref: str, models_dir: Path | None = None) -> bool:
    try:
        return (member_dir(ref, models_dir) / "config.json").exists()
    except ValueError:
        return False
