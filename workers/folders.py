"""Folder jobs: the plain function behind ``jobs.expand_folder`` (and the file walk of
``drscreen score``).

``expand_folder(job_id)`` turns a folder on the server into job items and images, then fans the
images out to ``scoring.score_images`` in chunks: a task per chunk lets one ``ensemble.predict``
cover many photographs (far faster than a task per photograph) while still spreading a large folder
over every worker.

Safety: the folder is re-checked against ``DRSCREEN_IMPORT_ROOTS`` when the job runs (the API
checked it when the job was created, but links can change in between), and every file's real path
(symlinks resolved) must lie under an import root too: checked first, for every item and for
``manifest.csv``, before anything stats or reads the target, so links out of the roots all get one
error whatever they point at (nothing to learn about files outside). Only regular files are ever
opened (a FIFO, socket or device would block the worker or have side effects on open), with
``O_NONBLOCK`` and a check of the opened descriptor, and a photograph is checked against the roots
again when it is read (a link swapped after planning). ``manifest.csv`` is capped at
:data:`MAX_MANIFEST_BYTES`.

Idempotency: items are unique on (job, path) and inserted with ON CONFLICT DO NOTHING; only items
still ``pending`` are processed, in chunks committed one at a time, and the store is content
addressed. A redelivered or interrupted expansion therefore continues where it stopped and
re-sends the images still queued (scoring is idempotent too).

Erasure (core.retention): the files of a patient of the clinic erased after the job was accepted
are left out (found by the sha256 of the patient id the erasure's audit row keeps), whether the
job was not read yet when the erasure came or its expansion is resumed after it: the folder
still holds them, and storing them again would bring the erased patient back.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import BinaryIO, TypeVar

from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy import select
from sqlalchemy.orm import Session

from core import repository as repo
from core import retention, tasks
from core.db import session_scope
from core.schemas import PATIENT_ID_PATTERN
from core.settings import get_settings
from core.store import FileStore, get_store
from core.tables import Image, ScoringJob, ScoringJobItem, utcnow
from ml.imageio import SUPPORTED_FORMATS, sniff_format, unsupported_message
from workers.model import serving_ref
from workers.naming import MANIFEST_NAME, ManifestError, ManifestRow, match_name, parse_manifest
from workers.scoring import Enqueue, send_by_name
from workers.settings import get_worker_settings

log = logging.getLogger(__name__)
T = TypeVar("T")

_EXT = {"jpeg": "jpg", "png": "png", "tiff": "tif", "bmp": "bmp", "webp": "webp"}
_CONTENT_TYPES = {"jpeg": "image/jpeg", "png": "image/png", "tiff": "image/tiff", "bmp": "image/bmp"}

#: Largest ``manifest.csv`` read (about 150,000 rows of typical length); larger ones fail the job.
MAX_MANIFEST_BYTES = 8 * 1024 * 1024

#: The one error of every item whose real path (links resolved) is not under an import root,
#: whatever the link points at: a missing file, a text file, a photograph, a device.
LINK_OUTSIDE = "links outside the import roots; refused"

_CANNOT_TELL = (
    "cannot tell patient and eye from the file name "
    "(expected <patient>_<left|right> or <patient>_<l|r><n>, or a manifest.csv)"
)

# O_NONBLOCK: opening a FIFO does not wait for a writer (the S_ISREG checks refuse it anyway;
# this covers one swapped in between). O_NOCTTY: a terminal device never becomes ours.
_OPEN_FLAGS = (
    os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
)


#: Files one folder job may hold (a clinic's export is a few thousand; ~20 per minute per CPU
#: worker, so this is days of scoring).
MAX_JOB_FILES = 100_000


class FolderRefused(ValueError):
    """The job folder is missing, not a folder, or outside the import roots."""


@dataclass(frozen=True)
class PlannedFile:
    """One file of the folder and what it was matched to (or why it cannot be used)."""

    path: str  # relative to the job folder, POSIX separators (the item's key)
    patient_id: str | None
    eye: str | None
    error: str | None = None


def _under(path: Path, roots: Sequence[Path]) -> bool:
    return any(path == root or path.is_relative_to(root) for root in roots)


def check_folder(folder: str | os.PathLike[str], roots: Sequence[Path]) -> Path:
    """The folder's real path, when it is a folder under one of ``roots``; else FolderRefused."""
    if not roots:
        raise FolderRefused("no import roots are configured (DRSCREEN_IMPORT_ROOTS)")
    real = Path(folder).expanduser().resolve()
    if not _under(real, [r.resolve() for r in roots]):
        raise FolderRefused(f"{folder} is not under the import roots")
    if not real.is_dir():
        raise FolderRefused(f"{folder} is not a folder")
    return real


