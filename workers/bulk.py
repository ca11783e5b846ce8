"""``drscreen score PATH [--out FILE.csv|.json] [--explain]``: the worker pipeline, embedded.

The same plain functions the Celery tasks call (``folders.ingest_item``, ``scoring.score_images``,
``explain.explain_image``) run in this process against a throwaway SQLite database and store in a
temporary folder, so the command line and the service can never disagree on a result.

Outputs:

- ``--out X.json``: ``{"model_version", "images": [...], "patients": [...]}``;
- ``--out X.csv``: per-image rows in X.csv and per-patient rows in ``X_patients.csv``;
- ``--out ...submission.csv`` (or ``submission=True``): a Kaggle-style ``ID,TARGET`` file
  (ID = file stem; ungradable photographs still get the ensemble's grade, as a submission needs one);
- no ``--out``: a per-patient table on standard output.

With ``--explain`` heatmaps are written to ``<out stem>_heatmaps/`` (or ``./drscreen-heatmaps/``).
File names that match no naming rule are still scored (as their own patient, eye unknown), since
a local user scoring a folder of arbitrary photographs wants every one graded.
"""

from __future__ import annotations

import csv
import json
import logging
import sys
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from sqlalchemy import select
from tqdm import tqdm

from core import repository as repo
from core.csvcells import csv_cell as _cell
from core.db import dispose_engines, get_engine, session_scope
from core.settings import get_settings
from core.store import FileStore, outputs_problem
from core.tables import Image, metadata
from ml.imageio import ImageDecodeError, decode_scaled
from ml.quality import DECODE_MIN_SIDE
from workers import explain as explain_mod
from workers import folders, scoring
from workers.model import EnsembleLike, check_release, get_ensemble
from workers.naming import ManifestError, match_name
from workers.settings import get_worker_settings

log = logging.getLogger(__name__)

LOCAL_CLINIC = "local"
PROB_COLUMNS = [f"p{g}" for g in range(5)]


@dataclass
class ImageRow:
    file: str
    patient_id: str | None
    eye: str | None
    status: str
    grade: int | None = None
    referable: bool | None = None
    gradable: bool | None = None
    probabilities: list[float] | None = None
    quality_reasons: list[str] = field(default_factory=list)
    error: str | None = None
    heatmap: str | None = None


@dataclass
class PatientRow:
    patient_id: str
    grade: int | None
    referable: bool
    gradable: bool
    eyes: dict[str, dict[str, Any]]


@dataclass
class ScoreResult:
    model_version: str
    images: list[ImageRow]
    patients: list[PatientRow]


Plan = tuple[Path, list[folders.PlannedFile]]


def _plan(path: Path) -> Plan:
    """(folder, planned files); ManifestError for a manifest.csv that cannot be used. Unmatched
    names become their own patient with eye unknown: named by the file's stem, or by its path
    when another file has that patient id or stem (``16.jpg`` beside ``16_left.jpg`` was pooled
    into patient 16's left eye)."""
    if path.is_file():
        folder, plan = path.parent, [folders.PlannedFile(path.name, None, None, "unmatched")]
    else:
        folder, plan = path, folders.plan_folder(path, roots=None)
    out = []
    for p in plan:
        # Only a photograph whose file name said nothing is scored anyway, as its own patient: a
        # manifest's refused rows keep their reason (a row without patient, a file listed for two
        # patients or eyes, one outside the folder or not listed), as in a folder job.
        if p.error is not None and ("cannot tell" in p.error or p.error == "unmatched"):
            m = match_name(p.path)
            if m is not None:
                p = folders.PlannedFile(p.path, m.patient_id, m.eye)
            else:
                # The schema needs an eye; "left" is a placeholder reported as unknown.
                p = folders.PlannedFile(p.path, PurePosixPath(p.path).stem, "left", "eye-unknown")
        out.append(p)
    known = Counter(p.patient_id for p in out if p.patient_id is not None)
    return folder, [
        folders.PlannedFile(p.path, p.path, p.eye, p.error)
        if p.error == "eye-unknown" and known[p.patient_id or ""] > 1
        else p
        for p in out
    ]


#: Per-patient output key of the photographs whose eye the file name did not tell.
UNKNOWN_EYE = "unknown"


def _heatmap_dir(out: Path | None) -> Path:
    return out.parent / f"{out.stem}_heatmaps" if out is not None else Path.cwd() / "drscreen-heatmaps"


