"""Quality gate: synthetic fundus-like images plus a few real photographs."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image, ImageFilter

from ml.imageio import decode_image
from ml.quality import QualityReport, QualityThresholds, assess_quality, is_monochrome, load_thresholds

REPO = Path(__file__).resolve().parents[2]
SHARED = Path("/work/shared/data")


def synthetic_fundus(h: int = 384, w: int = 512, seed: int = 0) -> np.ndarray:
    """A red-orange disc on black with a branching 'vessel' texture and fine detail."""
    rng = np.random.default_rng(seed)
    img = np.zeros((h, w, 3), np.uint8)
    disc = np.zeros((h, w), np.uint8)
    cv2.circle(disc, (w // 2, h // 2), int(0.45 * h), 1, -1)
    base = np.array([170, 80, 35], np.float32)
    tex = rng.normal(0, 6, (h, w)).astype(np.float32)
    for _ in range(40):  # vessels: thin dark lines
        p1 = tuple(int(v) for v in rng.integers(0, [w, h]))
        p2 = tuple(int(v) for v in rng.integers(0, [w, h]))
        cv2.line(tex, p1, p2, -40.0, int(rng.integers(1, 4)))
    body = np.clip(base[None, None, :] * (1 + tex[..., None] / 100.0), 0, 255)
    img[disc.astype(bool)] = body[disc.astype(bool)].astype(np.uint8)
    return img


def _inside_disc(change: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """The synthetic fundus with ``change`` applied to the disc's pixels (N x 3) only."""
    img = synthetic_fundus()
    disc = img.sum(axis=2) > 0
    img[disc] = change(img[disc]).astype(np.uint8)
    return img


def real_photos(folder: str, n: int) -> list[np.ndarray]:
    """A few real photographs: samples/ if present, else the shared data (fail loudly if absent)."""
    samples = sorted((REPO / "samples").glob("*.jp*g")) if (REPO / "samples").is_dir() else []
    if folder == "samples" and samples:
        return [decode_image(p.read_bytes()) for p in samples[:n]]
    src = SHARED / folder / "images"
    if not src.is_dir():
        pytest.fail(f"real photographs needed for this test are missing: {src}")
    return [decode_image(p.read_bytes()) for p in sorted(src.iterdir())[:n]]


def test_report_shape_and_as_dict() -> None:
    q = assess_quality(synthetic_fundus())
    assert isinstance(q, QualityReport)
    d = q.as_dict()
    assert set(d) == {"gradable", "focus", "exposure", "field_of_view", "fundus", "reasons"}
    assert all(0.0 <= d[k] <= 1.0 for k in ("focus", "exposure", "field_of_view", "fundus"))
    json.dumps(d)


def test_synthetic_fundus_is_gradable() -> None:
    q = assess_quality(synthetic_fundus())
    assert q.gradable, q.as_dict()