def _walk(folder: Path, limit: int | None = None) -> list[str]:
    """Relative POSIX paths of the regular files and file links under ``folder`` (hidden ones
    skipped, sorted). Linked folders are not entered, so a link cannot pull in a whole tree.
    More than ``limit`` files: :class:`FolderRefused` (one job was a whole file server's listing
    in memory and one transaction; the security review)."""
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        base = Path(dirpath)
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            found.append((base / name).relative_to(folder).as_posix())
            if limit is not None and len(found) > limit:
                raise FolderRefused(f"the folder holds more than {limit} files: split it into smaller ones")
    return found


def plan_folder(folder: Path, roots: Sequence[Path] | None) -> list[PlannedFile]:
    """Match every file of ``folder`` to a patient and eye (manifest first, else file names).

    ``roots``: real paths every file must resolve under (None = no check, for the local CLI).
    Each item is checked against the roots first (:data:`LINK_OUTSIDE`), then must be a regular
    file; only then may its first bytes be read. Raises :class:`ManifestError` for a manifest that
    cannot be used at all (outside the roots, not a regular file, too large, not CSV).
    """
    real_roots = None if roots is None else [r.resolve() for r in roots]
    files = _walk(folder, None if roots is None else MAX_JOB_FILES)  # the local CLI: any size
    manifest = _read_manifest(folder, real_roots)
    planned: list[PlannedFile] = []
    if manifest is not None:
        rows = parse_manifest(manifest)
        listed: dict[str, int] = {}  # a file's key -> its place in ``planned``
        for row in rows:
            if not row.image:
                planned.append(PlannedFile(manifest_row_key(row.line), row.patient_id, row.eye, row.error))
                continue
            rel = PurePosixPath(row.image.replace("\\", "/"))
            if rel.is_absolute() or ".." in rel.parts:
                planned.append(PlannedFile(row.image, None, None, "manifest path leaves the job folder"))
                continue
            key = rel.as_posix()
            if key in listed:
                _listed_again(planned, listed[key], row)
                continue
            listed[key] = len(planned)
            where = _locate(folder, key, real_roots)
            if isinstance(where, str):
                planned.append(PlannedFile(key, row.patient_id, row.eye, where))
            else:
                planned.append(
                    PlannedFile(key, row.patient_id, row.eye, row.error or _not_a_regular_file(where))
                )
        for rel_name in files:
            if rel_name != MANIFEST_NAME and rel_name not in listed:
                where = _locate(folder, rel_name, real_roots)
                error = where if isinstance(where, str) else "not listed in manifest.csv"
                planned.append(PlannedFile(rel_name, None, None, error))
    else:
        for rel_name in files:
            m = match_name(rel_name)
            where = _locate(folder, rel_name, real_roots)
            if isinstance(where, str):
                planned.append(
                    PlannedFile(rel_name, m.patient_id if m else None, m.eye if m else None, where)
                )
            elif m is None:
                # Say what the file is before complaining about its name.
                why = _not_a_photo(where, real_roots) or _CANNOT_TELL
                planned.append(PlannedFile(rel_name, None, None, why))
            else:
                planned.append(PlannedFile(rel_name, m.patient_id, m.eye, _not_a_regular_file(where)))
    if roots is not None:  # the service (the local CLI scores any name, as its own patient)
        planned = [_check_patient_id(p) for p in planned]
    return planned