def run(
    path: Path,
    *,
    explain: bool = False,
    heatmap_dir: Path | None = None,
    ensemble: EnsembleLike | None = None,
    submission_grades: bool = False,
    plan: Plan | None = None,
) -> ScoreResult:
    """Score ``path`` (a photograph or a folder) embedded; returns per-image and per-patient rows.
    ``plan``: ``_plan(path)`` when the caller has made it already."""
    settings = get_settings()
    ens = ensemble if ensemble is not None else get_ensemble()
    scratch_root = settings.var_dir / "tmp"
    scratch_root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="score-", dir=scratch_root) as scratch:
        url = f"sqlite:///{Path(scratch) / 'score.db'}"
        # A throwaway schema: create_all is enough (no history to migrate) and takes milliseconds.
        metadata.create_all(get_engine(url))
        store = FileStore(Path(scratch) / "store")
        try:
            planned = plan if plan is not None else _plan(path.resolve())
            return _run(planned, url, store, ens, explain, heatmap_dir, submission_grades)
        finally:
            get_engine(url).dispose()
            dispose_engines()


def _run(
    planned: Plan,
    url: str,
    store: FileStore,
    ens: EnsembleLike,
    explain: bool,
    heatmap_dir: Path | None,
    submission_grades: bool,
) -> ScoreResult:
    settings = get_settings()
    folder, plan = planned
    unknown_eye = {p.path for p in plan if p.error == "eye-unknown"}
    with session_scope(url) as session:
        clinic = repo.get_or_create_clinic(session, LOCAL_CLINIC)
        job = repo.create_job(session, clinic.id, str(folder))
        job_id, clinic_id = job.id, clinic.id
        repo.add_job_items(session, job_id, [repo.JobItemSpec(p.path, p.patient_id, p.eye) for p in plan])
        errors = {p.path: p.error for p in plan if p.error and p.error != "eye-unknown"}
        for item in repo.job_items(session, job_id):
            if item.path in errors:
                repo.set_job_item(session, item, status="failed", error=errors[item.path])
            else:
                folders.ingest_item(
                    session,
                    clinic_id=clinic_id,
                    job_id=job_id,
                    folder=folder,
                    item=item,
                    store=store,
                    max_bytes=settings.max_upload_bytes,
                    model_ref=ens.ref,
                )
        image_ids = list(
            dict.fromkeys(i.image_id for i in repo.job_items(session, job_id, status="queued") if i.image_id)
        )

    chunk = get_worker_settings().score_chunk
    with tqdm(total=len(image_ids), desc="scoring", unit="img", disable=None) as bar:
        for start in range(0, len(image_ids), chunk):
            part = image_ids[start : start + chunk]
            scoring.score_images(
                part, explain=explain, ensemble=ens, store=store, db_url=url, enqueue=_no_enqueue
            )
            bar.update(len(part))

    heatmaps: dict[str, str] = {}
    if explain:
        heatmap_dir = heatmap_dir or _heatmap_dir(None)
        heatmap_dir.mkdir(parents=True, exist_ok=True)
        with session_scope(url) as session:
            gradable = [
                im.id for im in session.scalars(select(Image).where(Image.id.in_(image_ids))) if im.gradable
            ]
        # those drawn with their grade are only looked up; the rest (PyTorch) are drawn here
        for image_id in tqdm(gradable, desc="heatmaps", unit="img", disable=None):
            rel = explain_mod.explain_image(image_id, ensemble=ens, store=store, db_url=url)
            if rel is not None:
                heatmaps[image_id] = rel

    return _collect(url, job_id, store, ens, unknown_eye, heatmaps, heatmap_dir, submission_grades)


def _no_enqueue(name: str, args: list[Any], kwargs: dict[str, Any]) -> None:
    """Embedded runs draw the heatmaps not drawn with the grades themselves, after scoring;
    nothing is published."""


