"""Fundus photograph -> model input. The settings travel inside each checkpoint's config.json,
so serving applies exactly what training applied.

Steps: find the fundus disc (the bright region on a dark surround), crop to it, pad to a
square, resize, then optional enhancements from the DR literature:
- ``ben``: Ben Graham's local average subtraction (4*img - 4*blur(img) + 128); it removes
  camera colour and illumination, which is what lets equalised EyePACS training transfer to
  natural-colour photographs.
- ``equalize``: histogram equalisation of each colour channel over the disc. It reproduces the
  third party's processing of the equalised EyePACS folder (on the 82 photographs in both
  folders, correlation 0.986 / 0.981 / 0.952 per channel with the equalised copy:
  scripts/equalize_check.py), so a natural-colour photograph enters the network looking like the
  stage-1 training photographs. Members retrained with it were no better (docs/experiments.md,
  session 21); no shipped member uses it.
- ``clahe``: contrast-limited histogram equalisation on the L channel.
- ``blur`` / ``sharpen``: mild Gaussian smoothing or unsharp masking.
- ``circle_mask``: blank everything outside the inscribed circle (drops border artefacts).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from dataclasses import asdict, dataclass
from typing import Any

import cv2
import numpy as np

ENHANCEMENTS = ("equalize", "ben", "clahe", "blur", "sharpen")
#: Bumped when the pixels a config produces change (2: Ben Graham's blur by ``ben_blur``; 3: a disc
#: on a wide black canvas is cropped as its photograph is, see ``disc_bbox``).
PIXELS_REVISION = 3


@dataclass(frozen=True)
class PreprocessConfig:
    size: int = 256
    crop_to_disc: bool = True
    circle_mask: bool = True
    enhancements: tuple[str, ...] = ("ben",)
    ben_sigma_fraction: float = 1 / 30  # Gaussian sigma as a fraction of the image side
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def __post_init__(self) -> None:
        unknown = [e for e in self.enhancements if e not in ENHANCEMENTS]
        if unknown:
            raise ValueError(f"unknown enhancements {unknown}; choose from {ENHANCEMENTS}")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["enhancements"] = list(self.enhancements)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PreprocessConfig:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        for key in ("enhancements", "mean", "std"):
            if key in known:
                known[key] = tuple(known[key])
        return cls(**known)

    def cache_key(self) -> str:
        """Identifies the pixel pipeline (normalisation excluded) for on-disk caches."""
        data = self.to_dict()
        data.pop("mean"), data.pop("std")
        data["revision"] = PIXELS_REVISION  # a change of the code's output invalidates old caches
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]


def disc_bbox(rgb: np.ndarray, threshold: int = 15) -> tuple[int, int, int, int]:
    """Bounding box (y0, y1, x0, x1) of the fundus disc; the whole image if none is found.

    A line of the frame is the disc's when over 2% of it is lit (:func:`frame_disc_bbox`). On a
    wide black canvas (under ``_BORDERED_SHARE`` of the frame lit: an export tool pasted the
    photograph on it) 2% of the canvas is a different count than 2% of the photograph, and the
    crop moved by a line or two, which moved grades near a cut; since session 32 a line counts
    there when over 2% of the disc's own extent is lit (:func:`_disc_relative_bbox`).
    """
    # np.maximum over the channels: the same as rgb.max(axis=2), many times faster
    gray = np.maximum(np.maximum(rgb[..., 0], rgb[..., 1]), rgb[..., 2]) if rgb.ndim == 3 else rgb
    mask = gray > threshold
    h, w = gray.shape[:2]
    if np.count_nonzero(mask) < _BORDERED_SHARE * h * w:
        box = _disc_relative_bbox(mask)
        if box is not None:
            return box
    return _frame_relative_bbox(mask) or (0, h, 0, w)


def frame_disc_bbox(rgb: np.ndarray, threshold: int = 15) -> tuple[int, int, int, int]:
    """The box before session 32: lines counted against the frame only (for comparisons)."""
    gray = np.maximum(np.maximum(rgb[..., 0], rgb[..., 1]), rgb[..., 2]) if rgb.ndim == 3 else rgb
    return _frame_relative_bbox(gray > threshold) or (0, gray.shape[0], 0, gray.shape[1])


def _frame_relative_bbox(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    rows = np.flatnonzero(mask.mean(axis=1) > 0.02)
    cols = np.flatnonzero(mask.mean(axis=0) > 0.02)
    h, w = mask.shape
    if rows.size < h * 0.2 or cols.size < w * 0.2:
        return None
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def _disc_relative_bbox(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """The disc's box with lines counted against the disc's own extent, or None. When the
    photograph's frame hugs the disc (EyePACS: the disc cut top and bottom, a little black at the
    sides) this is the box the photograph itself gets, to the line."""
    lit = np.count_nonzero(mask)
    if lit == 0:
        return None
    per_row, per_col = mask.sum(axis=1), mask.sum(axis=0)
    extent = math.sqrt(lit)  # a first guess of the disc's side, for the rough box
    rows, cols = np.flatnonzero(per_row > 0.02 * extent), np.flatnonzero(per_col > 0.02 * extent)
    if rows.size == 0 or cols.size == 0:
        return None
    height, width = int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)
    rows, cols = np.flatnonzero(per_row > 0.02 * width), np.flatnonzero(per_col > 0.02 * height)
    if rows.size < 0.2 * height or cols.size < 0.2 * width or min(rows.size, cols.size) < _MIN_DISC_LINES:
        return None
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


#: Under this share of the frame lit, a photograph is a fundus on a wide black canvas: the quality
#: gate's frame check fails under a coverage of ~0.3 (and it judges the fundus where it is,
#: ``ml.quality.fundus_crop``); every gradable real photograph here has >= 0.33 (natural EyePACS
#: >= 0.41 but one, equalised >= 0.48 but one, DRIVE 0.69).
_BORDERED_SHARE = 0.3
#: Fewer lit lines than this are no disc to crop to (specks, text): the whole frame is kept.
_MIN_DISC_LINES = 32


def crop_square(rgb: np.ndarray, crop_to_disc: bool) -> np.ndarray:
    """Crop to the disc and pad the shorter side with black so the disc stays round."""
    if crop_to_disc:
        y0, y1, x0, x1 = disc_bbox(rgb)
        rgb = rgb[y0:y1, x0:x1]
    h, w = rgb.shape[:2]
    side = max(h, w)
    out = np.zeros((side, side, 3), dtype=rgb.dtype)
    top, left = (side - h) // 2, (side - w) // 2
    out[top : top + h, left : left + w] = rgb
    return out


def _circle(size: int, margin: float = 0.96) -> np.ndarray:
    mask = np.zeros((size, size), dtype=np.uint8)
    cv2.circle(mask, (size // 2, size // 2), int(size / 2 * margin), 1, thickness=-1)
    return mask


@functools.cache
def _gaussian_kernel(sigma: float) -> np.ndarray:
    # The kernel size OpenCV's GaussianBlur picks for uint8 images (6 sigma + 1, odd).
    return cv2.getGaussianKernel(round(sigma * 6 + 1) | 1, sigma)


def ben_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """The Gaussian blur of Ben Graham's filter: GaussianBlur's kernel, size and border.

    cv2.GaussianBlur on uint8 runs a bit-exact fixed-point path that costs ~3.3 ms at 256 px;
    the same separable kernel in floating point (sepFilter2D) costs ~0.9 ms and differs only
    in rounding: the blurred value by at most 1 (docs/performance.md, session 9).
    """
    k = _gaussian_kernel(sigma)
    return cv2.sepFilter2D(img, -1, k, k, borderType=cv2.BORDER_REFLECT_101)


def equalize_channels(img: np.ndarray, threshold: int = 15) -> np.ndarray:
    """Histogram-equalise each channel over the disc (channel maximum above ``threshold``,
    as :func:`disc_bbox`); the dark surround, and any pixel as dark inside the disc, becomes
    black and does not count."""
    disc = np.maximum(np.maximum(img[..., 0], img[..., 1]), img[..., 2]) > threshold
    n = int(disc.sum())
    out = np.zeros_like(img)
    if n == 0:
        return out
    for c in range(3):
        channel = img[..., c]
        cdf = np.cumsum(np.bincount(channel[disc], minlength=256))
        lut = np.round(cdf * (255.0 / n)).astype(np.uint8)  # value -> share of disc pixels at or below
        out[..., c] = lut[channel]
    out[~disc] = 0
    return out


def enhance(img: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
    """Apply the configured enhancements to a square uint8 RGB image."""
    for step in cfg.enhancements:
        if step == "equalize":
            img = equalize_channels(img)
        elif step == "ben":
            sigma = max(1.0, cfg.size * cfg.ben_sigma_fraction)
            img = cv2.addWeighted(img, 4, ben_blur(img, sigma), -4, 128)
        elif step == "clahe":
            lab = cv2.cvtColor(img, cv2.COLOR_RGB2LAB)
            clahe = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8))
            lab[..., 0] = clahe.apply(lab[..., 0])
            img = cv2.cvtColor(lab, cv2.COLOR_LAB2RGB)
        elif step == "blur":
            img = cv2.GaussianBlur(img, (0, 0), 1.0)
        elif step == "sharpen":
            blurred = cv2.GaussianBlur(img, (0, 0), 2.0)
            img = cv2.addWeighted(img, 1.5, blurred, -0.5, 0)
    return img


def prepare_pixels(rgb: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
    """Decoded photo (H,W,3 uint8) -> square enhanced uint8 image of cfg.size (cacheable)."""
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected an H x W x 3 uint8 RGB image, got {rgb.shape} {rgb.dtype}")
    square = crop_square(rgb, cfg.crop_to_disc)
    interp = cv2.INTER_AREA if square.shape[0] > cfg.size else cv2.INTER_LINEAR
    img = cv2.resize(square, (cfg.size, cfg.size), interpolation=interp)
    img = enhance(img, cfg)
    if cfg.circle_mask:
        fill = 128 if "ben" in cfg.enhancements else 0
        img[_circle(cfg.size) == 0] = fill  # in place: img is this function's own array
    return img


def to_input(pixels: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
    """uint8 HWC -> normalised float32 CHW, ready for torch.from_numpy / ONNX Runtime."""
    # One CHW float32 copy, then in-place arithmetic: the same float32 operations as
    # (x / 255 - mean) / std on HWC, without three temporaries and a final transposing copy.
    x = np.ascontiguousarray(pixels.transpose(2, 0, 1), dtype=np.float32)
    x /= np.float32(255.0)
    x -= np.asarray(cfg.mean, dtype=np.float32)[:, None, None]
    x /= np.asarray(cfg.std, dtype=np.float32)[:, None, None]
    return x


def preprocess(rgb: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
    return to_input(prepare_pixels(rgb, cfg), cfg)