def _listed_again(planned: list[PlannedFile], first: int, row: ManifestRow) -> None:
    """A file the manifest lists again. For the same patient and eye the row adds nothing; for
    another, nothing says which is right: the file is scored for neither, and the other row is a
    failed item of its own, so its patient is not silently missing from the job."""
    earlier = planned[first]
    if (earlier.patient_id, earlier.eye) == (row.patient_id, row.eye):
        return
    conflict = (
        f"manifest.csv lists this file more than once: for {_whose(earlier.patient_id, earlier.eye)} "
        f"and, on line {row.line}, for {_whose(row.patient_id, row.eye)}"
    )
    planned[first] = replace(earlier, error=earlier.error or conflict)
    planned.append(PlannedFile(manifest_row_key(row.line, earlier.path), row.patient_id, row.eye, conflict))


def _whose(patient_id: str | None, eye: str | None) -> str:
    return f"patient {patient_id or '(none)'}, eye {eye or '(none)'}"


def manifest_row_key(line: int, path: str = "") -> str:
    """The item key of a manifest row that is not a file of its own (no file name, or a file listed
    again). Under ``manifest.csv/``, which no file of the folder can be: the manifest is a file."""
    return f"{MANIFEST_NAME}/line {line}" + (f": {path}" if path else "")


def _inside(path: Path, roots: Sequence[Path]) -> Path | None:
    """``path``'s real path when it lies under one of ``roots`` (real paths), else None. Only
    links are read (``readlink``); nothing is stat'ed or opened at the target."""
    try:
        real = path.resolve()
    except (OSError, RuntimeError):  # a link loop: no answer about the target either
        return None
    return real if _under(real, roots) else None


def _locate(folder: Path, rel: str, roots: Sequence[Path] | None) -> Path | str:
    """The path to open for ``rel`` (its real path, when ``roots`` are given) or
    :data:`LINK_OUTSIDE`."""
    if roots is None:
        return folder / rel
    return _inside(folder / rel, roots) or LINK_OUTSIDE


def _cannot_read(exc: OSError) -> str:
    if isinstance(exc, FileNotFoundError):
        return "file not found"
    return f"cannot read the file: {exc.strerror or exc}"


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "a special file"


def _mode_problem(mode: int) -> str | None:
    if stat.S_ISREG(mode):
        return None
    return f"not_a_file: the path is {_kind(mode)}, not a regular file; not read"


def _not_a_regular_file(path: Path) -> str | None:
    """Why ``path`` (links followed) is not a regular file to read, or None. Stats only."""
    try:
        return _mode_problem(os.stat(path).st_mode)
    except OSError as exc:
        return _cannot_read(exc)


def _opened_outside(fd: int, roots: Sequence[Path]) -> bool:
    """Whether the file behind ``fd`` lies outside ``roots`` (real paths). The path was checked
    before opening, but a folder on it may have been swapped for a link in between: the security
    review read another clinic's photographs that way (a rename loop beside a folder job). The
    descriptor's own path (Linux ``/proc``) is what was opened; without ``/proc`` the earlier check
    stands alone."""
    try:
        opened = Path(os.readlink(f"/proc/self/fd/{fd}"))
    except OSError:
        return False
    return not _under(opened, roots)