def _collect(
    url: str,
    job_id: str,
    store: FileStore,
    ens: EnsembleLike,
    unknown_eye: set[str],
    heatmaps: dict[str, str],
    heatmap_dir: Path | None,
    submission_grades: bool,
) -> ScoreResult:
    rows: list[ImageRow] = []
    patients: dict[int, str] = {}
    known_eye: set[int] = set()  # patients with at least one photograph of a known eye
    unread: dict[str, set[str | None]] = {}  # patient -> eyes of the files that could not be read
    with session_scope(url) as session:
        items = repo.job_items(session, job_id)
        images = {im.id: im for im in repo.get_images(session, [i.image_id for i in items if i.image_id])}
        preds = repo.predictions_for_images(session, list(images))
        for item in items:
            image = images.get(item.image_id) if item.image_id else None
            eye = None if item.path in unknown_eye else item.eye
            if image is None:
                rows.append(ImageRow(item.path, item.patient_external_id, eye, "failed", error=item.error))
                if item.patient_external_id is not None:
                    unread.setdefault(item.patient_external_id, set()).add(eye)
                continue
            patients[image.patient_id] = item.patient_external_id or ""
            if eye is not None:
                known_eye.add(image.patient_id)
            pred = preds.get(image.id)
            row = ImageRow(
                file=item.path,
                patient_id=item.patient_external_id,
                eye=eye,
                status=image.status,
                grade=pred.grade if pred else None,
                referable=pred.referable if pred else None,
                gradable=image.gradable,
                probabilities=list(pred.probabilities) if pred and pred.probabilities else None,
                quality_reasons=list((image.quality or {}).get("reasons", [])),
                error=image.error or item.error,
            )
            if image.id in heatmaps and heatmap_dir is not None:
                flat = PurePosixPath(item.path).with_suffix("").as_posix().replace("/", "__")
                dest = heatmap_dir / f"{flat}.png"
                dest.write_bytes(store.read_bytes(heatmaps[image.id]))
                row.heatmap = str(dest)
            if submission_grades and row.grade is None and image.status == "done":
                row.grade = _grade_anyway(store, image.stored_path, ens)
            rows.append(row)
        patient_rows = []
        for patient_id, external_id in sorted(patients.items(), key=lambda kv: kv[1]):
            result = repo.get_current_patient_result(session, patient_id)
            if result is None:
                continue
            eyes = {
                e.eye: {"grade": e.grade, "gradable": e.gradable, "referable": e.referable}
                for e in result.eyes
            }
            summary = PatientRow(external_id, result.grade, result.referable, result.gradable, eyes)
            if patient_id not in known_eye:
                # one photograph of unknown eye, its own "patient": the database needed an eye and
                # "left" stood in; report that photograph alone, not a right eye never photographed
                only = eyes["left"]
                grade = only["grade"]
                summary = PatientRow(
                    external_id, grade, bool(only["referable"]), bool(only["gradable"]), {UNKNOWN_EYE: only}
                )
            patient_rows.append(summary)
    graded = {row.patient_id for row in patient_rows}
    patient_rows += [_unread_patient(pid, eyes) for pid, eyes in unread.items() if pid not in graded]
    patient_rows.sort(key=lambda row: row.patient_id)
    return ScoreResult(model_version=ens.ref, images=rows, patients=patient_rows)


def _unread_patient(patient_id: str, eyes: set[str | None]) -> PatientRow:
    """A patient none of whose files could be read: no gradable photograph, so ungradable and
    referable (the contract's rule), and in the per-patient output: a clinic working from that
    list would otherwise never see the patient."""
    ungradable = {"grade": None, "gradable": False, "referable": True}
    names = ("left", "right") if eyes - {None} else (UNKNOWN_EYE,)
    return PatientRow(patient_id, None, True, False, {eye: dict(ungradable) for eye in names})


def _grade_anyway(store: FileStore, stored_path: str, ens: EnsembleLike) -> int | None:
    """A grade for an ungradable photograph, for submission files only (they need one per row)."""
    try:
        data = store.read_bytes(stored_path)
        rgb, _ = decode_scaled(data, max_pixels=get_settings().max_image_pixels, min_side=DECODE_MIN_SIDE)
    except (FileNotFoundError, ImageDecodeError):
        return None
    return int(ens.predict([rgb])[0].grade)


# ----------------------------------------------------------------------------------- writers


def _image_dict(row: ImageRow) -> dict[str, Any]:
    return asdict(row)


def write_json(result: ScoreResult, out: Path) -> None:
    payload = {
        "model_version": result.model_version,
        "images": [_image_dict(r) for r in result.images],
        "patients": [asdict(p) for p in result.patients],
    }
    out.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")


def write_csv(result: ScoreResult, out: Path) -> Path:
    """Per-image rows to ``out``; per-patient rows to ``<stem>_patients.csv`` (returned)."""
    with out.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["file", "patient_id", "eye", "status", "grade", "referable", "gradable",
                    *PROB_COLUMNS, "quality_reasons", "error", "heatmap", "model_version"])  # fmt: skip
        for r in result.images:
            probs: list[float | None] = [*r.probabilities] if r.probabilities else [None] * 5
            w.writerow(
                [_cell(v) for v in (r.file, r.patient_id, r.eye, r.status, r.grade, r.referable,
                 r.gradable, *probs, ";".join(r.quality_reasons), r.error, r.heatmap, result.model_version)]
            )  # fmt: skip
    patients_out = _patients_csv(out)
    with patients_out.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["patient_id", "grade", "referable", "gradable", "left_grade", "right_grade",
                    "unknown_eye_grade"])  # fmt: skip
        for p in result.patients:
            eye_grades = [_cell(p.eyes.get(eye, {}).get("grade")) for eye in ("left", "right", UNKNOWN_EYE)]
            w.writerow([_cell(v) for v in (p.patient_id, p.grade, p.referable, p.gradable)] + eye_grades)
    return patients_out


