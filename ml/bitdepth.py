"""How many of a 16-bit photograph's bits carry data, and its full samples when Pillow drops them.

Scientific and medical cameras record 10 or 12 bits per sample; many of their export tools store
those values unscaled in a 16-bit PNG or TIFF (0..4095 in a 0..65535 container). Read as 16-bit
data, such a photograph is nearly black and the quality gate calls it ``underexposed``; a viewer
that honours the data's depth shows it normally. The rule (``data_bits``):

- **The file says** (PNG ``sBIT``; TIFF ``MaxSampleValue``, as the bits of its value): if every
  sample fits in the declared bits, the samples are unscaled and are read at that depth. If some
  sample exceeds it, the writer scaled the data to the full range as the PNG specification asks,
  and it is read as 16-bit data (the declaration only tells where the data came from).
- **The file says nothing**: the smallest common camera depth (8, 10 or 12 bits) that holds every
  sample, else 16. A genuine 16-bit photograph whose every sample is <= 4095 would show at most
  8-bit level 15 (black, ungradable as ``underexposed``); read as 12-bit data it shows what its
  4096 levels recorded, and the quality gate judges that picture as it judges any other. Depths of
  14 bits are not guessed: a full-range photograph with every sample under a quarter of the range
  is dark but visible, and guessing would change how it decodes.

Pillow reduces 16-bit RGB and RGBA to 8 bits by keeping the high byte, so those files' full
samples come from OpenCV (``full_samples``); 16-bit grey reaches us whole through Pillow.
"""

from __future__ import annotations

import logging
import struct
from typing import Final

import numpy as np

log = logging.getLogger(__name__)

__all__ = [
    "COMMON_DEPTHS",
    "data_bits",
    "full_samples",
    "png_layout",
    "png_significant_bits",
    "tiff_significant_bits",
]

#: Depths guessed for unscaled data in a 16-bit container that does not declare its depth.
COMMON_DEPTHS: Final = (8, 10, 12)
_PNG_SIGNATURE: Final = b"\x89PNG\r\n\x1a\n"
#: PNG colour types -> number of colour (not alpha) channels an sBIT chunk lists first.
_PNG_COLOUR_CHANNELS: Final = {0: 1, 2: 3, 3: 3, 4: 1, 6: 3}
_TIFF_MAX_SAMPLE_VALUE: Final = 281


def data_bits(max_value: int, declared: int | None) -> int:
    """The depth the samples (whose largest is ``max_value``) are read at: 8..16."""
    if declared is not None:
        return declared if 0 < declared < 16 and max_value < 1 << declared else 16
    return next((bits for bits in COMMON_DEPTHS if max_value < 1 << bits), 16)


def png_layout(data: bytes) -> tuple[int, int] | None:
    """(bit depth, colour type) from a PNG's IHDR, or None when the header is not there."""
    if not data.startswith(_PNG_SIGNATURE) or data[12:16] != b"IHDR" or len(data) < 26:
        return None
    return data[24], data[25]


def png_significant_bits(data: bytes) -> int | None:
    """The largest significant-bit count the ``sBIT`` chunk gives a colour channel, or None.

    Chunks are walked by their lengths up to the first IDAT (sBIT must come before it)."""
    layout = png_layout(data)
    if layout is None:
        return None
    at = len(_PNG_SIGNATURE)
    while at + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[at : at + 8])
        if kind in (b"IDAT", b"IEND"):
            return None
        if kind == b"sBIT":
            body = data[at + 8 : at + 8 + min(length, 4)]
            colour = body[: _PNG_COLOUR_CHANNELS.get(layout[1], 1)]
            return max(colour) if colour else None
        at += 12 + length
    return None


def tiff_significant_bits(tags: object) -> int | None:
    """Bits of a TIFF's ``MaxSampleValue`` (Pillow's ``tag_v2``), or None when it has none."""
    get = getattr(tags, "get", None)
    value = get(_TIFF_MAX_SAMPLE_VALUE) if get is not None else None
    if value is None:
        return None
    values = value if isinstance(value, tuple) else (value,)
    try:
        top = max(int(v) for v in values)
    except (TypeError, ValueError):
        return None
    return top.bit_length() if top > 0 else None


def full_samples(data: bytes) -> tuple[np.ndarray, np.ndarray | None] | None:
    """Every 16-bit sample of a PNG or TIFF: (H x W x 3 colour in RGB order, H x W alpha or None),
    uint16 views of one decoded array, or None.

    None when OpenCV cannot read the file or does not find 16-bit colour in it: the caller keeps
    Pillow's 8-bit reading then (Pillow already accepted the file; the two decoders must not
    disagree on whether an upload is whole)."""
    import cv2  # only this rare path needs it; the API's upload check does not

    try:
        samples = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error as exc:
        log.warning("OpenCV could not read a 16-bit photograph Pillow read: %s", exc)
        return None
    if samples is None or samples.dtype != np.uint16 or samples.ndim != 3 or samples.shape[2] not in (3, 4):
        return None
    # OpenCV orders channels BGR(A); reversed by a slice, a view (an index list would copy it all)
    return samples[..., 2::-1], (samples[..., 3] if samples.shape[2] == 4 else None)