def _open_regular(path: Path, roots: Sequence[Path] | None = None) -> tuple[BinaryIO, int] | str:
    """``path`` opened for reading, with its size, when it is a regular file; else why not.
    ``roots`` (real paths): what was opened must lie under one of them (:data:`LINK_OUTSIDE`).

    Never blocks: the type is checked before opening (a FIFO, socket or device is not opened at
    all), the open is non-blocking and the opened descriptor is checked again (a file swapped
    for a FIFO in between)."""
    if (problem := _not_a_regular_file(path)) is not None:
        return problem
    try:
        # O_NOFOLLOW: ``path`` is a real path when roots are given; a link now is a swap
        fd = os.open(path, _OPEN_FLAGS | (getattr(os, "O_NOFOLLOW", 0) if roots is not None else 0))
    except OSError as exc:
        if roots is not None and exc.errno == errno.ELOOP:
            return LINK_OUTSIDE
        return _cannot_read(exc)
    try:
        if roots is not None and _opened_outside(fd, roots):
            os.close(fd)
            return LINK_OUTSIDE
        info = os.fstat(fd)
        if (problem := _mode_problem(info.st_mode)) is not None:
            os.close(fd)
            return problem
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb"), info.st_size
    except BaseException:
        os.close(fd)
        raise


def _read_manifest(folder: Path, roots: Sequence[Path] | None) -> bytes | None:
    """The bytes of the folder's ``manifest.csv``; None when there is none (or it is a folder).

    Raises ManifestError when it leads outside the roots, is not a regular file or is larger
    than :data:`MAX_MANIFEST_BYTES`: the job fails rather than silently falling back to names."""
    path = folder / MANIFEST_NAME
    if not os.path.lexists(path):
        return None
    where = _locate(folder, MANIFEST_NAME, roots)
    if isinstance(where, str):
        raise ManifestError(f"{MANIFEST_NAME} {where}")
    try:
        if stat.S_ISDIR(os.stat(where).st_mode):
            return None  # a folder that happens to be called manifest.csv (walked like others)
    except OSError:
        pass  # reported below
    opened = _open_regular(where, roots)
    if isinstance(opened, str):
        raise ManifestError(f"{MANIFEST_NAME} cannot be used: {opened}")
    fh, size = opened
    with fh:
        data = b"" if size > MAX_MANIFEST_BYTES else fh.read(MAX_MANIFEST_BYTES + 1)
    if size > MAX_MANIFEST_BYTES or len(data) > MAX_MANIFEST_BYTES:
        raise ManifestError(
            f"{MANIFEST_NAME} is too large ({max(size, len(data))} bytes; "
            f"limit {MAX_MANIFEST_BYTES // (1024 * 1024)} MiB): split the folder"
        )
    return data


def _check_patient_id(p: PlannedFile) -> PlannedFile:
    """The upload rule for patient ids holds for folder jobs too (the id appears in URLs). A row
    failed already keeps its reason and loses an id that breaks the rule (one over the column's 128
    characters stopped the whole job on PostgreSQL)."""
    if p.patient_id is None or re.fullmatch(PATIENT_ID_PATTERN, p.patient_id):
        return p
    if p.error is not None:
        return replace(p, patient_id=None)
    return PlannedFile(
        p.path,
        None,
        None,
        f"patient id {p.patient_id[:40]!r} is not 1-128 letters, digits, '.', '_' or '-' "
        "(starting with a letter or digit)",
    )


def _not_a_photo(path: Path, roots: Sequence[Path] | None) -> str | None:
    """Why the file is not an accepted photograph (not a regular file, or by its signature), or
    None (reads 32 bytes of a regular file; nothing else is opened)."""
    opened = _open_regular(path, roots)
    if isinstance(opened, str):
        return opened
    fh, _ = opened
    try:
        with fh:
            head = fh.read(32)
    except OSError as exc:
        return _cannot_read(exc)
    fmt = sniff_format(head) if head else None
    if not head:
        return "empty: the file is empty"
    if fmt is None:
        return "not_an_image: the file is not a recognised image format"
    if fmt not in SUPPORTED_FORMATS:
        return f"unsupported_format: {unsupported_message(fmt)}"
    return None


@dataclass(frozen=True)
class LoadedFile:
    data: bytes
    fmt: str


