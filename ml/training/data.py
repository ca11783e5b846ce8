"""Labelled photographs, patient-level splits, an on-disk pixel cache and batch augmentation."""

from __future__ import annotations

import csv
import hashlib
import logging
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import PIL
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from ml.preprocess import PreprocessConfig, prepare_pixels, to_input

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sample:
    path: Path
    patient_id: str
    eye: str
    grade: int


def read_labels(folder: Path) -> list[Sample]:
    """Read `<folder>/labels.csv` (image, patient_id, eye, grade)."""
    with open(folder / "labels.csv", newline="") as fh:
        return [
            Sample(folder / row["image"], str(row["patient_id"]), row.get("eye", ""), int(row["grade"]))
            for row in csv.DictReader(fh)
        ]


def split_patients(samples: list[Sample], fractions: dict[str, float], seed: int) -> dict[str, list[Sample]]:
    """Split by patient, stratified by the patient's worst grade, deterministic for a seed.

    Both eyes of a patient always land in the same part, so no part ever sees a patient
    that another part holds.
    """
    worst: dict[str, int] = {}
    for s in samples:
        worst[s.patient_id] = max(worst.get(s.patient_id, 0), s.grade)
    rng = np.random.default_rng(seed)
    names = list(fractions)
    assignment: dict[str, str] = {}
    for grade in range(5):
        patients = sorted(p for p, g in worst.items() if g == grade)
        rng.shuffle(patients)
        edges = np.cumsum([fractions[n] for n in names]) * len(patients)
        start = 0
        for name, edge in zip(names, edges, strict=True):
            stop = round(edge)
            for p in patients[start:stop]:
                assignment[p] = name
            start = stop
    parts: dict[str, list[Sample]] = {n: [] for n in names}
    for s in samples:
        parts[assignment[s.patient_id]].append(s)
    return parts


def split_hash(parts: dict[str, list[Sample]]) -> str:
    """A fingerprint of which patients are in which part (stored in release metadata)."""
    digest = hashlib.sha256()
    for name in sorted(parts):
        for pid in sorted({s.patient_id for s in parts[name]}):
            digest.update(f"{name}:{pid}\n".encode())
    return digest.hexdigest()[:16]


def load_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def cached_pixels(samples: list[Sample], cfg: PreprocessConfig, cache_dir: Path, tag: str) -> np.ndarray:
    """Preprocessed uint8 pixels for samples, computed once and memory-mapped afterwards."""
    path = cache_dir / f"{tag}-{cfg.size}-{_cache_key(samples, cfg)}.npy"
    if path.exists():
        return np.load(path, mmap_mode="r")
    cache_dir.mkdir(parents=True, exist_ok=True)
    # A file of its own per builder: two runs started side by side used to open the same
    # temporary file, truncating each other's mapping (a bus error) or losing it to the other's
    # rename. Now each writes its own and renames it into place; the contents are identical.
    tmp = path.with_suffix(f".{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp.npy")
    out = np.lib.format.open_memmap(
        tmp, mode="w+", dtype=np.uint8, shape=(len(samples), cfg.size, cfg.size, 3)
    )
    try:
        for i, s in enumerate(tqdm(samples, desc=f"caching {tag}", unit="img")):
            out[i] = prepare_pixels(load_rgb(s.path), cfg)
        out.flush()
        del out
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)  # interrupted: the full-size temporary file (up to ~1 GB) goes
    return np.load(path, mmap_mode="r")


def _cache_key(samples: list[Sample], cfg: PreprocessConfig) -> str:
    """The pixels' identity: the config and ``PIXELS_REVISION`` (``cfg.cache_key``), each file's
    path, size and modification time (a photograph replaced in place was served from the cache),
    and the decoding and resizing libraries' versions (their output is not pinned across versions)."""
    digest = hashlib.sha256(cfg.cache_key().encode())
    digest.update(f"cv2 {cv2.__version__} pillow {PIL.__version__}\n".encode())
    for s in samples:
        st = s.path.stat()
        digest.update(f"{s.path}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:12]


def to_batch(pixels: np.ndarray, cfg: PreprocessConfig) -> torch.Tensor:
    return torch.from_numpy(np.stack([to_input(p, cfg) for p in pixels]))


def augment(batch: torch.Tensor, generator: torch.Generator, strength: float = 1.0) -> torch.Tensor:
    """Random flips, any rotation, scale, brightness/contrast and per-channel colour gain.

    Fundus photographs have no canonical orientation, so full rotations are safe; scale and
    colour ranges stay mild so lesions keep their look.
    """
    n = batch.shape[0]
    dev = batch.device

    def uniform(lo: float, hi: float, *shape: int) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(*shape, generator=generator).to(dev)

    angle = uniform(-np.pi, np.pi, n)
    scale = uniform(1 - 0.1 * strength, 1 + 0.1 * strength, n)
    flip = torch.where(torch.rand(n, generator=generator).to(dev) < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [
            torch.stack([cos * flip, -sin, torch.zeros_like(cos)], 1),
            torch.stack([sin * flip, cos, torch.zeros_like(cos)], 1),
        ],
        1,
    )
    grid = F.affine_grid(theta, list(batch.shape), align_corners=False)
    # padding value: the normalised grey that Ben Graham's preprocessing leaves outside the disc
    out = F.grid_sample(batch, grid, mode="bilinear", padding_mode="border", align_corners=False)
    contrast = uniform(1 - 0.2 * strength, 1 + 0.2 * strength, n, 1, 1, 1)
    brightness = uniform(-0.1 * strength, 0.1 * strength, n, 1, 1, 1)
    gain = uniform(1 - 0.05 * strength, 1 + 0.05 * strength, n, 3, 1, 1)
    return out * contrast * gain + brightness
