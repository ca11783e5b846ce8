"""A clinic's grader-graded photographs as a labelled folder (``drscreen data export-graded``).

The folder is what ``drscreen evaluate --labels FOLDER/labels.csv`` reads: ``images/`` and a
``labels.csv`` with ``image, grade, patient_id, eye`` (the grader's grade), so the team can measure
a release, or a candidate, on the clinic's own photographs graded by its own graders, which no
model was trained on. Photographs the grader found ungradable have no grade to evaluate against:
they are listed in ``ungradable.csv`` instead.

It holds patient photographs and ids: it is written readable by its owner only, and the audit
log records each export (committed before the folder appears under its name).
"""

from __future__ import annotations

import csv
import os
import shutil
import tempfile
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from core import repository as repo
from core.csvcells import csv_cell
from core.grading_queue import in_period
from core.store import FileStore, paths_overlap
from core.tables import GraderGrade, Image, Patient, as_utc

LABEL_COLUMNS = ["image", "grade", "patient_id", "eye", "grader", "image_id", "received_at"]
UNGRADABLE_COLUMNS = ["image_id", "patient_id", "eye", "grader", "received_at"]
#: Rows read from the database at a time (a clinic's graded photographs grow without bound).
_BATCH = 1000


class ExportRefused(Exception):
    """The target cannot take the export: not a new or empty folder, or inside the store."""


@dataclass(frozen=True)
class ExportSummary:
    labelled: int
    ungradable: int
    missing_files: list[str]  # image ids whose stored photograph is gone (left out, said)


def _check_target(out_dir: Path, store: FileStore) -> Path:
    """The folder to make, absolute; ExportRefused for what must not be written to."""
    if out_dir.is_symlink():
        raise ExportRefused(f"{out_dir} is a symbolic link: name a folder")
    target = out_dir.resolve()
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ExportRefused(f"{out_dir} exists and is not an empty folder")
    if target == Path(target.anchor) or not target.parent.is_dir():
        raise ExportRefused(f"{out_dir}: its parent folder must exist")
    if paths_overlap(target, store.root):
        raise ExportRefused(f"{out_dir} is inside the store (or holds it): name a folder outside it")
    return target


def _rows(session: Session, clinic_id: int, since: datetime | None, until: datetime | None) -> Any:
    stmt = (
        select(
            GraderGrade.grade,
            GraderGrade.gradable,
            GraderGrade.grader,
            Image.id,
            Image.eye,
            Image.stored_path,
            Image.created_at,
            Patient.external_id,
        )
        .join(Image, Image.id == GraderGrade.image_id)
        .join(Patient, Patient.id == Image.patient_id)
        .order_by(Image.created_at, Image.id)
    )
    return session.execute(in_period(stmt, clinic_id, since, until).execution_options(yield_per=_BATCH))


def _write(
    session: Session,
    store: FileStore,
    folder: Path,
    clinic_id: int,
    since: datetime | None,
    until: datetime | None,
) -> ExportSummary:
    (folder / "images").mkdir(mode=0o700)
    labelled = ungradable = 0
    missing: list[str] = []
    with (
        open(folder / "labels.csv", "w", newline="", encoding="utf-8") as labels_fh,
        open(folder / "ungradable.csv", "w", newline="", encoding="utf-8") as ungradable_fh,
    ):
        labels = csv.writer(labels_fh)
        rejected = csv.writer(ungradable_fh)
        labels.writerow(LABEL_COLUMNS)
        rejected.writerow(UNGRADABLE_COLUMNS)
        for grade, gradable, grader, image_id, eye, stored_path, created_at, patient_id in _rows(
            session, clinic_id, since, until
        ):
            received = as_utc(created_at).isoformat()
            who = csv_cell(grader)
            if not gradable:
                rejected.writerow([image_id, csv_cell(patient_id), eye, who, received])
                ungradable += 1
                continue
            if not store.exists(stored_path):
                missing.append(image_id)
                continue
            name = f"images/{image_id}{Path(stored_path).suffix.lower() or '.bin'}"
            shutil.copyfile(store.path(stored_path), folder / name)
            os.chmod(folder / name, 0o600)
            labels.writerow([name, grade, csv_cell(patient_id), eye, who, image_id, received])
            labelled += 1
    for name in ("labels.csv", "ungradable.csv"):
        os.chmod(folder / name, 0o600)
    return ExportSummary(labelled, ungradable, missing)


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
    ``out_dir`` (made; refused when it exists and is not empty, is a link, or overlaps the store).
    Written into a private temporary folder beside it, the audit row committed, then renamed:
    an export that fails leaves nothing behind, and none appears unaudited. Commits."""
    target = _check_target(out_dir, store)
    work = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.export-"))  # mode 0700
    try:
        summary = _write(session, store, work, clinic_id, since, until)
        repo.record_audit(
            session,
            action="grader_grade.export",
            clinic_id=clinic_id,
            target_type="folder",
            detail={
                "by": by,
                "folder": str(target),
                "labelled": summary.labelled,
                "ungradable": summary.ungradable,
                "missing_files": len(summary.missing_files),
                "since": since.isoformat() if since else None,
                "until": until.isoformat() if until else None,
            },
        )
        session.commit()
        if target.exists():  # an empty folder named for it (perhaps the current one): fill it
            os.chmod(target, 0o700)
            for part in work.iterdir():
                part.rename(target / part.name)
            work.rmdir()
        else:
            work.rename(target)
    except BaseException:
        session.rollback()
        shutil.rmtree(work, ignore_errors=True)
        raise
    return summary