def read_photo(path: Path, max_bytes: int, roots: Sequence[Path] | None = None) -> LoadedFile | str:
    """The file's bytes and sniffed format, or the reason it cannot be a photograph. Only the
    signature is checked here; the full decode (truncation, corruption) happens when scoring.

    ``roots`` (real paths): the file must still resolve under one of them (a link may have been
    swapped since the folder was planned). Only a regular file is opened, never blocking."""
    if roots is not None:
        real = _inside(path, roots)
        if real is None:
            return LINK_OUTSIDE
        path = real
    opened = _open_regular(path, roots)
    if isinstance(opened, str):
        return opened
    fh, size = opened
    try:
        with fh:
            if size > max_bytes:
                return f"file too large ({size} bytes; limit {max_bytes})"
            data = fh.read(max_bytes + 1)
    except OSError as exc:
        return _cannot_read(exc)
    if len(data) > max_bytes:  # grew after it was stat'ed
        return f"file too large (more than {max_bytes} bytes; limit {max_bytes})"
    if not data:
        return "empty: the file is empty"
    fmt = sniff_format(data)
    if fmt is None:
        return "not_an_image: the file is not a recognised image format"
    if fmt not in SUPPORTED_FORMATS:
        return f"unsupported_format: {unsupported_message(fmt)}"
    return LoadedFile(data, fmt)


def _existing_image(session: Session, clinic_id: int, patient_id: int, eye: str, sha256: str) -> Image | None:
    """The clinic's image with the same bytes for the same patient and eye (dedupe: a photograph
    submitted twice is scored once and counts once in the eye's mean)."""
    return session.scalars(
        select(Image)
        .where(
            Image.clinic_id == clinic_id,
            Image.patient_id == patient_id,
            Image.eye == eye,
            Image.sha256 == sha256,
            Image.status != "failed",
        )
        .order_by(Image.created_at)
        .limit(1)
    ).first()


def ingest_item(
    session: Session,
    *,
    clinic_id: int,
    job_id: str | None,
    folder: Path,
    item: ScoringJobItem,
    store: FileStore,
    max_bytes: int,
    model_ref: str,
    roots: Sequence[Path] | None = None,
) -> str | None:
    """Store one pending item's file and link it to an image (new or an identical existing one,
    queued again when ``model_ref`` has not scored it yet). Returns the image id, or None when the
    item failed (its error recorded). ``roots``: see :func:`read_photo` (None for the local CLI)."""
    if item.patient_external_id is None or item.eye is None:
        repo.set_job_item(session, item, status="failed", error=item.error or "no patient or eye")
        return None
    loaded = read_photo(folder / item.path, max_bytes, roots)
    if isinstance(loaded, str):
        repo.set_job_item(session, item, status="failed", error=loaded)
        return None
    stored = store.put_bytes(loaded.data, _EXT[loaded.fmt])
    patient = repo.get_or_create_patient(session, clinic_id, item.patient_external_id)
    image = _existing_image(session, clinic_id, patient.id, item.eye, stored.sha256)
    if image is None:
        image = repo.create_image(
            session,
            clinic_id=clinic_id,
            patient_id=patient.id,
            eye=item.eye,
            sha256=stored.sha256,
            stored_path=stored.relpath,
            size_bytes=stored.size_bytes,
            filename=PurePosixPath(item.path).name[:255],
            content_type=_CONTENT_TYPES.get(loaded.fmt),
            job_id=job_id,
        )
    else:
        # sent again today: the purge's clock restarts (the visit stays the first upload's)
        image.sent_at = utcnow()
        if repo.needs_rescoring(session, image, model_ref):
            # scored, but by an earlier release: without this a clinic re-submitting the photograph
            # would get the earlier release's grade back (that prediction stays, kept per version)
            repo.requeue_image(session, image)
    status = "done" if image.status == "done" else "queued"
    repo.set_job_item(session, item, status=status, image_id=image.id)
    return image.id


@dataclass
class ExpandSummary:
    items: int = 0
    failed_items: int = 0
    sent: list[list[str]] = field(default_factory=list)  # the score_images chunks published
    error: str | None = None


