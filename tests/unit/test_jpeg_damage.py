"""ml/jpeg_damage.py: silently resynchronised JPEG damage (a DC shift from some MCU on)."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import simplejpeg
from PIL import Image

from ml.jpeg_damage import _block_grid, looks_block_shifted

SAMPLES = Path(__file__).resolve().parents[2] / "samples"
SAMPLE_16L = SAMPLES / "16" / "16_left.jpg"

# Byte overwrites in the scan data of samples/16/16_left.jpg (offset, old bytes, new bytes), found
# by a seeded random search for damage libjpeg-turbo's strict mode accepts. Each shifts the image
# from some MCU on, clearly visible: 0xc35363 turns the lower 90 % green; 0x0a lifts the surround
# of the lower part to dark grey (only the border test sees it); 0xb7c2 darkens and tints 40 % of
# the photograph (only the staircase test sees it).
DAMAGE = [(3099, "bd4e2a", "c35363"), (4173, "5a", "0a"), (13229, "231e", "b7c2")]


def _jpeg(im: Image.Image, **options: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", **options)
    return buf.getvalue()


def _png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def _rotated_exif() -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90
    return exif


def _noise(size: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), np.uint8))


Make = Callable[[Image.Image], bytes]


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    with Image.open(SAMPLE_16L) as im:
        return im.convert("RGB")


@pytest.mark.parametrize("path", sorted(SAMPLES.glob("*/*.jpg")), ids=lambda p: p.name)
def test_shipped_samples_are_not_flagged(path: Path) -> None:
    assert not looks_block_shifted(path.read_bytes())


@pytest.mark.parametrize(("offset", "old", "new"), DAMAGE, ids=[d[2] for d in DAMAGE])
def test_silent_dc_shift_is_flagged(offset: int, old: str, new: str) -> None:
    data = SAMPLE_16L.read_bytes()
    assert data[offset : offset + len(old) // 2].hex() == old
    damaged = data[:offset] + bytes.fromhex(new) + data[offset + len(new) // 2 :]
    clean = simplejpeg.decode_jpeg(data).astype(np.int16)
    shifted = simplejpeg.decode_jpeg(damaged, strict=True).astype(np.int16)  # no warning: silent
    assert (np.abs(shifted - clean).max(axis=2) > 10).mean() > 0.05  # visibly different
    assert looks_block_shifted(damaged)


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda im: _jpeg(im, quality=95), id="re-encoded"),
        pytest.param(lambda im: _jpeg(im, exif=_rotated_exif()), id="exif-rotated"),
        pytest.param(lambda im: _jpeg(im, restart_marker_blocks=4), id="restart-markers"),
        pytest.param(lambda im: _jpeg(Image.new("RGB", im.size)), id="black"),
    ],
)
def test_clean_variants_are_not_flagged(photo: Image.Image, make: Make) -> None:
    assert looks_block_shifted(make(photo)) is False


@pytest.mark.parametrize(
    "make",
    [
        # Not judged (see the module docstring), whether damaged or not.
        pytest.param(lambda im: _jpeg(im, quality=90, progressive=True), id="progressive"),
        pytest.param(lambda im: _jpeg(im, quality=90, subsampling=0), id="4:4:4"),
        pytest.param(lambda im: _jpeg(im, quality=90, subsampling=1), id="4:2:2"),
        pytest.param(lambda im: _jpeg(im.convert("L"), quality=90), id="greyscale"),
        pytest.param(lambda im: _jpeg(im.convert("L"), progressive=True), id="progressive-greyscale"),
        pytest.param(lambda im: _jpeg(im.convert("CMYK"), quality=90), id="cmyk"),
        pytest.param(lambda im: _jpeg(im.resize((64, 64))), id="64x64"),
        pytest.param(lambda im: _jpeg(_noise(64)), id="noise-64x64"),
        pytest.param(lambda im: _jpeg(im.resize((1, 1))), id="1x1"),
        pytest.param(lambda im: _jpeg(im)[:5000], id="truncated"),
        pytest.param(_png, id="png"),
        pytest.param(lambda im: b"", id="empty"),
        pytest.param(lambda im: b"\xff\xd8\xff" + bytes(range(256)) * 4, id="garbage"),
    ],
)
def test_unjudged_inputs_return_false_without_raising(photo: Image.Image, make: Make) -> None:
    assert looks_block_shifted(make(photo)) is False


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda im: _jpeg(im, quality=90, progressive=True), id="progressive"),
        pytest.param(lambda im: _jpeg(im, quality=90, subsampling=0), id="4:4:4"),
        pytest.param(lambda im: _jpeg(im, quality=90, subsampling=1), id="4:2:2"),
        pytest.param(lambda im: _jpeg(im.resize((256, 2048))), id="256x2048-strip"),
    ],
)
def test_inputs_the_heuristic_does_not_judge_are_not_read(photo: Image.Image, make: Make) -> None:
    """The test review: the sample photograph is not flagged whether or not these guards exist, so
    they could go unnoticed (the strip's is the memory guard). What they keep out is not read."""
    assert _block_grid(make(photo)) is None
    assert _block_grid(_jpeg(photo, quality=90)) is not None  # a baseline 4:2:0 photograph is


@pytest.mark.parametrize(
    ("where", "share", "grey"), [("bottom", 0.1, 40), ("bottom", 0.2, 15), ("top", 0.05, 60)]
)
def test_a_plain_band_across_the_photograph_is_not_damage(where: str, share: float, grey: int) -> None:
    """The review: a camera's header or footer strip of one colour (or one-sided padding) made the
    border test's two flat runs, and every such photograph read damaged."""
    pixels = np.asarray(Image.open(SAMPLE_16L).convert("RGB")).copy()
    rows = int(pixels.shape[0] * share)
    band = slice(pixels.shape[0] - rows, None) if where == "bottom" else slice(0, rows)
    pixels[band] = grey
    assert not looks_block_shifted(_jpeg(Image.fromarray(pixels), quality=92))
