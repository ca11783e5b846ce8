"""Heatmap over photograph, as the PNG that clinicians look at."""

from __future__ import annotations

import io

import cv2
import numpy as np
from PIL import Image


def overlay(photo: np.ndarray, heat: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """Blend a JET-coloured heatmap over the photo where the map is non-negligible."""
    if heat.shape != photo.shape[:2]:
        raise ValueError(f"heatmap {heat.shape} does not match photo {photo.shape[:2]}")
    levels = (np.clip(heat, 0, 1) * 255).astype(np.uint8)
    colored = np.asarray(cv2.applyColorMap(levels, cv2.COLORMAP_JET))[..., ::-1]
    a = (alpha * np.clip(heat * 1.5, 0, 1))[..., None]
    return (photo * (1 - a) + colored * a).astype(np.uint8)


def overlay_png(photo: np.ndarray, heat: np.ndarray) -> bytes:
    """The overlay as PNG. zlib level 1: on a 512-px photograph it encodes in ~12 ms instead of
    ~50 ms at PIL's default 6 (as long as drawing the heatmap itself) for a file ~17% larger."""
    buf = io.BytesIO()
    Image.fromarray(overlay(photo, heat)).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()