def _store_missing_again(
    db_url: str | None,
    store: FileStore,
    folder: Path,
    roots: Sequence[Path] | None,
    max_bytes: int,
    ingested: dict[str, str],
) -> None:
    """Once a chunk's rows are committed, store again the photographs whose files are not there:
    bytes stored before (another patient's or clinic's) were not written by this job, and an
    erasure of theirs may have removed them before the rows were committed
    (core.retention.remove_unreferenced_files)."""
    if not ingested:
        return
    with session_scope(db_url) as session:
        rows = session.execute(
            select(Image.id, Image.stored_path).where(Image.id.in_(list(ingested.values())))
        )
        paths = {image_id: relpath for image_id, relpath in rows}
    for item_path, image_id in ingested.items():
        relpath = paths.get(image_id)
        if relpath is None or store.exists(relpath):
            continue
        loaded = read_photo(folder / item_path, max_bytes, roots)
        if isinstance(loaded, LoadedFile):
            store.put_bytes(loaded.data, _EXT[loaded.fmt])


def _fail_job(db_url: str | None, job_id: str, error: str) -> None:
    with session_scope(db_url) as session:
        job = session.get(ScoringJob, job_id)
        if job is not None:
            job.status = "failed"
            job.error = error[:4000]
            job.finished_at = utcnow()


def _failed(summary: ExpandSummary, db_url: str | None, job_id: str, error: str) -> ExpandSummary:
    """The job failed with ``error``: recorded on the job and in the summary returned."""
    _fail_job(db_url, job_id, error)
    summary.error = error
    return summary


def _chunks(ids: Sequence[T], size: int) -> Iterable[list[T]]:
    for start in range(0, len(ids), size):
        yield list(ids[start : start + size])


