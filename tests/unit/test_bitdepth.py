"""12- and 10-bit data stored unscaled in 16-bit PNG and TIFF files, made from a real sample
photograph: they decode as the photograph, not nearly black (session 32). Full-range 16-bit
photographs decode exactly as before."""

from __future__ import annotations

import io
import struct
import tracemalloc
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile
from PIL import Image, ImageOps

import ml.imageio
from ml.bitdepth import data_bits
from ml.imageio import ImageDecodeError, check_image, decode_image
from ml.quality import assess_quality

SAMPLE = Path(__file__).resolve().parents[2] / "samples" / "16" / "16_left.jpg"


def _photo() -> np.ndarray:
    return decode_image(SAMPLE.read_bytes())


def _unscaled(rgb: np.ndarray, bits: int) -> np.ndarray:
    """The photograph as a camera of ``bits`` bits records it, values 0..2**bits - 1."""
    return np.rint(rgb.astype(np.float64) * ((1 << bits) - 1) / 255.0).astype(np.uint16)


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png16(values: np.ndarray, sbit: int | None = None, orientation: int | None = None) -> bytes:
    """A 16-bit PNG (RGB, RGBA or grey) by OpenCV, with an sBIT and an EXIF chunk when asked."""
    bgr = values[..., [2, 1, 0, 3][: values.shape[2]]] if values.ndim == 3 else values
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(bgr))
    assert ok
    data = buf.tobytes()
    extra = b""
    if sbit is not None:
        channels = 1 if values.ndim == 2 else values.shape[2]
        extra += _chunk(b"sBIT", bytes([sbit] * channels))
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        extra += _chunk(b"eXIf", exif.tobytes().removeprefix(b"Exif\x00\x00"))  # PNG's has no prefix
    return data[:33] + extra + data[33:]  # after IHDR (8 + 25 bytes)


def _tiff16(values: np.ndarray, max_sample: int | None = None, orientation: int | None = None) -> bytes:
    tags: list[tuple[int, str, int, object, bool]] = []
    if max_sample is not None:
        tags.append((281, "H", values.shape[2], (max_sample,) * values.shape[2], False))
    if orientation is not None:
        tags.append((274, "H", 1, orientation, False))
    buf = io.BytesIO()
    tifffile.imwrite(buf, values, photometric="rgb", compression="zlib", extratags=tags)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("name", "encode"),
    [
        ("12-bit PNG, no sBIT", lambda rgb: _png16(_unscaled(rgb, 12))),
        ("12-bit PNG, sBIT 12", lambda rgb: _png16(_unscaled(rgb, 12), sbit=12)),
        ("10-bit PNG, no sBIT", lambda rgb: _png16(_unscaled(rgb, 10))),
        ("12-bit TIFF, no MaxSampleValue", lambda rgb: _tiff16(_unscaled(rgb, 12))),
        ("12-bit TIFF, MaxSampleValue 4095", lambda rgb: _tiff16(_unscaled(rgb, 12), max_sample=4095)),
        ("8-bit values in a 16-bit PNG", lambda rgb: _png16(rgb.astype(np.uint16))),
    ],
)
def test_narrow_data_in_a_16_bit_file_decodes_as_the_photograph(name: str, encode: object) -> None:
    """Before session 32 these decoded to values 0..15 (Pillow keeps the high byte) and the gate
    called the photograph underexposed."""
    rgb = _photo()
    data = encode(rgb)  # type: ignore[operator]
    assert check_image(data) == rgb.shape[:2]
    decoded = decode_image(data)
    assert decoded.dtype == np.uint8 and decoded.flags["C_CONTIGUOUS"]
    # 10 and 12 bits hold every 8-bit level: rounding back gives the photograph exactly
    assert np.array_equal(decoded, rgb), name
    assert assess_quality(decoded).gradable


def test_transparent_12_bit_png_composites_over_black() -> None:
    rgb = _photo()
    colour = _unscaled(rgb, 12)
    alpha = np.full(rgb.shape[:2], 4095, np.uint16)
    alpha[:, : rgb.shape[1] // 2] = 0  # left half transparent
    decoded = decode_image(_png16(np.dstack([colour, alpha])))
    half = rgb.shape[1] // 2
    assert not decoded[:, :half].any()
    assert np.array_equal(decoded[:, half:], rgb[:, half:])


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("fmt", ["png", "tiff"])
def test_exif_orientation_turns_12_bit_samples_as_pillow_turns_8_bit_ones(orientation: int, fmt: str) -> None:
    rgb = _photo()[:200, :300]
    wide = _unscaled(rgb, 12)
    data = _png16(wide, orientation=orientation) if fmt == "png" else _tiff16(wide, orientation=orientation)
    plain = Image.fromarray(rgb)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    plain.save(buf, "PNG", exif=exif.tobytes())
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(buf.getvalue()))))
    decoded = decode_image(data)
    assert np.array_equal(decoded, expected)
    assert check_image(data) == expected.shape[:2]


