"""A clinic's grader-graded photographs as a labelled folder (``drscreen data export-graded``).

The folder is what ``drscreen evaluate --labels FOLDER/labels.csv`` reads: ``images/`` and a
``labels.csv`` with ``image, grade, patient_id, eye`` (the grader's grade), so the team can measure
a release, or a candidate, on the clinic's own photographs graded by its own graders, which no
model was trained on. Photographs the grader found ungradable have no grade to evaluate against:
they are listed in ``ungradable.csv`` instead.

It holds patient photographs and ids: the audit log records each export.
"""

from __future__ import annotations

import csv
import shutil
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from core import repository as repo
from core.csvcells import csv_cell
from core.store import FileStore
from core.tables import GraderGrade, Image, Patient

LABEL_COLUMNS = ["image", "grade", "patient_id", "eye", "grader", "image_id", "received_at"]
UNGRADABLE_COLUMNS = ["image_id", "patient_id", "eye", "grader", "received_at"]


class ExportRefused(Exception):
    """The target folder cannot take the export (it exists and is not empty, or is a file)."""


@dataclass(frozen=True)
class ExportSummary:
    labelled: int
    ungradable: int
    missing_files: list[str]  # image ids whose stored photograph is gone (left out, said)


def _suffix(stored_path: str) -> str:
    suffix = Path(stored_path).suffix.lower()
    return suffix if suffix else ".bin"


def export_graded(
    session: Session,
    store: FileStore,
    clinic_id: int,
    out_dir: Path,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    by: str = "cli",
) -> ExportSummary:
    """Write the clinic's photographs that have a grader's grade, received in [since, until), to
    ``out_dir`` (made; refused when it exists and is not empty), and audit the export. The folder
    is written under a temporary name and renamed at the end: an interrupted export leaves no
    half folder under ``out_dir``. The caller commits (the audit row)."""
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ExportRefused(f"{out_dir} exists and is not an empty folder")
    stmt = (
        select(GraderGrade, Image, Patient.external_id)
        .join(Image, Image.id == GraderGrade.image_id)
        .join(Patient, Patient.id == Image.patient_id)
        .where(GraderGrade.clinic_id == clinic_id)
        .order_by(Image.created_at, Image.id)
    )
    if since is not None:
        stmt = stmt.where(Image.created_at >= since)
    if until is not None:
        stmt = stmt.where(Image.created_at < until)
    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    (partial / "images").mkdir(parents=True)
    labelled = ungradable = 0
    missing: list[str] = []
    with (
        open(partial / "labels.csv", "w", newline="", encoding="utf-8") as labels_fh,
        open(partial / "ungradable.csv", "w", newline="", encoding="utf-8") as ungradable_fh,
    ):
        labels = csv.writer(labels_fh)
        rejected = csv.writer(ungradable_fh)
        labels.writerow(LABEL_COLUMNS)
        rejected.writerow(UNGRADABLE_COLUMNS)
        for grade, image, patient_id in session.execute(stmt):
            received = image.created_at.isoformat()
            if not grade.gradable:
                rejected.writerow(
                    [image.id, csv_cell(patient_id), image.eye, csv_cell(grade.grader), received]
                )
                ungradable += 1
                continue
            if not store.exists(image.stored_path):
                missing.append(image.id)
                continue
            name = f"images/{image.id}{_suffix(image.stored_path)}"
            shutil.copyfile(store.path(image.stored_path), partial / name)
            row = [
                name,
                grade.grade,
                csv_cell(patient_id),
                image.eye,
                csv_cell(grade.grader),
                image.id,
                received,
            ]
            labels.writerow(row)
            labelled += 1
    if out_dir.exists():
        out_dir.rmdir()  # empty, checked above
    partial.rename(out_dir)
    repo.record_audit(
        session,
        action="grader_grade.export",
        clinic_id=clinic_id,
        target_type="folder",
        detail={
            "by": by,
            "labelled": labelled,
            "ungradable": ungradable,
            "missing_files": len(missing),
            "since": since.isoformat() if since else None,
            "until": until.isoformat() if until else None,
        },
    )
    return ExportSummary(labelled, ungradable, missing)
