"""Decode untrusted uploaded photographs into H x W x 3 uint8 RGB arrays.

Every way an upload can be bad ends in one exception type, :class:`ImageDecodeError`, whose
``reason`` is a short stable code the API can map to a 4xx response. Pillow decodes and validates
every upload; 16-bit colour files holding 8-, 10- or 12-bit data also have their full samples read
by OpenCV (``ml.bitdepth``), because Pillow keeps only their high bytes.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Final, TypeVar

import numpy as np
import simplejpeg
from PIL import ExifTags, Image, ImageFile, ImageOps

from ml.bitdepth import (
    COMMON_DEPTHS,
    data_bits,
    full_samples,
    png_layout,
    png_significant_bits,
    tiff_significant_bits,
)

log = logging.getLogger(__name__)

__all__ = [
    "MIN_SIDE",
    "PALETTE_MODES",
    "SUPPORTED_FORMATS",
    "ImageDecodeError",
    "check_image",
    "decode_image",
    "decode_scaled",
    "sixteen_bit_png",
    "sniff_format",
    "unsupported_message",
]

MIN_SIDE: Final = 64
SUPPORTED_FORMATS: Final = frozenset({"jpeg", "png", "tiff", "bmp", "webp"})

# Pillow names for the formats we accept; MPO is what Pillow calls multi-picture camera JPEGs.
_PIL_FORMATS: Final = {
    "jpeg": {"JPEG", "MPO"},
    "png": {"PNG"},
    "tiff": {"TIFF"},
    "bmp": {"BMP", "DIB"},
    "webp": {"WEBP"},
}

#: ISO base media brands of HEIF still images (HEIC, AVIF): refused as unsupported, not "not an image".
_HEIF_BRANDS: Final = frozenset(
    {b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1", b"avif", b"avis"}
)
#: What the refusal of a format we do not read tells the clinic to do.
_UNSUPPORTED_ADVICE: Final = {
    "gif": "GIF images are not accepted (256 colours at most: the photograph's colours are lost); "
    "send the original photograph as JPEG, PNG or TIFF",
    "heif": "HEIC/HEIF/AVIF images are not accepted; export the photograph as JPEG (on an iPhone: "
    "Settings > Camera > Formats > Most Compatible) or PNG",
}
#: Palette images: their colours were reduced to at most 256, which moves the grade (two of 15
#: referable photographs of the session-31 review graded 0 as palette PNGs, gradable by every check).
PALETTE_MODES: Final = frozenset({"P", "PA", "1"})

# Reason codes (stable: the API and tests match on them).
EMPTY: Final = "empty"
NOT_AN_IMAGE: Final = "not_an_image"
UNSUPPORTED: Final = "unsupported_format"
TRUNCATED: Final = "truncated"
CORRUPT: Final = "corrupt"
TOO_LARGE: Final = "too_large"
TOO_SMALL: Final = "too_small"


class ImageDecodeError(ValueError):
    """The bytes are not a usable photograph; ``reason`` is a stable code, ``detail`` prose."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def unsupported_message(fmt: str) -> str:
    """Why a format we do not read is refused, and what to send instead."""
    return _UNSUPPORTED_ADVICE.get(fmt, f"{fmt} images are not accepted")


