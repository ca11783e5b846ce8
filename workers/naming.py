"""Which patient and eye a photograph in a folder belongs to, from its file name or a manifest.

Naming rules (case-insensitive, matched on the file name without its extension):

- EyePACS: ``<patient>_<left|right>[<suffix>]`` e.g. ``10_left.jpeg``, ``10_left_2.jpg``;
- DeepDRiD: ``<patient>_<l|r><n>`` e.g. ``317_l1.jpg``, ``317_r2.jpg``.

A ``manifest.csv`` in the folder (columns ``image``, ``patient_id``, ``eye``; ``MANIFEST_COLUMNS``
has the other names each is found under) wins over names.
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass
from pathlib import PurePosixPath

MANIFEST_NAME = "manifest.csv"
#: The manifest's columns (case-insensitive) and the other names each is found under: clinic
#: exports call the file column "file" or "filename" as often as "image".
MANIFEST_COLUMNS: dict[str, tuple[str, ...]] = {
    "image": ("image", "file", "filename", "path"),
    "patient_id": ("patient_id", "patient"),
    "eye": ("eye", "laterality"),
}

# The patient part is lazy so the eye marker binds to the LAST "_left"/"_right" that fits, which
# keeps patient ids containing underscores intact ("site_3_12_left" -> patient "site_3_12").
_EYEPACS = re.compile(r"^(?P<patient>.+?)_(?P<eye>left|right)(?:[_\-. ].*)?$", re.IGNORECASE)
_DEEPDRID = re.compile(r"^(?P<patient>.+?)_(?P<eye>[lr])(?P<n>\d+)$", re.IGNORECASE)

_EYE_WORDS = {"left": "left", "l": "left", "os": "left", "right": "right", "r": "right", "od": "right"}


@dataclass(frozen=True)
class Match:
    patient_id: str
    eye: str


def normalise_eye(value: str) -> str | None:
    """``left``/``right`` from the spellings clinics use (L, R, OS, OD, any case); None otherwise."""
    return _EYE_WORDS.get(value.strip().lower())


def match_name(filename: str) -> Match | None:
    """Patient and eye from an EyePACS or DeepDRiD file name, or None when neither rule fits."""
    stem = PurePosixPath(filename).name
    if "." in stem:
        stem = stem.rsplit(".", 1)[0]
    for pattern in (_DEEPDRID, _EYEPACS):
        m = pattern.match(stem)
        if m:
            patient = m.group("patient").strip()
            eye = normalise_eye(m.group("eye"))
            if patient and eye:
                return Match(patient, eye)
    return None


@dataclass(frozen=True)
class ManifestRow:
    image: str  # path relative to the folder, as written in the manifest
    patient_id: str | None
    eye: str | None
    error: str | None = None  # why this row cannot be used (missing patient, bad eye)
    line: int = 0  # its line in manifest.csv, to name a row that gives no file


class ManifestError(ValueError):
    """The manifest as a whole is unusable (missing columns, not CSV text)."""


def parse_manifest(data: bytes) -> list[ManifestRow]:
    """Rows of a ``manifest.csv``. Rows with a bad value come back with ``error`` set instead of
    failing the whole manifest, so each is reported against its own file."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ManifestError("manifest.csv is not UTF-8 text") from exc
    try:
        return _manifest_rows(text)
    except csv.Error as exc:  # e.g. a field over the csv module's limit: the manifest is unusable
        raise ManifestError(f"manifest.csv cannot be read as CSV: {exc}") from exc


def _manifest_rows(text: str) -> list[ManifestRow]:
    reader = csv.DictReader(io.StringIO(text))
    given = {(c or "").strip().lower(): c for c in (reader.fieldnames or [])}
    columns = {
        name: next((given[alias] for alias in aliases if alias in given), None)
        for name, aliases in MANIFEST_COLUMNS.items()
    }
    missing = [name for name, column in columns.items() if column is None]
    if missing:
        raise ManifestError(
            "manifest.csv lacks column(s): "
            + ", ".join(f"{name} (or {' / '.join(MANIFEST_COLUMNS[name][1:])})" for name in missing)
        )
    found = {name: column for name, column in columns.items() if column is not None}
    rows: list[ManifestRow] = []
    for raw in reader:
        image = (raw.get(found["image"]) or "").strip()
        patient = (raw.get(found["patient_id"]) or "").strip() or None
        eye_raw = (raw.get(found["eye"]) or "").strip()
        eye = normalise_eye(eye_raw) if eye_raw else None
        error = None
        if not image:
            if patient is None and not eye_raw:
                continue  # a blank line
            # a patient's row without its file: reported, so the patient is not silently missing
            error = "manifest.csv gives no file name on this line"
        elif patient is None:
            error = "manifest.csv gives no patient_id for this file"
        elif eye is None:
            error = f"manifest.csv gives eye {eye_raw!r}; expected left or right"
        rows.append(ManifestRow(image=image, patient_id=patient, eye=eye, error=error, line=reader.line_num))
    return rows