def test_full_range_16_bit_colour_decodes_exactly_as_pillow_reads_it() -> None:
    """Genuine 16-bit photographs (and PNGs whose 12-bit data the writer scaled to the full
    range, as the sBIT chunk's specification asks) keep Pillow's reading: the high byte."""
    rgb = _photo()
    wide = rgb.astype(np.uint16) * 257  # full range, 0..65535
    twelve = _unscaled(rgb, 12)
    scaled = (twelve << 4) | (twelve >> 8)  # 12 significant bits, scaled up to 16
    rng = np.random.default_rng(3)
    noise = rng.integers(0, 65536, size=(150, 170, 3), dtype=np.uint16)
    for values, data in (
        (wide, _png16(wide)),
        (scaled, _png16(scaled, sbit=12)),
        (wide, _tiff16(wide)),
        (noise, _png16(noise)),
        (noise, _tiff16(noise, max_sample=65535)),
    ):
        assert np.array_equal(decode_image(data), (values >> 8).astype(np.uint8))


def test_a_declared_depth_is_honoured_over_the_guess() -> None:
    """sBIT 12 on data whose values all fit 10 bits: read as 12-bit data (darker), not guessed."""
    rgb = _photo()
    ten = _unscaled(rgb, 10)
    expected = np.rint(ten.astype(np.float64) * 255.0 / 4095.0).astype(np.uint8)
    assert np.array_equal(decode_image(_png16(ten, sbit=12)), expected)
    assert np.array_equal(decode_image(_png16(ten)), rgb)


def test_12_bit_grey_is_scaled_like_colour() -> None:
    grey = cv2.cvtColor(_photo(), cv2.COLOR_RGB2GRAY)
    decoded = decode_image(_png16(_unscaled(grey, 12)))
    assert np.array_equal(decoded[..., 0], grey) and np.array_equal(decoded[..., 2], grey)
    full = decode_image(_png16(grey.astype(np.uint16) * 257))  # full range: as before
    assert np.array_equal(full[..., 1], grey)


def test_the_rule_for_undeclared_depths() -> None:
    assert [data_bits(v, None) for v in (0, 255, 256, 1023, 1024, 4095, 4096, 65535)] == [
        8, 8, 10, 10, 12, 12, 16, 16
    ]  # fmt: skip
    assert data_bits(4095, 12) == 12 and data_bits(4096, 12) == 16 and data_bits(100, 16) == 16


def test_when_opencv_cannot_read_the_samples_pillows_reading_stands(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pillow decides whether an upload is whole, for the API and the worker alike; the full
    samples only refine what it read."""
    rgb = _photo()
    data = _png16(_unscaled(rgb, 12))
    monkeypatch.setattr(ml.imageio, "full_samples", lambda _data: None)
    assert np.array_equal(decode_image(data), (_unscaled(rgb, 12) >> 8).astype(np.uint8))


def test_a_truncated_12_bit_png_is_refused_by_both_the_check_and_the_decode() -> None:
    data = _png16(_unscaled(_photo(), 12))
    cut = data[: len(data) // 2] + data[-12:]  # keeps IEND: the decode itself must fail
    for step in (check_image, decode_image):
        with pytest.raises(ImageDecodeError):
            step(cut)


def test_converting_12_bit_samples_keeps_no_full_size_float_copies() -> None:
    rng = np.random.default_rng(0)
    values = rng.integers(0, 4096, size=(1500, 1400, 3), dtype=np.uint16)
    data = _png16(values)
    tracemalloc.start()
    try:
        rgb = decode_image(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    expected = np.rint(values.astype(np.float64) * 255.0 / 4095.0).astype(np.uint8)
    assert np.array_equal(rgb, expected)
    # OpenCV's samples (6 bytes a pixel), the answer (3) and one float32 band of rows; a
    # whole-image float32 conversion alone would add 12 bytes a pixel
    assert peak < 12 * values.shape[0] * values.shape[1], peak