def _patients_csv(out: Path) -> Path:
    return out.with_name(f"{out.stem}_patients.csv")


def write_submission(result: ScoreResult, out: Path) -> int:
    """Kaggle-style ``ID,TARGET`` (ID = file stem). Returns how many rows had no grade at all
    (undecodable files): they are written as 0 so the file stays complete, and logged."""
    missing = 0
    with out.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["ID", "TARGET"])
        for r in result.images:
            if r.grade is None:
                missing += 1
                log.warning("%s has no grade (%s); written as 0", r.file, r.error or r.status)
            w.writerow([_cell(PurePosixPath(r.file).stem), r.grade if r.grade is not None else 0])
    return missing


def format_table(result: ScoreResult) -> str:
    eyes = ("left", "right", UNKNOWN_EYE)
    lines = [f"{'patient':<24} {'grade':>5} {'referable':>9} {'left':>5} {'right':>5} {'eye?':>5}"]
    for p in result.patients:
        cells = [_show(p.eyes[e].get("grade")) if e in p.eyes else "-" for e in eyes]
        lines.append(
            f"{p.patient_id:<24} {_show(p.grade):>5} {('yes' if p.referable else 'no'):>9} "
            + " ".join(f"{c:>5}" for c in cells)
        )
    failed = [r for r in result.images if r.status == "failed"]
    for r in failed:
        lines.append(f"failed: {r.file}: {r.error}")
    return "\n".join(lines)


def _show(grade: int | None) -> str:
    return "ungr." if grade is None else str(grade)


def _output_problem(out: Path | None, submission: bool, heatmap_dir: Path | None) -> str | None:
    """Why the results could not be written (None: they can; core.store.outputs_problem)."""
    files: list[Path] = []
    if out is not None:
        files = [out] if submission or out.suffix.lower() == ".json" else [out, _patients_csv(out)]
    return outputs_problem(files, [heatmap_dir] if heatmap_dir else [])


def score_path(
    path: Path, out: Path | None = None, explain: bool = False, submission: bool | None = None
) -> int:
    """The ``drscreen score`` command. Returns the exit code (1 when nothing could be scored)."""
    path = Path(path)
    out = Path(out) if out is not None else None
    if submission is None:
        submission = out is not None and out.name.lower().endswith("submission.csv")
    if out is not None and out.suffix.lower() not in (".csv", ".json"):
        # said before scoring, not after: an unknown suffix used to get CSV silently
        sys.stderr.write(f"drscreen score: --out must end in .csv or .json, not {out.name!r}\n")
        return 2
    if submission and (out is None or out.suffix.lower() != ".csv"):
        # a submission is CSV: written into a .json name it was a CSV file under the wrong name
        sys.stderr.write("drscreen score: --submission needs --out ending in .csv\n")
        return 2
    # The folder, its manifest and the outputs are checked before scoring, each in one line (a
    # bad manifest was a traceback; an unwritable --out one after the whole folder was scored).
    try:
        plan = _plan(path.resolve())
    except ManifestError as exc:  # the API's folder job fails with the same message
        sys.stderr.write(f"drscreen score: {exc}\n")
        return 2
    if not plan[1]:  # nothing to score (README: exit 1), said rather than an empty table
        sys.stderr.write(f"drscreen score: no photographs found in {path}\n")
        return 1
    heatmap_dir = _heatmap_dir(out) if explain else None
    problem = _output_problem(out, submission, heatmap_dir)
    if problem is not None:
        sys.stderr.write(f"drscreen score: cannot write the results: {problem}\n")
        return 2
    try:
        check_release()  # before anything is decoded or stored: one line, not a traceback
    except (OSError, ValueError, KeyError) as exc:
        sys.stderr.write(f"drscreen score: the model cannot be loaded: {exc}\n")
        return 2
    result = run(path, explain=explain, heatmap_dir=heatmap_dir, submission_grades=submission, plan=plan)
    if out is not None:
        if submission:
            write_submission(result, out)
        elif out.suffix.lower() == ".json":
            write_json(result, out)
        else:
            patients_out = write_csv(result, out)
            log.info("per-patient results in %s", patients_out)
        sys.stderr.write(f"wrote {out}\n")
    else:
        sys.stdout.write(format_table(result) + "\n")
    if heatmap_dir is not None:
        sys.stderr.write(f"heatmaps in {heatmap_dir}\n")
    done = sum(1 for r in result.images if r.status == "done")
    return 0 if done else 1
