"""A whole fundus inside a wide black border (some export tools paste the photograph on a bigger
canvas) is judged where it is (session 32): bordered copies of the real samples were
poor_field_of_view. A tiny, cut-off or blurred fundus on a canvas is still refused."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

import ml.quality
from ml.imageio import decode_image
from ml.preprocess import crop_square, disc_bbox
from ml.quality import assess_frame, assess_quality, fundus_crop

SAMPLES = sorted((Path(__file__).resolve().parents[2] / "samples").glob("*/*.jpg"))


def on_canvas(rgb: np.ndarray, factor: float, place: tuple[float, float] = (0.5, 0.5)) -> np.ndarray:
    """``rgb`` pasted unresampled on a black square canvas ``factor`` times its longer side."""
    h, w = rgb.shape[:2]
    side = round(max(h, w) * factor)
    out = np.zeros((side, side, 3), np.uint8)
    top, left = round((side - h) * place[0]), round((side - w) * place[1])
    out[top : top + h, left : left + w] = rgb
    return out


@pytest.fixture(scope="module")
def photos() -> list[np.ndarray]:
    assert len(SAMPLES) == 8, SAMPLES
    return [decode_image(p.read_bytes()) for p in SAMPLES]


@pytest.mark.parametrize("factor", [1.3, 2.0, 3.1])
@pytest.mark.parametrize("place", [(0.5, 0.5), (0.2, 0.7), (1.0, 0.0)])
def test_a_photograph_on_a_black_canvas_is_as_gradable_as_the_photograph(
    photos: list[np.ndarray], factor: float, place: tuple[float, float]
) -> None:
    for rgb in photos:
        assert assess_quality(rgb).gradable
        copy = on_canvas(rgb, factor, place)
        q = assess_quality(copy)
        assert q.gradable, (factor, place, q.as_dict())
        # the old whole-frame verdict, kept for the comparison script, refused them
        assert "poor_field_of_view" in assess_frame(copy).reasons or factor == 1.3


def test_the_crop_judged_is_the_photograph_and_so_is_the_models(photos: list[np.ndarray]) -> None:
    """Straight sides (the photograph's own frame cut the disc) are cropped flush, round ones keep
    a margin; the networks' crop of a bordered copy is the plain photograph's, pixel for pixel."""
    for rgb in photos:
        y0, y1, x0, x1 = disc_bbox(rgb)
        for factor in (1.3, 3.1, 5.0):
            copy = on_canvas(rgb, factor, (0.2, 0.7))
            crop = fundus_crop(copy)
            assert crop is not None
            if (y0, y1) == (0, rgb.shape[0]):  # EyePACS: the disc is cut top and bottom
                assert crop.shape[0] == rgb.shape[0]
            assert y1 - y0 <= crop.shape[0] <= 1.25 * (y1 - y0) and x1 - x0 <= crop.shape[1] <= 1.25 * (
                x1 - x0
            )
            # counted against the frame, a line of a 3.1x canvas needed 3.1x as many lit pixels:
            # the crop lost a line or two and 3 of 8 grades moved across a cut (session 32)
            assert np.array_equal(crop_square(copy, True), crop_square(rgb, True)), factor
    assert fundus_crop(np.zeros((300, 400, 3), np.uint8)) is None


def test_a_tiny_fundus_on_a_canvas_is_still_too_small(photos: list[np.ndarray]) -> None:
    for rgb in photos[:3]:
        small = cv2.resize(rgb, None, fx=0.3, fy=0.3, interpolation=cv2.INTER_AREA)  # ~130 px disc
        q = assess_quality(on_canvas(small, 2.0))
        assert not q.gradable and "poor_field_of_view" in q.reasons, q.as_dict()


def test_a_fundus_the_models_crop_would_not_find_stays_refused(
    photos: list[np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where ml.preprocess.disc_bbox finds no disc it hands the networks the whole canvas: the
    gate must not pass such a photograph (the networks would grade a speck)."""
    copy = on_canvas(photos[0], 3.1)
    assert assess_quality(copy).gradable
    monkeypatch.setattr(ml.quality, "disc_bbox", lambda rgb, threshold=15: (0, rgb.shape[0], 0, rgb.shape[1]))
    q = assess_quality(copy)
    assert not q.gradable and "poor_field_of_view" in q.reasons


@pytest.mark.parametrize(
    "cut",
    [
        lambda a: a[: a.shape[0] // 2, : a.shape[1] // 2],  # top-left quarter
        lambda a: a[:, : a.shape[1] // 2],  # left half
        lambda a: a[: int(a.shape[0] * 0.45)],  # top 45%
    ],
)
def test_a_cut_off_fundus_on_a_canvas_is_still_refused(photos: list[np.ndarray], cut: object) -> None:
    for rgb in photos:
        part = np.ascontiguousarray(cut(rgb))  # type: ignore[operator]
        q = assess_quality(on_canvas(part, 2.5))
        assert not q.gradable, q.as_dict()
        assert {"poor_field_of_view", "not_fundus"} & set(q.reasons), q.as_dict()


def test_a_blurred_photograph_on_a_canvas_is_judged_at_its_own_scale(photos: list[np.ndarray]) -> None:
    """Judged on the whole 3.1x canvas, the blur shrinks to a third at the gate's 512 px and could
    pass the focus check: the crop keeps the photograph's own scale."""
    for rgb in photos:
        blurred = cv2.GaussianBlur(rgb, (0, 0), 6)
        assert "out_of_focus" in assess_quality(blurred).reasons
        q = assess_quality(on_canvas(blurred, 3.1))
        assert not q.gradable and "out_of_focus" in q.reasons, q.as_dict()


def test_the_real_photographs_verdicts_do_not_change(photos: list[np.ndarray]) -> None:
    """The samples, and degraded copies the gate refuses, keep their whole-frame verdicts
    (scripts/border_gate_check.py counts it on every real photograph)."""
    for rgb in photos:
        for variant in (rgb, (rgb * 0.15).astype(np.uint8), cv2.GaussianBlur(rgb, (0, 0), 10)):
            assert assess_quality(variant) == assess_frame(variant)