def expand_folder(
    job_id: str,
    *,
    explain: bool = False,
    db_url: str | None = None,
    store: FileStore | None = None,
    enqueue: Enqueue | None = None,
    chunk: int | None = None,
    model_ref: str | None = None,
) -> ExpandSummary:
    """Expand a folder job into items and images and enqueue their scoring (see module doc).

    ``explain``: draw heatmaps for this job's gradable photographs (a job option; off by default
    because a folder can hold thousands of photographs). ``model_ref``: the release scoring them
    (default: the one this worker serves); photographs it has not scored yet are queued.
    """
    settings = get_settings()
    store = store if store is not None else get_store()
    send = enqueue if enqueue is not None else send_by_name
    size = chunk or get_worker_settings().score_chunk
    summary = ExpandSummary()

    with session_scope(db_url) as session:
        job = repo.get_job(session, job_id)
        if job is None:
            log.warning("expand_folder: job %s does not exist", job_id)
            summary.error = "job not found"
            return summary
        if job.status == "failed":
            summary.error = job.error
            return summary
        clinic_id, folder_text, accepted_at = job.clinic_id, job.folder, job.created_at
        roots = repo.import_roots_of(session, clinic_id, settings)  # re-checked: settings or links may change
    try:
        folder = check_folder(folder_text, roots)
        plan = plan_folder(folder, roots)
    except (FolderRefused, ManifestError) as exc:
        log.warning("expand_folder: job %s refused: %s", job_id, exc)
        return _failed(summary, db_url, job_id, str(exc))
    except SoftTimeLimitExceeded:
        # The task's soft time limit (core.celery_config) hit before a single item was saved: a
        # re-sent expansion would only plan again and be stopped again, so the job fails instead.
        # Past this point a stopped expansion keeps the chunks it committed and the sweep resumes it.
        error = "listing the folder took longer than the folder-job time limit; split it into smaller folders"
        log.error("expand_folder: job %s: %s", job_id, error)
        return _failed(summary, db_url, job_id, error)
    if not plan:
        return _failed(summary, db_url, job_id, "the folder holds no files")

    with session_scope(db_url) as session:
        try:
            erased = retention.erased_patients(session, clinic_id, accepted_at, store.root)
        except retention.ErasureKeyMismatch as exc:
            session.rollback()
            return _failed(summary, db_url, job_id, str(exc))
        plan = [p for p in plan if not erased.named(p.patient_id)]
        if not plan:
            session.rollback()
            error = "every file of the folder names a patient erased since the job was sent"
            return _failed(summary, db_url, job_id, error)
        repo.add_job_items(
            session,
            job_id,
            [repo.JobItemSpec(path=p.path[:1024], patient_external_id=p.patient_id, eye=p.eye) for p in plan],
        )
        errors = {p.path[:1024]: p.error for p in plan if p.error}
        pending = repo.job_items(session, job_id, status="pending")
        for item in pending:
            if item.path in errors:
                repo.set_job_item(session, item, status="failed", error=errors[item.path])
        pending_ids = [item.id for item in pending if item.path not in errors]
        repo.refresh_job_counts(session, job_id)

    model_ref = model_ref or serving_ref(settings)
    # Chunks commit one at a time so scoring starts while the rest of a large folder is read.
    sent: set[str] = set()
    for id_chunk in _chunks(pending_ids, size):
        ingested: dict[str, str] = {}
        with session_scope(db_url) as session:
            image_ids: list[str] = []
            # an erasure after the items were written sees them pending and waits for them (or
            # was forced); one committed before is read here
            try:
                erased = retention.erased_patients(session, clinic_id, accepted_at, store.root)
            except retention.ErasureKeyMismatch as exc:  # fail closed: the patient is not knowable
                session.rollback()
                return _failed(summary, db_url, job_id, str(exc))
            for item_id in id_chunk:
                # Row lock (PostgreSQL): a second expansion of the same job (a redelivery, or
                # one the sweep re-sent) waits here and then sees the item is no longer
                # pending, instead of storing the same file as a second image.
                row = session.get(ScoringJobItem, item_id, with_for_update=True)
                if row is None or row.status != "pending":
                    continue
                if erased.named(row.patient_external_id):
                    session.delete(row)  # neither read nor named
                    continue
                image_id = ingest_item(
                    session,
                    clinic_id=clinic_id,
                    job_id=job_id,
                    folder=folder,
                    item=row,
                    store=store,
                    max_bytes=settings.max_upload_bytes,
                    model_ref=model_ref,
                    roots=roots,
                )
                if image_id is not None:
                    ingested[row.path] = image_id
                if image_id is not None and row.status == "queued":
                    image_ids.append(image_id)
            repo.refresh_job_counts(session, job_id)
        _store_missing_again(db_url, store, folder, roots, settings.max_upload_bytes, ingested)
        new_ids = [i for i in dict.fromkeys(image_ids) if i not in sent]
        if new_ids:
            send(tasks.SCORE_IMAGES, [new_ids], {"explain": explain})
            summary.sent.append(new_ids)
            sent.update(new_ids)

    # Images of this job still waiting (a redelivered expansion, or photos shared with another
    # job): publish them again; scoring skips whatever is done by the time the message arrives.
    with session_scope(db_url) as session:
        leftovers = [
            i
            for i in session.scalars(
                select(Image.id)
                .join(ScoringJobItem, ScoringJobItem.image_id == Image.id)
                .where(ScoringJobItem.job_id == job_id, Image.status == "queued")
                .order_by(ScoringJobItem.id)
            )
            if i not in sent
        ]
        job_row = repo.refresh_job_counts(session, job_id)
        summary.items, summary.failed_items = job_row.total, job_row.failed
    for leftover_chunk in _chunks(list(dict.fromkeys(leftovers)), size):
        send(tasks.SCORE_IMAGES, [leftover_chunk], {"explain": explain})
        summary.sent.append(leftover_chunk)
    log.info(
        "expand_folder: job %s: %d item(s), %d failed, %d scoring task(s)",
        job_id,
        summary.items,
        summary.failed_items,
        len(summary.sent),
    )
    return summary
