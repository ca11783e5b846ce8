"""Detect silently resynchronised damage in a JPEG's scan data: a DC shift from some MCU on.

The damage
----------
When bytes of a baseline JPEG's entropy-coded data are overwritten, the Huffman decoder usually
loses step and libjpeg-turbo refuses the file in strict mode (``simplejpeg.decode_jpeg(...,
strict=True)``, as ``ml/imageio.py`` calls it). Often, though, it falls back into step after a few
blocks without noticing anything. Each block's DC (its mean level) is coded as the difference from
the previous block's DC in the same component, so one wrongly decoded difference offsets EVERY
later block of that component by the same constant. The photograph decodes without a warning,
but from one MCU on (in raster order) the black surround turns grey or coloured, or the disc gets
darker: wrong for grading, and nothing complains.

The two tests
-------------
Both look at one value per 8x8 block: Pillow's draft mode decodes at 1/8 scale, where libjpeg
keeps only each block's DC, and in the file's own YCbCr (no conversion to RGB, so chroma never
clips).

1. Border step (``_border_step``). The leftmost and rightmost blocks of every MCU row are
   background in a fundus photograph, nearly constant. Read in raster order (left end of row 0,
   right end of row 0, left end of row 1, ...), a DC shift turns them into two flat runs with one
   clean step between. Flagged when some split leaves >= 90 % of the values within max(3, 15 % of
   the step) of their run's median and the step is >= 6 levels in some channel.
2. Staircase (``_interior_step``). If the shift starts at MCU (r, x0), the image steps by the same
   d across MCU-row boundary r (columns >= x0) and boundary r + 1 (columns < x0), over the whole
   width. The differences across every MCU-row boundary are detrended with the gradients inside
   the MCUs either side (a DC shift is sharp, real edges rarely are), Y is ignored where either
   side is clipped (the disc's flat top/bottom cut), and the rows below may be slipped sideways by
   up to two MCUs (damage that loses or adds blocks). Flagged when a candidate d (the median over
   a half width) has |d| >= 10 and, for some x0 on the MCU grid, >= 80 % of the values that could
   be judged (>= 60 % of the width) are within max(4, 20 % of |d|) of it.

Thresholds and measured figures
-------------------------------
The thresholds are a prototype's, tuned on 800 corrupted copies of 200 photos of
eyepacs-natural-512 (1 to 64 random bytes overwritten in the scan data, seed 12345); 470 of them
pass libjpeg-turbo's strict mode. This vectorised version makes the prototype's decisions, test by
test, on every photo below (and on 6000 random synthetic block grids):

* caught 339 of those 470 (most misses are shifts of a few levels or confined to a few MCUs);
* false positives: 0 of the 460 photos of eyepacs-natural-512, 0 of the 40 of drive-ungraded,
  0 of the 8 shipped samples, 5 of the 5778 of eyepacs-equalized-256 (all by the staircase test).

Outside that ground (4:2:0 photos of 256 px and more) the staircase test makes false positives.
Smaller photos: eyepacs-natural-512 re-encoded smaller gives 3 of 920 at 256 px wide, 13 at 128,
0 from 384 to 1024 px. MCUs one block high (4:4:4, 4:2:2, greyscale) leave no gradient inside the
MCU to tell a real edge from a step: 13 or 14 of those 460 photos re-encoded so are flagged.

Hence anything but a baseline 4:2:0 YCbCr JPEG with both sides >= 256 px returns False (CMYK,
greyscale, progressive, other sampling, small, not a JPEG): not judged. The image is analysed as
stored, without EXIF rotation, since the damage runs in scan order. Cost: about 1 ms for a
512x342 photograph, 7 to 15 ms at 3000x2000 (mostly the draft decode; the tests take ~2 ms).
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

_BORDER_MIN = 6.0  # levels: smallest border step flagged
_INTERIOR_MIN = 10.0  # levels: smallest staircase step flagged
_MAX_SLIP = 2  # MCUs the rows below the damage may be slipped sideways
_MIN_SIDE = 256  # pixels: below, false staircases grow common
# The border test's work grows with the square of the block rows: a photograph taller than this,
# or this many times longer than wide, is not judged (a 256 x 65,000 strip needed ~2.8 GB).
_MAX_SIDE = 8192
_MAX_ASPECT = 4
_MCU = (2, 2)  # 4:2:0: an MCU is 2x2 luma blocks (one value per block at 1/8 scale)

_Grid = tuple[np.ndarray, int, int]


def looks_block_shifted(data: bytes) -> bool:
    """True if a JPEG decodes with a constant brightness/colour offset from some MCU on.

    That is the mark of scan-data damage the decoder resynchronised from silently; call it on data
    that a strict decode accepted. False when the data is not a kind of JPEG the tests were
    measured on (see the module docstring), so it never raises for what Pillow can open.
    """
    grid = _block_grid(data)
    if grid is None:
        return False
    z, mcu_h, mcu_w = grid
    return _border_step(z, mcu_h, _BORDER_MIN) or _interior_step(z, mcu_h, mcu_w, _INTERIOR_MIN)


def _block_grid(data: bytes) -> _Grid | None:
    """(C, H/8, W/8) float32 block values in the file's colour space, MCU height and width in blocks."""
    try:
        im = Image.open(io.BytesIO(data))
        if im.format != "JPEG" or im.mode != "RGB" or im.info.get("progressive"):
            return None
        w, h = im.size
        if min(w, h) < _MIN_SIDE or max(w, h) > min(_MAX_SIDE, _MAX_ASPECT * min(w, h)):
            return None
        if not _is_420(getattr(im, "layer", None)):
            return None
        im.draft("YCbCr", (w // 8, h // 8))
        im.load()
        if im.size != ((w + 7) // 8, (h + 7) // 8) or im.mode != "YCbCr":
            return None
        z = np.asarray(im)
    except (OSError, ValueError, SyntaxError, MemoryError, Image.DecompressionBombError):
        return None
    # One contiguous plane per channel: the row gathers and per-row counts below stay cache-friendly.
    return np.ascontiguousarray(z.transpose(2, 0, 1), dtype=np.float32), *_MCU


def _is_420(layers: object) -> bool:
    """Are the frame's components (Pillow's (id, h, v, table) per component) Y 2x2, Cb 1x1, Cr 1x1?"""
    if not isinstance(layers, list) or len(layers) != 3:
        return False
    try:
        factors = [(int(layer[1]), int(layer[2])) for layer in layers]
    except (TypeError, ValueError, IndexError):
        return False
    return factors == [_MCU, (1, 1), (1, 1)]


def _nanmedian_rows(x: np.ndarray) -> np.ndarray:
    """np.nanmedian(x, axis=1) of a 2-d array, without its slow per-row fallback."""
    n = np.count_nonzero(~np.isnan(x), axis=1)
    s = np.sort(np.where(np.isnan(x), np.inf, x), axis=1)  # the NaNs, as +inf, sort last
    rows = np.arange(len(x))
    lo, hi = s[rows, np.maximum(n - 1, 0) // 2], s[rows, np.minimum(n // 2, x.shape[1] - 1)]
    return np.where(n > 0, (lo + hi) / 2, np.nan)


def _border_step(z: np.ndarray, mcu_h: int, min_step: float) -> bool:
    """Do the border blocks, in raster order, form two flat runs with a step >= min_step between?"""
    C, H, _ = z.shape
    rows = -(-H // mcu_h)
    ends = np.stack([z[:, :, 0], z[:, :, -1]], -1)  # (C, H, 2)
    ends = np.concatenate([ends, np.repeat(ends[:, -1:], rows * mcu_h - H, 1)], 1)  # complete last MCU row
    seq = np.median(ends.reshape(C, rows, mcu_h, 2), 2).reshape(C, 2 * rows)  # L0 R0 L1 R1 ...
    n = seq.shape[1]
    if n < 2:
        return False
    # Split i (1 .. n-1) gives the runs seq[:i] and seq[i:]: the medians of all of them from two
    # in-place sorts, after pushing the other run's values past the end of each row. In units of
    # 1/2 (seq holds means of 1 or 2 bytes) int16 is exact and half the memory of float32.
    size = np.arange(1, n)
    first = np.arange(n) < size[:, None]  # (n - 1, n): in the first run
    twice = (2 * seq).astype(np.int16)
    ahead = np.where(first[:, None], twice, np.int16(1024))  # (n - 1, C, n)
    behind = np.where(first[:, None], np.int16(1024), twice)
    ahead.sort(-1)
    behind.sort(-1)
    i = size - 1
    m1 = (ahead[i, :, (size - 1) // 2] + ahead[i, :, size // 2]) / 4  # (n - 1, C) exact medians
    m2 = (behind[i, :, (n - size - 1) // 2] + behind[i, :, (n - size) // 2]) / 4
    step = np.abs(m2 - m1).astype(np.float32)
    # Only a step between the two ends of one MCU row: damage starts at an MCU inside a row (at its
    # first MCU 1 time in ~30, missed); a step between two rows is as likely a plain band across
    # the photograph, a camera's header or footer strip (the review: every such photograph flagged).
    mid_row = size % 2 == 1  # seq[:i] ends with L_r: the split falls between L_r and R_r
    cand = np.flatnonzero((step.max(1) >= min_step) & mid_row)
    if cand.size == 0:
        return False
    # Both runs must be flat, relative to the step: >= 90 % of the values near their run's median.
    tol = np.maximum(3.0, 0.15 * step[cand])[:, :, None]
    ref = np.where(first[cand][:, None], m1[cand][:, :, None], m2[cand][:, :, None])  # (M, C, n)
    flat = (np.abs(seq - ref) <= tol).all(1).mean(1)
    # and the row where it happens must show it: its left end with the first run, its right end
    # with the second (a band whose edge falls inside an MCU row blends both ends alike)
    at = size[cand]  # seq[at - 1] = L_r, seq[at] = R_r
    pair = (np.abs(seq[:, at - 1].T - m1[cand]) <= tol[:, :, 0]).all(1)
    pair &= (np.abs(seq[:, at].T - m2[cand]) <= tol[:, :, 0]).all(1)
    return bool(((flat >= 0.9) & pair).any())


def _interior_step(z: np.ndarray, mcu_h: int, mcu_w: int, min_step: float) -> bool:
    """Is there a staircase step of >= min_step across MCU-row boundary r (right) / r + 1 (left)?"""
    C, H, W = z.shape
    bnd = np.arange(mcu_h, H, mcu_h)  # first block row of every MCU row but the first
    if bnd.size == 0:
        return False
    below, above = z[:, bnd], z[:, bnd - 1]  # (C, K, W): the K boundaries
    # Gradients inside the MCUs either side, to detrend the step (0 for one-block-high MCUs and
    # for a last MCU row one block high).
    grad_up = above - z[:, bnd - 2] if mcu_h >= 2 else np.zeros_like(above)
    grad_dn = z[:, np.minimum(bnd + 1, H - 1)] - below if mcu_h >= 2 else np.zeros_like(above)
    valid = np.abs(grad_up) <= 10
    valid &= np.abs(grad_dn) <= 10  # a DC shift is sharp
    valid[0] &= (below[0] > 4) & (below[0] < 251) & (above[0] > 4) & (above[0] < 251)  # Y unclipped
    # step = below - above - (grad_up + grad_dn) / 2 = lower - upper, the row above slipped sideways
    # by whole MCUs. All terms are multiples of 1/2, far inside float32's exact range: the regrouping
    # changes nothing. (The arrays are built in place: at 3000x2000 fresh temporaries cost more in
    # page faults than the arithmetic.)
    lower = np.multiply(grad_dn, -0.5, out=grad_dn)
    lower += below
    lower[~valid] = np.nan
    pad = _MAX_SLIP * mcu_w
    upper = np.full((C, len(bnd), W + 2 * pad), np.nan, np.float32)
    np.multiply(grad_up, 0.5, out=upper[..., pad : pad + W])
    upper[..., pad : pad + W] += above
    windows = np.lib.stride_tricks.sliding_window_view(upper, W, axis=2)[:, :, ::mcu_w]  # (C, K, S, W)
    slips = pad - mcu_w * np.arange(windows.shape[2])  # windows[:, :, j]: the row above moved right

    # Candidate d: median over the left half of boundary r + 1 (the damage starts right of the
    # middle) or the right half of boundary r (starts left of it). Only |d| >= min_step matters: a
    # median that far from 0 needs at least half of its values that far out, and a half row holds
    # at least (valid - |slip|) values. Counting those is cheap; the few rows left get the median.
    half = W // 2
    halves = (slice(None, half), slice(half, None))  # side 0, 1
    valid_n = np.add.reduceat(valid, [0, half], -1, dtype=np.int32)  # (C, K, side)
    far_n = np.empty((len(slips), C, len(bnd), 2), np.int32)
    step, far = np.empty_like(lower), np.empty(lower.shape, bool)
    for k in range(len(slips)):
        np.subtract(lower, windows[:, :, k], out=step)
        with np.errstate(invalid="ignore"):
            np.greater_equal(np.abs(step, out=step), min_step, out=far)
        far_n[k] = np.add.reduceat(far, [0, half], -1, dtype=np.int32)
    far_n = far_n.transpose(3, 1, 2, 0)  # (side, C, K, S)
    slip = np.abs(slips)
    picked: list[tuple[int, tuple[np.ndarray, ...], np.ndarray]] = []
    for side, cols in enumerate(halves):
        idx = np.nonzero((far_n[side] > 0) & (2 * far_n[side] >= valid_n[..., side, None] - slip))
        if idx[0].size:
            d = _nanmedian_rows(_steps(lower, windows, *idx)[:, cols])
            keep = np.abs(d) >= min_step
            picked.append((side, tuple(i[keep] for i in idx), d[keep]))

    # Check every candidate at every x0 on the MCU grid: boundary r's steps from x0 on and boundary
    # r + 1's left of x0 (a side-0 candidate came from boundary b = r + 1, a side-1 one from b = r).
    splits = np.arange(0, W, mcu_w)
    for side, (c, b, j), d in picked:
        if not d.size:
            continue
        at_r, at_next = _steps(lower, windows, c, b - 1 + side, j), _steps(lower, windows, c, b + side, j)
        tol = np.maximum(4.0, 0.2 * np.abs(d))[:, None]
        judged = _count_left(~np.isnan(at_next), splits) + _count_right(~np.isnan(at_r), splits)
        with np.errstate(invalid="ignore"):
            agree_next, agree_r = np.abs(at_next - d[:, None]) <= tol, np.abs(at_r - d[:, None]) <= tol
        agree = _count_left(agree_next, splits) + _count_right(agree_r, splits)
        if ((judged >= 0.6 * W) & (agree >= 0.8 * judged)).any():
            return True
    return False


def _steps(lower: np.ndarray, windows: np.ndarray, c: np.ndarray, b: np.ndarray, j: np.ndarray) -> np.ndarray:
    """(M, W) steps of channel c across boundary b with slip j; NaN rows where b is out of range."""
    inside = (b >= 0) & (b < lower.shape[1])
    bb = np.clip(b, 0, lower.shape[1] - 1)
    rows = lower[c, bb] - windows[c, bb, j]
    rows[~inside] = np.nan
    return rows


def _count_left(mask: np.ndarray, splits: np.ndarray) -> np.ndarray:
    """Per row, how many of the columns left of each split are set."""
    counts = np.zeros((len(mask), mask.shape[1] + 1), np.int32)
    np.cumsum(mask, 1, out=counts[:, 1:])
    return counts[:, splits]


def _count_right(mask: np.ndarray, splits: np.ndarray) -> np.ndarray:
    """Per row, how many of the columns from each split on are set."""
    return np.count_nonzero(mask, 1)[:, None] - _count_left(mask, splits)
