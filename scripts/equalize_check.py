"""How closely the ``equalize`` enhancement reproduces the equalised EyePACS folder.

41 patients (82 photographs) are in both data folders: the natural-colour photograph and the
third party's colour-equalised copy of the same camera image. Both are cropped to the disc and
resized to 256 px as the product does; then, per colour channel and inside the inscribed circle,
the equalised copy is compared with the natural photograph as it is and after
``ml.preprocess.equalize_channels``:

    .venv/bin/python scripts/equalize_check.py

Prints the median (and lowest) Pearson correlation and mean absolute difference per channel.
"""

from __future__ import annotations

import csv
from pathlib import Path

import cv2
import numpy as np

from ml.preprocess import crop_square, equalize_channels
from ml.training.data import load_rgb

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
SIZE = 256


def square(rgb: np.ndarray) -> np.ndarray:
    return cv2.resize(crop_square(rgb, True), (SIZE, SIZE), interpolation=cv2.INTER_AREA)


def paired_photographs(data: Path) -> list[str]:
    with open(data / "eyepacs-equalized-256" / "labels.csv") as f:
        equalised = {row["patient_id"] for row in csv.DictReader(f)}
    with open(data / "eyepacs-natural-512" / "labels.csv") as f:
        return [row["image"] for row in csv.DictReader(f) if row["patient_id"] in equalised]


def main() -> None:
    circle = np.zeros((SIZE, SIZE), np.uint8)
    cv2.circle(circle, (SIZE // 2, SIZE // 2), int(SIZE * 0.46), 1, thickness=-1)
    inside = circle.astype(bool)
    names = paired_photographs(DATA)
    figures: dict[str, list[list[float]]] = {"natural as it is": [], "natural, equalize": []}
    for name in names:
        natural = square(load_rgb(DATA / "eyepacs-natural-512" / name))
        target = square(load_rgb(DATA / "eyepacs-equalized-256" / name))
        for label, img in (("natural as it is", natural), ("natural, equalize", equalize_channels(natural))):
            a, b = img[inside].astype(float), target[inside].astype(float)
            corr = [float(np.corrcoef(a[:, c], b[:, c])[0, 1]) for c in range(3)]
            figures[label].append(corr + list(np.abs(a - b).mean(axis=0)))
    print(f"{len(names)} photographs in both folders, compared with their equalised copy (R, G, B)")
    for label, rows in figures.items():
        v = np.array(rows)
        print(
            f"{label:18s} correlation median {np.round(np.median(v[:, :3], 0), 3)} "
            f"lowest {np.round(v[:, :3].min(0), 2)}; "
            f"mean |difference| median {np.round(np.median(v[:, 3:], 0), 1)}"
        )


if __name__ == "__main__":
    main()
