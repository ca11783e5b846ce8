"""Preprocessing on real sample photographs and on synthetic edge cases."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ml.preprocess import PreprocessConfig, disc_bbox, equalize_channels, prepare_pixels, preprocess

REPO = Path(__file__).resolve().parents[2]


def fundus_like(h: int, w: int, radius: float = 0.45) -> np.ndarray:
    """A bright reddish disc on black, off-centre in a non-square frame (like a camera photo)."""
    yy, xx = np.mgrid[:h, :w]
    r = min(h, w) * radius
    disc = (yy - h / 2) ** 2 + (xx - w * 0.55) ** 2 < r**2
    img = np.zeros((h, w, 3), dtype=np.uint8)
    img[disc] = (180, 90, 40)
    return img


def sample_photos() -> list[Path]:
    photos = sorted((REPO / "samples").glob("**/*.jpg"))
    assert photos, "samples/ must ship a few photographs"
    return photos


def test_disc_bbox_finds_the_disc_not_the_black_border() -> None:
    img = fundus_like(300, 500)
    y0, y1, x0, x1 = disc_bbox(img)
    assert 0 <= y0 < 30 and 270 < y1 <= 300
    assert 130 < x0 < 170 and 380 < x1 < 420


@pytest.mark.parametrize("shape", [(300, 500), (500, 300), (256, 256), (64, 90)])
def test_any_shape_becomes_a_square_of_the_configured_size(shape: tuple[int, int]) -> None:
    cfg = PreprocessConfig(size=128)
    x = preprocess(fundus_like(*shape), cfg)
    assert x.shape == (3, 128, 128) and x.dtype == np.float32
    assert np.isfinite(x).all()


def test_black_image_does_not_crash_and_keeps_full_frame() -> None:
    out = prepare_pixels(np.zeros((100, 120, 3), np.uint8), PreprocessConfig(size=64))
    assert out.shape == (64, 64, 3)


@pytest.mark.parametrize(
    "enh", [(), ("ben",), ("clahe",), ("blur",), ("sharpen",), ("clahe", "sharpen"), ("equalize", "ben")]
)
def test_every_enhancement_runs_and_changes_pixels_deterministically(enh: tuple[str, ...]) -> None:
    cfg = PreprocessConfig(size=96, enhancements=enh, circle_mask=False)
    rng = np.random.default_rng(0)
    img = np.clip(fundus_like(200, 240).astype(int) + rng.integers(0, 40, (200, 240, 3)), 0, 255).astype(
        np.uint8
    )
    a, b = prepare_pixels(img, cfg), prepare_pixels(img, cfg)
    assert np.array_equal(a, b)
    plain = prepare_pixels(img, PreprocessConfig(size=96, enhancements=(), circle_mask=False))
    assert enh == () or not np.array_equal(a, plain)


def test_equalize_spreads_each_channel_over_the_disc_and_leaves_the_surround_black() -> None:
    rng = np.random.default_rng(1)
    img = fundus_like(200, 240)
    disc = img.max(axis=2) > 15
    # a dim, low-contrast disc: red 60..99, green 20..39, blue 16..25
    n = int(disc.sum())
    img[disc] = np.stack([rng.integers(60, 100, n), rng.integers(20, 40, n), rng.integers(16, 26, n)], -1)
    out = equalize_channels(img)
    assert (out[~disc] == 0).all()
    for c in range(3):
        values = out[..., c][disc]
        assert values.max() == 255 and values.min() < 40  # the disc's range now spans the scale
        # equalised: each quarter of the scale holds about a quarter of the disc's pixels
        shares = np.histogram(values, bins=4, range=(0, 256))[0] / values.size
        assert np.all(np.abs(shares - 0.25) < 0.1), shares
    again = equalize_channels(out)
    assert np.abs(again.astype(int) - out).mean() < 3  # equalising twice changes little


def test_equalize_of_a_black_image_is_black() -> None:
    assert not equalize_channels(np.zeros((40, 50, 3), np.uint8)).any()


def test_ben_graham_fills_outside_the_circle_with_grey() -> None:
    out = prepare_pixels(fundus_like(200, 200), PreprocessConfig(size=64, enhancements=("ben",)))
    assert (out[0, 0] == 128).all()


def test_unknown_enhancement_is_refused() -> None:
    with pytest.raises(ValueError):
        PreprocessConfig(enhancements=("sepia",))


def test_config_round_trips_through_dict() -> None:
    cfg = PreprocessConfig(size=200, enhancements=("clahe", "ben"), mean=(0.1, 0.2, 0.3))
    assert PreprocessConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.cache_key() == PreprocessConfig.from_dict(cfg.to_dict()).cache_key()


def test_grey_or_wrong_dtype_input_is_rejected_clearly() -> None:
    with pytest.raises(ValueError, match="uint8 RGB"):
        prepare_pixels(np.zeros((10, 10), np.uint8), PreprocessConfig())


def test_shipped_sample_photographs_preprocess_to_a_centred_disc() -> None:
    from PIL import Image

    cfg = PreprocessConfig(size=128)
    for path in sample_photos():
        out = prepare_pixels(np.asarray(Image.open(path).convert("RGB")), cfg)
        assert out.shape == (128, 128, 3)
        centre = out[32:96, 32:96].astype(float)
        assert centre.std() > 3, f"{path.name}: centre of the disc has no detail"


@pytest.mark.parametrize("size", [64, 256, 384])
def test_ben_blur_is_opencvs_gaussian_up_to_rounding(size: int) -> None:
    """The fast blur keeps GaussianBlur's kernel size, sigma and border: every blurred value
    within one grey level of it, nearly all equal (a wrong kernel size, sigma or border fails)."""
    import cv2
    from PIL import Image

    from ml.preprocess import ben_blur

    photo = np.asarray(Image.open(sample_photos()[0]).convert("RGB"))
    img = cv2.resize(photo, (size, size), interpolation=cv2.INTER_AREA)
    sigma = size / 30
    reference = cv2.GaussianBlur(img, (0, 0), sigma).astype(int)
    diff = np.abs(ben_blur(img, sigma).astype(int) - reference)
    assert diff.max() <= 1
    assert np.count_nonzero(diff) / diff.size < 0.1


def test_pixel_caches_are_keyed_by_the_pipelines_revision(monkeypatch: pytest.MonkeyPatch) -> None:
    import ml.preprocess

    before = PreprocessConfig().cache_key()
    monkeypatch.setattr(ml.preprocess, "PIXELS_REVISION", ml.preprocess.PIXELS_REVISION + 1)
    assert PreprocessConfig().cache_key() != before


def test_a_photograph_replaced_in_place_is_not_served_from_the_pixel_cache(tmp_path: Path) -> None:
    """The session-31 training review: the cache was keyed by paths and the config only, so a
    photograph replaced at the same path kept its old pixels; an interrupted build left its
    full-size temporary file behind."""
    import os

    from ml.training.data import Sample, cached_pixels

    photos = sample_photos()[:2]
    folder = tmp_path / "photos"
    folder.mkdir()
    target = folder / "a.jpg"
    target.write_bytes(photos[0].read_bytes())
    samples = [Sample(path=target, patient_id="a", eye="left", grade=0)]
    cfg = PreprocessConfig(size=64)
    first = np.array(cached_pixels(samples, cfg, tmp_path / "cache", "t"))
    target.write_bytes(photos[1].read_bytes())
    os.utime(target, ns=(1, 1))
    second = np.array(cached_pixels(samples, cfg, tmp_path / "cache", "t"))
    assert not np.array_equal(first, second)
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 2

    target.write_bytes(b"not a photograph")
    os.utime(target, ns=(2, 2))
    from PIL import UnidentifiedImageError

    with pytest.raises(UnidentifiedImageError):
        cached_pixels(samples, cfg, tmp_path / "cache", "t")
    assert not list((tmp_path / "cache").glob("*.tmp.npy"))  # no temporary file left behind