@pytest.mark.parametrize(
    ("name", "make", "reason"),
    [
        ("black", lambda: np.zeros((300, 400, 3), np.uint8), "not_fundus"),
        ("white", lambda: np.full((300, 400, 3), 255, np.uint8), "not_fundus"),
        ("orange", lambda: np.full((300, 400, 3), (200, 90, 30), np.uint8), "not_fundus"),
        (
            "noise",
            lambda: np.random.default_rng(1).integers(0, 256, (300, 400, 3), dtype=np.uint8),
            "not_fundus",
        ),
        ("gray disc", lambda: cv2.cvtColor(
            cv2.cvtColor(synthetic_fundus(), cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB), "monochrome"),
        ("blurred", lambda: cv2.GaussianBlur(synthetic_fundus(), (0, 0), 10), "out_of_focus"),
        ("dark", lambda: (synthetic_fundus() * 0.1).astype(np.uint8), "underexposed"),
        ("corner", lambda: np.ascontiguousarray(synthetic_fundus()[:192, :256]), "poor_field_of_view"),
        # the test review: the whole overexposure check, or the colour check, could go unnoticed
        ("washed out", lambda: _inside_disc(lambda px: np.clip(px.astype(int) + 160, 0, 255)), "overexposed"),
        ("blue", lambda: _inside_disc(lambda px: px[:, ::-1]), "not_fundus"),
    ],
)  # fmt: skip
def test_synthetic_negatives(name: str, make: object, reason: str) -> None:
    q = assess_quality(make())  # type: ignore[operator]
    assert not q.gradable, name
    assert reason in q.reasons, (name, q.as_dict())


def test_document_is_rejected() -> None:
    page = np.full((800, 600, 3), 250, np.uint8)
    for y in range(40, 760, 24):
        cv2.putText(page, "Patient referral letter 2024", (30, y), cv2.FONT_HERSHEY_SIMPLEX, 0.6, 0, 1)
    q = assess_quality(page)
    assert not q.gradable and "not_fundus" in q.reasons


def test_real_photos_gradable_and_degraded_rejected() -> None:
    photos = real_photos("drive-ungraded", 3) + real_photos("eyepacs-natural-512", 3)
    for rgb in photos:
        q = assess_quality(rgb)
        assert q.gradable, q.as_dict()
        assert not assess_quality(cv2.GaussianBlur(rgb, (0, 0), 0.02 * max(rgb.shape[:2]))).gradable
        assert not assess_quality((rgb * 0.15).astype(np.uint8)).gradable


def pil_blur_jpeg(rgb: np.ndarray, sigma: float) -> np.ndarray:
    """Blurred the way the audit did it: Pillow's Gaussian blur, then JPEG quality 90."""
    buf = io.BytesIO()
    Image.fromarray(rgb).filter(ImageFilter.GaussianBlur(sigma)).save(buf, "JPEG", quality=90)
    return decode_image(buf.getvalue())


# Shipped samples whose heavily blurred copies passed the ratio-only focus test (version 1):
# the coarse band empties too, so the fine/coarse ratio climbs back above its pass mark.
@pytest.mark.parametrize("sample", ["19/19_left.jpg", "178/178_right.jpg"])
def test_heavily_blurred_sample_is_out_of_focus(sample: str) -> None:
    rgb = decode_image((REPO / "samples" / sample).read_bytes())
    q = assess_quality(rgb)
    assert q.gradable, q.as_dict()
    for sigma in (12, 16):
        blurred = assess_quality(pil_blur_jpeg(rgb, sigma))
        assert not blurred.gradable, (sigma, blurred.as_dict())
        assert "out_of_focus" in blurred.reasons, (sigma, blurred.as_dict())


def test_version1_thresholds_file_gains_the_energy_check(tmp_path: Path) -> None:
    """A file calibrated before the absolute-energy ramp existed still loads, with its default."""
    old = QualityThresholds().to_dict()
    del old["focus_log_energy"]
    p = tmp_path / "v1.json"
    p.write_text(json.dumps({**old, "version": 1}))
    assert load_thresholds(p).focus_log_energy == QualityThresholds().focus_log_energy
    assert load_thresholds().focus_log_energy == QualityThresholds().focus_log_energy


def test_thresholds_roundtrip_and_shipped_json(tmp_path: Path) -> None:
    shipped = load_thresholds()
    assert shipped == load_thresholds(REPO / "ml" / "quality_thresholds.json")
    p = tmp_path / "t.json"
    p.write_text(json.dumps({**QualityThresholds().to_dict(), "min_focus": 0.9}))
    assert load_thresholds(p).min_focus == 0.9
    p.write_text(json.dumps({"min_fokus": 0.9}))
    with pytest.raises(ValueError, match="unknown"):
        load_thresholds(p)


def test_custom_thresholds_change_the_decision() -> None:
    rgb = synthetic_fundus()
    strict = QualityThresholds(min_focus=1.01)
    assert "out_of_focus" in assess_quality(rgb, strict).reasons


def test_rejects_wrong_array() -> None:
    with pytest.raises(ValueError):
        assess_quality(np.zeros((10, 10), np.uint8))


@pytest.mark.parametrize("q", [50, 75])
def test_histogram_percentile_equals_numpy(q: int) -> None:
    """The gate reads percentiles off a histogram; they must be numpy's, to the bit."""
    from ml.quality import _percentile_u8

    rng = np.random.default_rng(q)
    for n in (1, 2, 3, 4, 5, 17, 1000, 4097):
        values = rng.integers(0, 256, (1, n), dtype=np.uint8)
        where = rng.random((1, n)) < 0.7
        where[0, 0] = True
        want = float(np.percentile(values[where].astype(np.float32), q))
        assert _percentile_u8(values, where, q) == want


def test_half_size_sigma8_blur_matches_full_size() -> None:
    """The sigma-8 blur taken from the sigma-2 one on a half-size copy stays close to the real one
    (the coarse band's energy is what the focus score uses)."""
    from ml.quality import _blur_sigma8

    g = synthetic_fundus()[..., 1].astype(np.float32)
    b2 = cv2.GaussianBlur(g, (0, 0), 2.0)
    full, fast = b2 - cv2.GaussianBlur(g, (0, 0), 8.0), b2 - _blur_sigma8(b2)
    inner = (slice(40, -40), slice(40, -40))
    ratio = float(np.mean(fast[inner] ** 2) / np.mean(full[inner] ** 2))
    assert abs(np.log10(ratio)) < 0.01


def test_thresholds_for_manifest_is_the_shipped_calibration_or_none() -> None:
    """Workers and `drscreen evaluate` build the gate of a release the same way (one helper)."""
    from ml.quality import thresholds_for_manifest

    assert thresholds_for_manifest(None) is None and thresholds_for_manifest({}) is None
    shipped = json.loads((REPO / "ml" / "quality_thresholds.json").read_text())
    built = thresholds_for_manifest(shipped)
    assert built == QualityThresholds.from_dict(shipped)
    assert thresholds_for_manifest(dict(shipped)) is built  # built once per calibration
    with pytest.raises(ValueError, match="unknown quality threshold keys"):
        thresholds_for_manifest({"min_focuss": 0.5})


def test_a_grey_fundus_photograph_is_ungradable_as_monochrome_not_as_not_fundus() -> None:
    """The session-31 review: grey (and 16-bit grey) fundus photographs were refused as "does not
    look like a fundus photograph", sending clinics after the wrong fault. Colour ones and grey
    pictures that are no fundus keep their verdicts."""
    photos = real_photos("eyepacs-natural-512", 4) + real_photos("drive-ungraded", 2)
    for rgb in photos:
        assert not is_monochrome(rgb)
        grey = np.repeat(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)[..., None], 3, axis=2)
        assert is_monochrome(grey)
        q = assess_quality(grey)
        assert not q.gradable and "monochrome" in q.reasons and "not_fundus" not in q.reasons
    page = np.full((300, 400, 3), 128, np.uint8)  # grey, but no fundus
    assert is_monochrome(page) and "not_fundus" in assess_quality(page).reasons
