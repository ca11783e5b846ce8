"""Image-quality gate: is this a gradable colour fundus photograph?

Four scores in [0, 1], each from a few interpretable measurements at a fixed analysis size:

- ``fundus``: a bright, roughly circular disc (possibly clipped by the frame) on a dark
  surround, with warm (red >= blue) colour inside. Documents, everyday photos, noise and solid
  colours fail here.
- ``field_of_view``: how much of the fitted disc lies inside the frame and how much of the frame it
  covers. A whole fundus inside a wide black border (some export tools paste the photograph on a
  bigger canvas) is judged where it is: when the frame fails this check and the disc touches no
  edge of the frame, every score is measured again on the photograph cropped to the disc
  (:func:`fundus_crop`), at its own scale, provided the disc is at least ``min_disc_px`` across.
- ``exposure``: brightness inside the disc and the share of clipped dark/bright pixels.
- ``focus``: fine-detail (vessel-edge) energy relative to coarser structure inside the disc,
  which is contrast-independent and drops steeply with defocus blur, and the absolute fine-detail
  energy, because under heavy blur the coarse structure fades too and the ratio recovers.

Raw measurements map to scores through linear ramps whose end points, like the pass marks,
live in :class:`QualityThresholds` so a released model can ship its own calibration as JSON.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Final

import cv2
import numpy as np

from ml.preprocess import disc_bbox

__all__ = [
    "ANALYSIS_SIZE",
    "DECODE_MIN_SIDE",
    "QualityReport",
    "QualityThresholds",
    "assess_frame",
    "assess_quality",
    "fundus_crop",
    "load_thresholds",
    "measure",
    "thresholds_for_manifest",
]

ANALYSIS_SIZE = 512
#: Workers may decode a big JPEG at a reduced DCT scale down to this shorter side
#: (``ml.imageio.decode_scaled``): twice what the gate analyses, far above the networks' 256 px.
DECODE_MIN_SIDE = 2 * ANALYSIS_SIZE
DEFAULT_THRESHOLDS_PATH = Path(__file__).with_name("quality_thresholds.json")

# The gate runs beside other CPU work (workers, training); one OpenCV thread is plenty at 512 px.
cv2.setNumThreads(1)


@dataclass(frozen=True)
class QualityThresholds:
    """Pass marks on the four scores plus the ramps that turn raw measurements into scores.

    A ramp ``(lo, hi)`` maps a raw value ``<= lo`` to 0 and ``>= hi`` to 1, linearly between.
    """

    min_focus: float = 0.5
    min_exposure: float = 0.5
    min_field_of_view: float = 0.5
    min_fundus: float = 0.5
    # smallest fundus (diameter, pixels of the photograph) judged inside a black border: the
    # smallest gradable real photographs' discs are ~170 px (the equalised EyePACS set's 256-px
    # photographs, which the release was trained on); a smaller one stays poor_field_of_view
    min_disc_px: float = 160.0
    # fundus
    circle_fit_iou: tuple[float, float] = (0.62, 0.78)
    surround_darkness: tuple[float, float] = (0.60, 0.85)
    red_over_blue: tuple[float, float] = (0.30, 0.45)
    saturation: tuple[float, float] = (0.03, 0.08)
    # field of view
    disc_visible: tuple[float, float] = (0.45, 0.70)
    frame_coverage: tuple[float, float] = (0.20, 0.40)
    # exposure (luminance 0..255 inside the disc)
    mean_luma_dark: tuple[float, float] = (15.0, 35.0)
    mean_luma_bright: tuple[float, float] = (240.0, 215.0)
    clipped_bright: tuple[float, float] = (0.25, 0.10)
    clipped_dark: tuple[float, float] = (0.50, 0.20)
    # focus: log10 of the fine/coarse band energy ratio, and log10 of the fine band's energy.
    # Both must pass; the energy ramp (added in version 2 of the JSON) catches heavy blur
    # (sigma >= ~8 px at 512 px), where the coarse band empties too and the ratio climbs back.
    # A file without it (version 1) gets this default, so older calibrations gain the check.
    focus_log_ratio: tuple[float, float] = (-1.6, -1.1)
    focus_log_energy: tuple[float, float] = (-1.0, -0.4)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QualityThresholds:
        """Build from a JSON-like dict; unknown keys are rejected so typos cannot pass silently."""
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known - {"comment", "version"}
        if unknown:
            raise ValueError(f"unknown quality threshold keys: {sorted(unknown)}")
        kwargs: dict[str, Any] = {}
        for key in known & set(data):
            value = data[key]
            kwargs[key] = tuple(float(v) for v in value) if isinstance(value, list) else float(value)
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def load_thresholds(path: str | Path | None = None) -> QualityThresholds:
    """Load thresholds from JSON (e.g. the file shipped with a released model).

    With no path, the calibrated file next to this module is used if present, else defaults.
    """
    target = Path(path) if path is not None else DEFAULT_THRESHOLDS_PATH
    if path is None and not target.is_file():
        return QualityThresholds()
    return QualityThresholds.from_dict(json.loads(target.read_text(encoding="utf-8")))


def thresholds_for_manifest(shipped: Mapping[str, Any] | None) -> QualityThresholds | None:
    """The gate calibration a released ensemble ships (its manifest's ``quality_thresholds``,
    e.g. ``Ensemble.quality_thresholds``), or None when it ships none (the gate's default then).

    Built once per distinct calibration: workers ask for every batch they score."""
    if not shipped:
        return None
    return _thresholds_from_items(
        tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in shipped.items()))
    )


@functools.cache
def _thresholds_from_items(items: tuple[tuple[str, Any], ...]) -> QualityThresholds:
    return QualityThresholds.from_dict({k: list(v) if isinstance(v, tuple) else v for k, v in items})


@dataclass
class QualityReport:
    gradable: bool
    scores: dict[str, float]
    reasons: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: {"gradable", "focus", "exposure", "field_of_view", "fundus", "reasons"}."""
        return {"gradable": self.gradable, **self.scores, "reasons": list(self.reasons)}


def _ramp(value: float, bounds: tuple[float, float]) -> float:
    lo, hi = bounds
    if not math.isfinite(value):
        return 0.0
    t = (value - lo) / (hi - lo)  # works for falling ramps too (hi < lo)
    return float(min(1.0, max(0.0, t)))


def _resize(rgb: np.ndarray) -> np.ndarray:
    h, w = rgb.shape[:2]
    scale = ANALYSIS_SIZE / max(h, w)
    if scale == 1.0:
        return rgb
    interp = cv2.INTER_AREA if scale < 1.0 else cv2.INTER_LINEAR
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return cv2.resize(rgb, size, interpolation=interp)


def _channel_max(img: np.ndarray) -> np.ndarray:
    """Same values as ``img.max(axis=2)``, ~30x faster (numpy reduces a 3-long last axis slowly)."""
    return np.maximum(np.maximum(img[..., 0], img[..., 1]), img[..., 2])


def _dark_threshold(v: np.ndarray) -> float:
    """The level above which the (median-blurred) channel maximum counts as the disc."""
    otsu, _ = cv2.threshold(v, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    # Half of Otsu keeps the vignetted rim of the disc; the clamp keeps dark photos workable.
    return float(min(max(otsu * 0.5, 6.0), 30.0))


def _disc_mask(vmax: np.ndarray) -> np.ndarray:
    """Bright foreground (the fundus disc): largest blob above a dark-background threshold.

    ``vmax`` is the photograph's uint8 channel maximum.
    """
    v = cv2.medianBlur(vmax, 5)
    thr = _dark_threshold(v)
    # Opening removes background speckle (strongly equalised photos amplify sensor noise there).
    fg = cv2.morphologyEx(
        (v > thr).astype(np.uint8), cv2.MORPH_OPEN, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (11, 11))
    )
    n, labels = cv2.connectedComponents(fg, connectivity=8)
    if n <= 1:
        return np.zeros(v.shape, dtype=bool)
    # One blob (most photographs, after the opening) needs no counting: the count costs ~0.8 ms.
    # Otherwise areas by counting labels: connectedComponentsWithStats spends ~3x as long
    # computing statistics of which only the area is used.
    largest = 1 if n == 2 else 1 + int(np.argmax(np.bincount(labels.ravel(), minlength=n)[1:]))
    blob = (labels == largest).astype(np.uint8)
    contours, _ = cv2.findContours(blob, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    filled = np.zeros_like(blob)
    cv2.drawContours(filled, contours, -1, 1, thickness=cv2.FILLED)  # fill holes (dark lesions)
    return filled.astype(bool)


def _percentile_u8(values: np.ndarray, where: np.ndarray, q: float) -> float:
    """``np.percentile(values[where], q)`` (linear method) of a uint8 image, from its histogram.

    The two order statistics around position ``(n - 1) * q / 100`` are read off the cumulative
    histogram instead of partitioning ~10^5 values (~5x faster). For q = 50 and 75 the fraction
    between them is a multiple of 1/4, so the interpolation is exact, as numpy's is.
    """
    hist = cv2.calcHist([values], [0], where.view(np.uint8), [256], [0, 256]).ravel()
    cum = np.cumsum(hist)
    n = int(cum[-1])
    pos = (n - 1) * (q / 100)
    lo = math.floor(pos)
    a = int(np.searchsorted(cum, lo, side="right"))  # the lo-th smallest value (from 0)
    b = int(np.searchsorted(cum, min(lo + 1, n - 1), side="right"))
    return a + (b - a) * (pos - lo)


def _fit_circle(mask: np.ndarray) -> tuple[float, float, float] | None:
    """Least-squares circle through the disc edge, ignoring edge points on the frame border.

    Using only the free boundary lets a disc clipped top and bottom (common in EyePACS) still
    fit its true circle.
    """
    h, w = mask.shape
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    if not contours:
        return None
    pts = max(contours, key=cv2.contourArea).reshape(-1, 2).astype(np.float64)
    m = 2
    keep = (pts[:, 0] > m) & (pts[:, 0] < w - 1 - m) & (pts[:, 1] > m) & (pts[:, 1] < h - 1 - m)
    pts = pts[keep]
    if len(pts) < 30:
        return None
    x, y = pts[:, 0], pts[:, 1]
    # Kasa fit: x^2 + y^2 = 2ax + 2by + c
    a_mat = np.column_stack([2 * x, 2 * y, np.ones_like(x)])
    sol, *_ = np.linalg.lstsq(a_mat, x * x + y * y, rcond=None)
    cx, cy, c = (float(s) for s in sol)
    r2 = c + cx * cx + cy * cy
    if r2 <= 0:
        return None
    return cx, cy, math.sqrt(r2)


def _share(flags: np.ndarray) -> float:
    """``float(flags.mean())`` of a boolean array (the same value), without a float64 copy."""
    return np.count_nonzero(flags) / flags.size


def _blur_sigma8(b2: np.ndarray) -> np.ndarray:
    """``GaussianBlur(g, sigma=8)`` from ``b2 = GaussianBlur(g, sigma=2)``, ~7x cheaper.

    Gaussians compose (8^2 = 2^2 + 60), and b2 keeps almost nothing above half its Nyquist
    frequency, so the remaining sigma-sqrt(60) blur runs on a half-size copy that cubic
    interpolation brings back. On the 942 images of scripts/quality_report.py this moved
    ``focus_log_ratio`` by a median 0.0003 (at most 0.04) and changed no decision.
    """
    h, w = b2.shape
    small = cv2.resize(b2, (max(1, w // 2), max(1, h // 2)), interpolation=cv2.INTER_AREA)
    small = cv2.GaussianBlur(small, (0, 0), math.sqrt(60.0) / 2)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)


def measure(rgb: np.ndarray) -> dict[str, float]:
    """Raw, threshold-free measurements of an RGB uint8 photo (exposed for calibration)."""
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError("expected an H x W x 3 uint8 RGB array")
    img = _resize(rgb)
    h, w = img.shape[:2]
    vmax_u8 = _channel_max(img)
    mask = _disc_mask(vmax_u8)
    out: dict[str, float] = {"frame_coverage": _share(mask)}

    circle = _fit_circle(mask) if mask.any() else None
    if circle is not None and circle[2] > 8:
        cx, cy, r = circle
        # Squared distance to the centre by broadcasting a column and a row: the same float64
        # values as from a full np.mgrid grid, at a fifth of the cost.
        d2 = (np.arange(w) - cx) ** 2 + (np.arange(h)[:, None] - cy) ** 2
        in_circle = d2 <= r * r
        inter = float(np.count_nonzero(in_circle & mask))
        union = float(np.count_nonzero(in_circle | mask))
        out["circle_fit_iou"] = inter / union if union else 0.0
        out["disc_visible"] = min(1.0, float(np.count_nonzero(in_circle)) / (math.pi * r * r))
        out["radius_frac"] = r / max(h, w)
        out["centre_offset"] = math.hypot(cx - w / 2, cy - h / 2) / r
        outside = d2 > (1.08 * r) ** 2  # a margin past the rim avoids its glow
        out["outside_frac"] = _share(outside)
    else:
        out.update(circle_fit_iou=0.0, disc_visible=0.0, radius_frac=0.0, centre_offset=9.0)
        outside = ~mask
        out["outside_frac"] = _share(outside)

    # Analyse inside a slightly eroded disc so the rim's dark falloff does not count.
    inner = cv2.erode(mask.astype(np.uint8), np.ones((9, 9), np.uint8)).astype(bool)
    if np.count_nonzero(inner) < 0.02 * h * w:
        inner = np.ones((h, w), dtype=bool) if not mask.any() else mask
    # Only the disc's pixels, gathered once per channel (uint8, then float32 as before).
    channels = cv2.split(img)
    r_in, g_in, b_in = (c[inner].astype(np.float32) for c in channels)
    vmax = vmax_u8[inner].astype(np.float32)
    li = 0.299 * r_in + 0.587 * g_in + 0.114 * b_in
    out["mean_luma"] = float(li.mean())
    # Luminance, not the max channel: a saturated red channel alone is normal in fundus photos.
    out["clipped_bright"] = _share(li >= 240)
    out["clipped_dark"] = _share(li <= 8)

    # Dark surround: brightness outside relative to inside (1 = pitch black surround).
    if out["outside_frac"] >= 0.03:
        v_out = _percentile_u8(vmax_u8, outside, 75)
        v_in = _percentile_u8(vmax_u8, inner, 50) + 1.0
        out["surround_darkness"] = max(0.0, 1.0 - v_out / v_in)
    else:
        out["surround_darkness"] = 0.0
    # Colour: fundus pixels are mostly red >= blue (less so after equalisation), never grey.
    out["red_over_blue"] = _share(r_in + 2 >= b_in)
    sat = (vmax - np.minimum(np.minimum(r_in, g_in), b_in)) / (vmax + 1.0)
    out["saturation"] = float(sat.mean())

    # Focus: fine band (sigma 0.7 -> 2) vs coarse band (2 -> 8) energy on the green channel.
    if float(g_in.std()) > 1.0:
        g = channels[1].astype(np.float32)
    else:
        f = img.astype(np.float32)
        g = 0.299 * f[..., 0] + 0.587 * f[..., 1] + 0.114 * f[..., 2]
    b1 = cv2.GaussianBlur(g, (0, 0), 0.7)
    b2 = cv2.GaussianBlur(g, (0, 0), 2.0)
    b3 = _blur_sigma8(b2)
    core = cv2.erode(inner.astype(np.uint8), np.ones((25, 25), np.uint8)).astype(bool)
    if np.count_nonzero(core) < 0.02 * h * w:
        core = inner
    fine = float(np.mean((b1 - b2)[core] ** 2))
    coarse = float(np.mean((b2 - b3)[core] ** 2)) + 1e-6
    out["focus_log_ratio"] = math.log10(fine / coarse + 1e-9)
    # Absolute fine-band energy (8-bit units^2 at the analysis size). Not contrast-independent,
    # but the ratio alone is fooled by heavy blur, and this falls steadily with any blur.
    out["sharp_energy"] = fine
    out["focus_log_energy"] = math.log10(fine + 1e-9)
    # Diagnostic only: calibration compared it, and it separates blurred from sharp photos worse.
    out["coarse_energy"] = coarse
    return out


#: Channels this close (8-bit levels) count as grey: JPEG's chroma rounding of a grey picture.
_GREY_SPREAD: Final = 4


def is_monochrome(rgb: np.ndarray) -> bool:
    """No colour where there is picture: at least 98% of the lit pixels (brightest channel above
    30, so the black surround does not count) have their three channels within a few levels. A
    fundus photograph's lit pixels are red over blue; the model grades colour photographs only
    (on grey ones its grade moved by up to 2: the session-31 review)."""
    step = max(1, min(rgb.shape[:2]) // 96)  # ~100 x 100 pixels whatever the photograph's size
    r, g, b = (rgb[::step, ::step, c] for c in range(3))
    # channel by channel: numpy's reduction over a 3-long axis is ~50x slower
    top, low = np.maximum(np.maximum(r, g), b), np.minimum(np.minimum(r, g), b)  # uint8: no wrap
    lit = top > 30
    if not lit.any():
        return False  # a black frame: the exposure check says so
    return float(np.mean((top - low)[lit] <= _GREY_SPREAD)) >= 0.98


@functools.cache
def _shipped_thresholds() -> QualityThresholds:
    return load_thresholds()


#: Pixels (at the analysis size) searched beyond the coarse disc box on the photograph's pixels.
_EDGE: Final = 2
#: A side of the disc's bounding box whose outermost row (or column) is lit over this share of the
#: box is a straight cut (the pasted photograph's own frame), not the disc's round rim.
_CUT_SHARE: Final = 0.3
#: Black margin kept beyond a round side of the disc, as a share of the disc's extent: a
#: photograph's own surround (the gate's surround-darkness check needs some).
_ROUND_MARGIN: Final = 0.1
#: A crop narrower than this is no photograph to judge (the decoder's smallest side).
_MIN_CROP_SIDE: Final = 64


def _lit_span(counts: np.ndarray, length: int) -> tuple[int, int] | None:
    """From the first to past the last line whose count of lit pixels exceeds 2% of its
    ``length`` (as ``ml.preprocess.disc_bbox``): bright specks in the border do not count."""
    lines = np.flatnonzero(counts > 0.02 * length)
    return (int(lines[0]), int(lines[-1]) + 1) if lines.size else None


def fundus_crop(rgb: np.ndarray) -> np.ndarray | None:
    """The photograph cropped to its fundus (the disc's box), or None when no disc is found.

    Straight sides of the disc (where the frame, or a pasted photograph's own frame, cut it: e.g.
    EyePACS' top and bottom) are cropped flush, so they lie on the crop's edge as in the
    photograph itself and the circle fit leaves them out; round sides keep a margin of black.
    Found at the analysis size, refined on the photograph's pixels.
    """
    img = _resize(rgb)
    h, w = img.shape[:2]
    coarse = _channel_max(img)
    mask = _disc_mask(coarse)
    if not mask.any():
        return None
    ys, xs = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    sy, sx = rgb.shape[0] / h, rgb.shape[1] / w
    # the disc's box on the photograph's own pixels, searched a little beyond the coarse box
    y0, y1 = max(0, int((ys[0] - _EDGE) * sy)), min(rgb.shape[0], math.ceil((ys[-1] + 1 + _EDGE) * sy))
    x0, x1 = max(0, int((xs[0] - _EDGE) * sx)), min(rgb.shape[1], math.ceil((xs[-1] + 1 + _EDGE) * sx))
    lit = _channel_max(rgb[y0:y1, x0:x1]) > _dark_threshold(cv2.medianBlur(coarse, 5))
    rows, cols = _lit_span(lit.sum(axis=1), lit.shape[1]), _lit_span(lit.sum(axis=0), lit.shape[0])
    if rows is None or cols is None:
        return None
    top, bottom, left, right = y0 + rows[0], y0 + rows[1], x0 + cols[0], x0 + cols[1]
    box = lit[rows[0] : rows[1], cols[0] : cols[1]]
    height, width = bottom - top, right - left
    my, mx = round(_ROUND_MARGIN * height), round(_ROUND_MARGIN * width)

    def cut(line: np.ndarray) -> bool:
        return float(np.count_nonzero(line)) > _CUT_SHARE * line.size

    top = top if cut(box[0]) else max(0, top - my)
    bottom = bottom if cut(box[-1]) else min(rgb.shape[0], bottom + my)
    left = left if cut(box[:, 0]) else max(0, left - mx)
    right = right if cut(box[:, -1]) else min(rgb.shape[1], right + mx)
    return np.ascontiguousarray(rgb[top:bottom, left:right])


def assess_quality(rgb: np.ndarray, thresholds: QualityThresholds | None = None) -> QualityReport:
    """Score a decoded RGB photo and decide whether it is gradable.

    Without ``thresholds`` the calibrated ``quality_thresholds.json`` beside this module is used.
    A photograph whose field of view fails on the whole frame is judged again on
    :func:`fundus_crop` (a fundus pasted on a bigger black canvas is no worse a photograph), when
    that disc is at least ``min_disc_px`` across and the model's own crop finds it; the crop's
    field of view still refuses a cut-off fundus (too little of its circle is there).
    """
    t = thresholds or _shipped_thresholds()
    report = assess_frame(rgb, t)
    if report.scores["field_of_view"] >= t.min_field_of_view:
        return report
    if disc_bbox(rgb) == (0, rgb.shape[0], 0, rgb.shape[1]):
        # the networks' crop (ml.preprocess) finds no disc under a fifth of the frame and would
        # grade the whole canvas: such a photograph stays refused
        return report
    crop = fundus_crop(rgb)
    if crop is None or min(crop.shape[:2]) < _MIN_CROP_SIDE:
        return report
    m = measure(crop)
    if 2.0 * m["radius_frac"] * max(crop.shape[:2]) < t.min_disc_px:
        return report  # too small a fundus: refused as poor_field_of_view, as on the whole frame
    return _judge(m, crop, t)


def assess_frame(rgb: np.ndarray, thresholds: QualityThresholds | None = None) -> QualityReport:
    """The verdict on the whole frame as given, without looking inside a black border (the gate
    before session 32; ``scripts/border_gate_check.py`` compares the two)."""
    t = thresholds or _shipped_thresholds()
    return _judge(measure(rgb), rgb, t)


def _judge(m: dict[str, float], rgb: np.ndarray, t: QualityThresholds) -> QualityReport:
    """Scores and reasons from the raw measurements ``m`` of ``rgb``."""
    shape = min(
        _ramp(m["circle_fit_iou"], t.circle_fit_iou), _ramp(m["surround_darkness"], t.surround_darkness)
    )
    fundus = min(shape, _ramp(m["red_over_blue"], t.red_over_blue), _ramp(m["saturation"], t.saturation))
    fov = min(_ramp(m["disc_visible"], t.disc_visible), _ramp(m["frame_coverage"], t.frame_coverage))
    dark = min(_ramp(m["mean_luma"], t.mean_luma_dark), _ramp(m["clipped_dark"], t.clipped_dark))
    bright = min(_ramp(m["mean_luma"], t.mean_luma_bright), _ramp(m["clipped_bright"], t.clipped_bright))
    exposure = min(dark, bright)
    # A sharp photograph must pass both: heavy blur fails the energy even where the ratio recovers.
    focus_ratio = _ramp(m["focus_log_ratio"], t.focus_log_ratio)
    focus_energy = _ramp(m["focus_log_energy"], t.focus_log_energy)
    focus = min(focus_ratio, focus_energy)

    scores = {
        "focus": round(focus, 4),
        "exposure": round(exposure, 4),
        "field_of_view": round(fov, 4),
        "fundus": round(fundus, 4),
    }
    reasons: list[str] = []
    if fundus < t.min_fundus:
        # a grey (or red-free) fundus photograph fails the colour checks only: "not a fundus
        # photograph" sent clinics looking for the wrong fault (the session-31 review)
        grey_fundus = shape >= t.min_fundus and is_monochrome(rgb)
        reasons.append("monochrome" if grey_fundus else "not_fundus")
    if fov < t.min_field_of_view:
        reasons.append("poor_field_of_view")
    if exposure < t.min_exposure:
        reasons.append("underexposed" if dark <= bright else "overexposed")
    if focus < t.min_focus:
        reasons.append("out_of_focus")
    return QualityReport(gradable=not reasons, scores=scores, reasons=reasons)