def sniff_format(data: bytes) -> str | None:
    """Return the image format named by the magic bytes ("jpeg", "png", ...) or None."""
    head = data[:16]
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith((b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")):
        return "tiff"
    if head.startswith(b"BM") and len(data) >= 26:
        return "bmp"
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "webp"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "gif"
    if head[4:8] == b"ftyp" and head[8:12] in _HEIF_BRANDS:
        return "heif"  # iPhones' default (HEIC) and AVIF: named, so the refusal can say what to do
    return None


def sixteen_bit_png(data: bytes) -> bool:
    """Whether ``data`` is a PNG of 16 bits a sample, which browsers show by their high byte only
    (12-bit data stored unscaled shows nearly black): pages show its decoded pixels instead."""
    layout = png_layout(data)
    return layout is not None and layout[0] == 16


def _check_container(fmt: str, data: bytes) -> None:
    """Structural end-of-file checks that catch truncated uploads before any decoding.

    This is the DR literature's "check JPEG" step: a complete JPEG ends with the EOI marker
    FFD9 and a complete PNG carries its IEND chunk. Some cameras pad the file after EOI with
    zero bytes, so trailing NULs are tolerated.
    """
    if fmt == "jpeg":
        if not data.rstrip(b"\x00").endswith(b"\xff\xd9"):
            raise ImageDecodeError(TRUNCATED, "JPEG does not end with the EOI marker (FFD9)")
    # IEND is PNG's last chunk: 4-byte length, b"IEND", 4-byte CRC.
    elif fmt == "png" and data.rfind(b"IEND", max(0, len(data) - 64)) < 0:
        raise ImageDecodeError(TRUNCATED, "PNG has no IEND chunk")


#: libjpeg's fill for entropy data that ended early: every coefficient zero, i.e. mid-grey.
_MISSING_DATA_GREY: Final = 128


def _refuse_grey_tail(img: Image.Image) -> None:
    """A JPEG cut short and closed with an FFD9 passes the end-marker check, and libjpeg decodes it
    with only a warning (which Pillow drops), filling every block after the cut with flat grey 128.
    A last row that is exactly that grey in every pixel and channel, in an image that is not grey
    throughout, is that fill: a photograph's bottom edge is black surround or noisy tissue. (A cut
    inside the last row of 8x8 blocks leaves part of that row and is not caught; the quality gate
    sees the rest.) Checked on the decoded, not yet EXIF-rotated image, whose last row is the
    last data the file held."""
    if img.mode not in ("RGB", "L"):
        return
    width, height = img.size
    last = np.asarray(img.crop((0, height - 1, width, height)))
    if not (last == _MISSING_DATA_GREY).all():
        return
    if (np.asarray(img) == _MISSING_DATA_GREY).all():
        return  # a grey picture, not a cut one: the quality gate judges it
    raise ImageDecodeError(
        TRUNCATED, "the JPEG's data ends early (its lower part decodes as flat grey): upload it again"
    )


#: libjpeg's warnings that mean damaged pixels (jerror.h: JWRN_HIT_MARKER, JWRN_HUFF_BAD_CODE,
#: JWRN_MUST_RESYNC, JWRN_ARITH_BAD_CODE, JWRN_JPEG_EOF, JWRN_BOGUS_PROGRESSION). Others (an unknown
#: JFIF revision, a bad ICC profile) leave the pixels whole.
_DAMAGE_WARNINGS: Final = ("Corrupt JPEG data", "Premature end of JPEG file", "Inconsistent progression")
#: JWRN_EXTRANEOUS_DATA: stray bytes before a marker. Between header segments they are padding;
#: before a restart marker (RST0-7, inside the scan) they are damage; before the end marker EOI they
#: are what damaged scan data most often leaves (106 of 800 damaged copies in
#: scripts/jpeg_damage_check.py, 1-9 bytes), but a single byte there is also a well-known benign
#: quirk of some encoders, and so is a run of one padding value: those photographs were graded
#: before and must not start failing.
_EXTRANEOUS: Final = re.compile(r"(\d+) extraneous bytes before marker 0x([0-9a-fA-F]{2})")


def _is_damage(message: str, data: bytes) -> bool:
    if not message.startswith(_DAMAGE_WARNINGS) or "ICC" in message:
        return False
    stray = _EXTRANEOUS.search(message)
    if stray is None:
        return True
    count, marker = int(stray.group(1)), int(stray.group(2), 16)
    if 0xD0 <= marker <= 0xD7:
        return True
    if marker != 0xD9 or count < 2:
        return False
    scan = _scan_data(data)
    if scan is None:
        return True
    # the stray bytes end the scan data, before any 0xFF fill bytes (legal, and not counted)
    return len(set(scan.rstrip(b"\xff")[-count:])) > 1


def _scan_data(data: bytes) -> bytes | None:
    """From the first scan's data to its end marker: the header segments are walked by their
    lengths (an EXIF thumbnail is a whole JPEG inside one), and the first FF D9 after the scan
    header ends it (entropy-coded data cannot hold one; a second picture appended after it, as
    multi-picture files do, is not looked at)."""
    at = 2
    while at + 4 <= len(data):
        if data[at] != 0xFF:
            return None
        marker = data[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # markers without a length
            at += 2
            continue
        start = at + 2 + int.from_bytes(data[at + 2 : at + 4], "big")
        if marker == 0xDA:
            end = data.find(b"\xff\xd9", start)
            return data[start:end] if end >= 0 else None
        at = start
    return None


def _refuse_libjpeg_warnings(data: bytes) -> None:
    """Entropy data damaged in transit or on disk decodes "successfully": libjpeg warns and goes on
    (Pillow drops the warning), and the photograph is graded with garbage blocks. libjpeg-turbo in
    strict mode turns those warnings into errors; decoded at 1/8 scale in grey, every byte is still
    entropy-decoded for a fraction of a full decode (~0.5 ms for 512 px). A file libjpeg-turbo's
    own API cannot take for another reason (an unusual subsampling) is left to Pillow's verdict."""
    try:
        simplejpeg.decode_jpeg(data, colorspace="GRAY", min_factor=8, strict=True)
    except ValueError as exc:
        message = str(exc)
        if _is_damage(message, data):
            raise ImageDecodeError(
                CORRUPT, f"the JPEG's data is damaged ({message}): upload it again"
            ) from exc
        log.debug("strict JPEG check skipped: %s", message)


# Rows converted at a time: the wide intermediates of a conversion stay a few MB whatever the
# photograph's size (a 16-bit or transparent 50-megapixel upload once cost > 1 GB to convert).
_ROWS: Final = 256
_HIGH_DEPTH: Final = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I", "F"})
_ALPHA: Final = frozenset({"RGBA", "LA", "RGBa", "La"})


def _to_rgb_array(img: Image.Image, declared_bits: int | None = None) -> np.ndarray:
    """Convert any Pillow mode to H x W x 3 uint8 RGB, scaling high bit depths down.

    16-bit grey is scaled by the depth of its data (``ml.bitdepth.data_bits``: the significant
    bits the file declares, else 8, 10 or 12 when every sample fits, else 16)."""
    mode = img.mode
    if mode in _HIGH_DEPTH:
        values = np.asarray(img)
        # float images are scaled by their range
        top = float((1 << data_bits(int(values.max()), declared_bits)) - 1)
        if mode == "F":
            top = max(float(values.max()), 1.0)
        return _rows_to_rgb(
            values, lambda block: np.clip(np.rint(block.astype(np.float32) / top * 255.0), 0, 255)[..., None]
        )
    if mode == "L":
        return _rows_to_rgb(np.asarray(img), lambda block: block[..., None])
    if mode in _ALPHA:
        # Transparent areas become black: the surround of a fundus photograph is black.
        rgba = np.asarray(img if mode == "RGBA" else img.convert("RGBA"))
        return _rows_to_rgb(
            rgba, lambda block: (block[..., :3].astype(np.uint16) * block[..., 3:4] + 127) // 255
        )
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8))


def _rows_to_rgb(values: np.ndarray, convert: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """H x W x 3 uint8 filled a band of rows at a time with ``convert(band)`` (broadcast to 3)."""
    out = np.empty((values.shape[0], values.shape[1], 3), dtype=np.uint8)
    for top in range(0, values.shape[0], _ROWS):
        out[top : top + _ROWS] = convert(values[top : top + _ROWS])
    return out


def decode_image(data: bytes, max_pixels: int = 40_000_000) -> np.ndarray:
    """Decode an uploaded photograph into an H x W x 3 uint8 RGB array.

    EXIF orientation is applied. Raises :class:`ImageDecodeError` for empty, non-image,
    unsupported, truncated or corrupt files, decompression bombs (more than ``max_pixels``
    pixels, checked from the header before decoding) and images with a side under 64 px.
    """
    return decode_scaled(data, max_pixels)[0]


@dataclass(frozen=True)
class _Depth:
    """What the file says about its samples, read before any orientation is applied."""

    declared_bits: int | None  # PNG sBIT / TIFF MaxSampleValue, when the file has one
    deep_colour: bool  # 16-bit RGB(A): Pillow keeps only each sample's high byte
    orientation: int  # EXIF orientation (1 = upright)


def _depth(img: Image.Image, fmt: str, data: bytes, orientation: int) -> _Depth:
    if fmt == "png":
        layout = png_layout(data)
        if layout is None or layout[0] != 16:
            return _Depth(None, False, orientation)
        return _Depth(png_significant_bits(data), layout[1] in (2, 6), orientation)
    if fmt == "tiff":
        tags = getattr(img, "tag_v2", {})
        bits = tags.get(258)  # BitsPerSample, one per sample
        sixteen = bits is not None and all(b == 16 for b in (bits if isinstance(bits, tuple) else (bits,)))
        return _Depth(tiff_significant_bits(tags), sixteen and img.mode in ("RGB", "RGBA"), orientation)
    return _Depth(None, False, orientation)


def _needs_full_samples(img: Image.Image, depth: _Depth) -> bool:
    """Whether a 16-bit colour image's data may be narrower than 16 bits: Pillow's high bytes
    (the samples >> 8) are all small enough. A full-range photograph keeps Pillow's reading."""
    if not depth.deep_colour:
        return False
    bits = depth.declared_bits if depth.declared_bits is not None else max(COMMON_DEPTHS)
    if bits >= 16:
        return False
    high = max(int(band[1]) for band in img.getextrema()[:3])  # type: ignore[index]
    return high <= ((1 << bits) - 1) >> 8


#: EXIF orientation -> the numpy view that turns decoded pixels upright (as ImageOps.exif_transpose).
_ORIENT: Final[dict[int, Callable[[np.ndarray], np.ndarray]]] = {
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),
    8: lambda a: np.rot90(a, 1),
}


def _scaler(top: int) -> Callable[[np.ndarray], np.ndarray]:
    """Samples 0..top to 0..255 (rounded, clipped), in place on one float32 copy of the band."""
    factor = np.float32(255.0 / top)

    def scale(block: np.ndarray) -> np.ndarray:
        out = block.astype(np.float32)
        out *= factor
        np.rint(out, out=out)
        return np.minimum(out, 255.0, out=out)

    return scale


def _rgb_from_full_samples(data: bytes, depth: _Depth) -> np.ndarray | None:
    """H x W x 3 uint8 from OpenCV's 16-bit samples scaled by their data's depth, or None when
    OpenCV cannot give them. Band by band, as :func:`_rows_to_rgb`: the uint16 samples (6 or 8
    bytes a pixel) and the answer are the only full-size arrays."""
    read = full_samples(data)
    if read is None:
        return None
    colour, alpha = read
    top = (1 << data_bits(int(colour.max()), depth.declared_bits)) - 1
    # full-range data: Pillow's high byte, so such a photograph decodes exactly as before
    scale: Callable[[np.ndarray], np.ndarray] = (lambda block: block >> 8) if top == 65535 else _scaler(top)
    if alpha is None:
        rgb = _rows_to_rgb(colour, scale)
    else:
        # transparent areas become black, as for 8-bit RGBA; the alpha has its own depth
        alpha_top = float((1 << data_bits(int(alpha.max()), None)) - 1)
        rgb = np.empty(colour.shape, dtype=np.uint8)
        for row in range(0, colour.shape[0], _ROWS):
            band = slice(row, row + _ROWS)
            opacity = np.minimum(alpha[band].astype(np.float32) / alpha_top, 1.0)[..., None]
            rgb[band] = np.rint(scale(colour[band]).astype(np.float32) * opacity)
    turn = _ORIENT.get(depth.orientation)
    return rgb if turn is None else np.ascontiguousarray(turn(rgb))


def decode_scaled(
    data: bytes, max_pixels: int = 40_000_000, min_side: int | None = None
) -> tuple[np.ndarray, tuple[int, int]]:
    """Like :func:`decode_image`, but a JPEG may come out smaller: (pixels, full (height, width)).

    With ``min_side``, a JPEG whose sides are both at least twice that is decoded at 1/2, 1/4
    or 1/8 scale in the DCT (Pillow's draft mode) while both sides stay >= ``min_side``: a
    camera's 3888 x 2592 photograph costs a fraction of a full decode, and nothing downstream
    looks at more than 512 px (quality gate) or 256 px (the networks). Every byte is still
    entropy-decoded, so corrupt and truncated files fail as before. Other formats and smaller
    JPEGs decode in full. The returned size is the full image's, after EXIF orientation.
    """
    with _decoded(data, max_pixels, min_side) as (shown, full, depth):
        if not _needs_full_samples(shown, depth):
            return _as_decode_error(lambda: _to_rgb_array(shown, depth.declared_bits), _fmt(data)), full
    # Pillow's pixels are released before OpenCV reads the full samples: one copy at a time
    rgb = _as_decode_error(lambda: _rgb_from_full_samples(data, depth), _fmt(data))
    if rgb is not None:
        return rgb, full
    with _decoded(data, max_pixels, min_side) as (shown, full, depth):  # Pillow's high bytes
        return _as_decode_error(lambda: _to_rgb_array(shown, depth.declared_bits), _fmt(data)), full


def check_image(data: bytes, max_pixels: int = 40_000_000, min_side: int | None = None) -> tuple[int, int]:
    """Validate an upload as :func:`decode_scaled` does and return its full (height, width).

    Every byte is decoded, but the pixels are not converted to RGB: the API only needs to know
    that the photograph is whole, and the conversion of a 16-bit or transparent image is what
    costs memory (several bytes per pixel and intermediate copies).
    """
    with _decoded(data, max_pixels, min_side) as (_, full, _):
        return full


def _fmt(data: bytes) -> str:
    return sniff_format(data) or "image"


@contextlib.contextmanager
def _decoded(
    data: bytes, max_pixels: int, min_side: int | None
) -> Iterator[tuple[Image.Image, tuple[int, int], _Depth]]:
    """The decoded, EXIF-oriented Pillow image, its full (height, width) and what the file says
    about its samples' depth; the image is closed on exit."""
    if not data:
        raise ImageDecodeError(EMPTY, "the file is empty")
    fmt = sniff_format(data)
    if fmt is None:
        raise ImageDecodeError(NOT_AN_IMAGE, "the file is not a recognised image format")
    if fmt not in SUPPORTED_FORMATS:
        raise ImageDecodeError(UNSUPPORTED, unsupported_message(fmt))
    _check_container(fmt, data)
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        # Someone flipped Pillow's global; our EOF checks above still reject truncated files.
        log.warning("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True; truncated images may decode")

    def load() -> tuple[Image.Image, tuple[int, int], _Depth]:
        with warnings.catch_warnings():
            # Our own max_pixels check is the policy; Pillow's warning threshold is not.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))  # lazy: reads the header only
            if img.format not in _PIL_FORMATS[fmt]:
                raise ImageDecodeError(CORRUPT, f"content does not match its {fmt} signature")
            if img.mode in PALETTE_MODES:
                raise ImageDecodeError(
                    UNSUPPORTED,
                    f"a palette (indexed, at most 256 colours) {fmt} image: its colours were reduced, "
                    "which changes the grade; send the original photograph",
                )
            width, height = img.size
            if width <= 0 or height <= 0:
                raise ImageDecodeError(CORRUPT, "the image header has no size")
            if width * height > max_pixels:
                raise ImageDecodeError(
                    TOO_LARGE, f"{width}x{height} exceeds the limit of {max_pixels} pixels"
                )
            if min(width, height) < MIN_SIDE:
                raise ImageDecodeError(
                    TOO_SMALL, f"{width}x{height}: each side must be at least {MIN_SIDE} px"
                )
            if min_side is not None and fmt == "jpeg" and min(width, height) >= 2 * min_side:
                scale = min(width, height) / min_side
                img.draft(None, (max(1, int(width / scale)), max(1, int(height / scale))))
            img.load()  # full decode: corrupt entropy data fails here
            if fmt == "jpeg":
                _refuse_grey_tail(img)
                _refuse_libjpeg_warnings(data)
            shown: Image.Image = img
            orientation = 1
            try:
                # exif_transpose copies even an upright image: ask first (a copy of a big
                # photograph is as large as its decode).
                orientation = int(img.getexif().get(ExifTags.Base.Orientation, 1))
                if orientation != 1:
                    shown = ImageOps.exif_transpose(img)
            except Exception as exc:  # a broken EXIF block should not lose the photograph
                log.debug("ignoring unreadable EXIF orientation: %s", exc)
                orientation = 1
            depth = _depth(img, fmt, data, orientation)
            swapped = (shown.size[0] > shown.size[1]) != (img.size[0] > img.size[1])
            return shown, ((width, height) if swapped else (height, width)), depth

    shown, full, depth = _as_decode_error(load, fmt)
    try:
        yield shown, full, depth
    finally:
        shown.close()


_T = TypeVar("_T")


def _as_decode_error(step: Callable[[], _T], fmt: str) -> _T:
    """Run one decoding step; whatever malformed input makes it raise becomes an ImageDecodeError."""
    try:
        return step()
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(TOO_LARGE, str(exc)) from exc
    except MemoryError as exc:
        raise ImageDecodeError(TOO_LARGE, "not enough memory to decode the image") from exc
    except Exception as exc:
        # Malformed input makes Pillow raise many types (OSError, SyntaxError, struct.error,
        # IndexError, ...); for untrusted bytes every one of them means "corrupt file".
        msg = str(exc) or type(exc).__name__
        reason = TRUNCATED if "truncated" in msg.lower() else CORRUPT
        raise ImageDecodeError(reason, f"cannot decode the {fmt} image: {msg}") from exc
