"""Erasure and retention: delete everything drscreen holds about patients, in one transaction.

- :func:`erase_patient`: one patient of one clinic (``drscreen data erase``,
  ``DELETE /v1/patients/{id}``).
- :func:`purge_before`: the retention period (``drscreen data purge``). The rule is per patient:
  a patient whose *newest* photograph was uploaded before the cutoff (or who has no photograph
  and was created before it) is erased whole; a patient with a newer photograph keeps everything,
  older photographs included. Nothing is recomputed: a result (which combines photographs of
  different ages) never outlives, or is rebuilt without, the photographs it was computed from.
- :func:`remove_unreferenced_files`: after the commit, the stored photographs and heatmaps that
  no remaining row references. The store is content addressed (core.store): identical bytes are
  one file, shared by every row that uploaded them, of any patient or clinic.

Erasing a patient deletes their photographs (``image``) with their predictions, heatmaps
(``explanation``), the folder-job items that point at them or name the patient, the
``Idempotency-Key`` records of their uploads, their eye and patient results, bundles and the
patient row; a folder job left with no item is deleted, the others are recounted.
``audit_event`` rows are kept (clinic, key and random ids, no patient data); their link to the
erased patient is cleared, and the erasure itself is audited (counts, and a keyed digest of the
patient id, ``HMAC(deployment key, sha256(id))`` (core.deployment_key): never the id, a
photograph, or a digest that a copy of the database alone could reverse).

Like core.repository, these functions take the caller's Session and never commit. A photograph
still ``queued`` or ``running`` (or a folder-job file not read yet) makes an erasure refuse
(:class:`core.errors.Conflict`) unless forced, and keeps a purge away from that patient: a worker
writing into rows being deleted would be racing the erasure.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import ColumnElement, and_, delete, exists, func, or_, select, union, update
from sqlalchemy.orm import Session, aliased

from core import deployment_key, ledger
from core import repository as repo
from core.errors import Conflict, Unavailable
from core.settings import get_settings
from core.store import FileStore
from core.tables import (
    AuditEvent,
    Bundle,
    Clinic,
    Explanation,
    EyeResult,
    GraderGrade,
    IdempotencyKey,
    Image,
    Patient,
    PatientResult,
    Prediction,
    ScoringJob,
    ScoringJobItem,
)

log = logging.getLogger(__name__)

#: Every table an erasure deletes from, in the order its rows go (children first).
TABLES = (
    "explanation",
    "prediction",
    "scoring_job_item",
    "idempotency_key",
    "eye_result",
    "patient_result",
    "grader_grade",
    "image",
    "bundle",
    "patient",
    "scoring_job",
)
#: The audit actions of an erasure and of a purge (:func:`erased_since` looks for them).
ERASE_ACTION, PURGE_ACTION = ledger.ERASE_ACTION, "data.purge"
IN_FLIGHT_IMAGES = ("queued", "running")
IN_FLIGHT_ITEMS = ("pending", "queued")
OPEN_JOBS = repo.OPEN_JOB_STATES
FINISHED_JOBS = ("done", "failed")
#: Patients (and stored paths) per statement: keeps IN lists far below SQLite's variable limit.
CHUNK = 500


@dataclass
class Outcome:
    """What an erasure or purge deleted (a dry run rolls the transaction back instead of
    committing: the counts are the real run's)."""

    rows: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TABLES, 0))
    #: store paths no remaining row references: for :func:`remove_unreferenced_files` after the commit
    files: list[str] = field(default_factory=list)
    found: bool = True  # erase: the clinic has this patient
    in_flight: int = 0  # erase: photographs and folder-job files of the patient still being scored
    skipped_patients: int = 0  # purge: patients left alone because something of theirs is in flight

    @property
    def total_rows(self) -> int:
        return sum(self.rows.values())


def _chunks(items: Sequence[Any], size: int = CHUNK) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _rowcount(result: Any) -> int:
    return int(getattr(result, "rowcount", 0) or 0)


def _remove(session: Session, model: Any, where: ColumnElement[bool]) -> int:
    stmt = delete(model).where(where).execution_options(synchronize_session=False)
    return _rowcount(session.execute(stmt))


# ------------------------------------------------------------------------------------- locking


def _lock_database(session: Session) -> None:
    """SQLite: take the database's write lock now (a write that matches nothing), so nothing read
    next can change before the commit; its driver would only begin the transaction at the first
    DELETE. PostgreSQL locks rows instead (:func:`_lock_patients`)."""
    if session.get_bind().dialect.name == "sqlite":
        noop = update(Patient).where(Patient.id == -1).values(external_id=Patient.external_id)
        session.execute(noop.execution_options(synchronize_session=False))


def _lock_patients(session: Session, patient_ids: Sequence[int]) -> list[int]:
    """Lock the patients' photographs, then the patients (PostgreSQL; SQLite is locked whole).
    Photographs first and in id order, as workers lock them when they write, then the patients
    (a worker's write locks its patients after its photographs too, ``FOR NO KEY UPDATE``): an
    erasure and a worker wait for each other instead of deadlocking. The patient's lock holds
    off new uploads for them until the commit.
    Returns the ids still there."""
    session.execute(
        select(Image.id).where(Image.patient_id.in_(patient_ids)).order_by(Image.id).with_for_update()
    ).all()
    return list(
        session.scalars(
            select(Patient.id).where(Patient.id.in_(patient_ids)).order_by(Patient.id).with_for_update()
        )
    )


def lock_image(session: Session, image_id: str) -> bool:
    """For a worker about to write a row about ``image_id``: True when the image still exists,
    locked until this transaction ends so that an erasure waits for the write (and then deletes
    it too); False when an erasure has already deleted it."""
    _lock_database(session)
    found = session.scalar(select(Image.id).where(Image.id == image_id).with_for_update())
    return found is not None


# ------------------------------------------------------------------------------------- queries


def _images_of(patient_ids: Sequence[int]) -> Any:
    return select(Image.id).where(Image.patient_id.in_(patient_ids))


def _items_of(patient_ids: Sequence[int]) -> ColumnElement[bool]:
    """The folder-job items of the patients (a WHERE on ``scoring_job_item``): those pointing at
    one of their photographs, and those of their clinics' jobs naming one of them (a file that
    failed has no photograph, but its item still carries the patient id and path).

    Two indexed lookups whose item ids are united: the photographs' items by
    ``ix_scoring_job_item_image_id``, the named ones from the patients' (clinic, id) rows by
    ``ix_scoring_job_item_patient_external_id_job_id``, each job's clinic checked by its key.
    Written as ``image_id IN (...) OR EXISTS (the job's clinic names them)``, it read every item
    of every job and ran the correlated query once per item, twice per erasure or chunk of a
    purge (the scale review: 1.3 s a look at 120,000 items, 2.4 s an erasure, a minute a
    purge's dry run); joined to the patient table inside that correlated query instead, SQLite
    tried every patient of a chunk for every item naming an existing patient."""
    item = aliased(ScoringJobItem)
    by_photograph = select(item.id).where(item.image_id.in_(_images_of(patient_ids)))
    by_name = (
        select(item.id)
        .join(Patient, Patient.external_id == item.patient_external_id)
        .join(ScoringJob, and_(ScoringJob.id == item.job_id, ScoringJob.clinic_id == Patient.clinic_id))
        .where(Patient.id.in_(patient_ids))
    )
    return ScoringJobItem.id.in_(union(by_photograph, by_name))


def _in_flight(session: Session, patient_ids: Sequence[int]) -> Counter[int]:
    """Patient id -> their photographs still ``queued``/``running``, plus the files naming them
    that an open folder job has not stored yet."""
    counts: Counter[int] = Counter()
    images = (
        select(Image.patient_id, func.count())
        .where(Image.patient_id.in_(patient_ids), Image.status.in_(IN_FLIGHT_IMAGES))
        .group_by(Image.patient_id)
    )
    items = (
        select(Patient.id, func.count())
        .join(ScoringJob, ScoringJob.clinic_id == Patient.clinic_id)
        .join(
            ScoringJobItem,
            and_(
                ScoringJobItem.job_id == ScoringJob.id,
                ScoringJobItem.patient_external_id == Patient.external_id,
            ),
        )
        .where(
            Patient.id.in_(patient_ids),
            ScoringJob.status.in_(OPEN_JOBS),
            ScoringJobItem.status.in_(IN_FLIGHT_ITEMS),
            ScoringJobItem.image_id.is_(None),  # the stored ones are counted as photographs
        )
        .group_by(Patient.id)
    )
    for stmt in (images, items):
        for patient_id, n in session.execute(stmt):
            counts[int(patient_id)] += int(n)
    return counts


def _referenced(session: Session, paths: Iterable[str], ignore: Sequence[int] = ()) -> set[str]:
    """The ``paths`` a photograph or heatmap row still references, not counting the rows of the
    patients ``ignore`` (being erased)."""
    found: set[str] = set()
    for chunk in _chunks(sorted(set(paths))):
        photos = select(Image.stored_path).where(Image.stored_path.in_(chunk))
        heatmaps = (
            select(Explanation.stored_path)
            .join(Image, Image.id == Explanation.image_id)
            .where(Explanation.stored_path.in_(chunk))
        )
        if ignore:
            photos = photos.where(Image.patient_id.not_in(ignore))
            heatmaps = heatmaps.where(Image.patient_id.not_in(ignore))
        found.update(session.scalars(photos), session.scalars(heatmaps))
    return found


def _files_left_over(session: Session, patient_ids: Sequence[int]) -> list[str]:
    """The stored files of these patients that no other patient's row shares."""
    paths = set(session.scalars(select(Image.stored_path).where(Image.patient_id.in_(patient_ids))))
    paths.update(
        session.scalars(
            select(Explanation.stored_path).where(Explanation.image_id.in_(_images_of(patient_ids)))
        )
    )
    return sorted(paths - _referenced(session, paths, ignore=patient_ids))


def _jobs_emptied(session: Session, items: ColumnElement[bool]) -> tuple[set[str], set[str]]:
    """(the folder jobs that lose items, those of them left with none). An unfinished job left
    with no item (a forced erasure) goes too: nothing would ever finish it, and the sweep
    re-sends the expansion of an unfinished job with no item, which read the folder again and
    brought the erased patient back."""
    losing: dict[str, int] = {
        job: n
        for job, n in session.execute(
            select(ScoringJobItem.job_id, func.count()).where(items).group_by(ScoringJobItem.job_id)
        )
    }
    if not losing:
        return set(), set()
    totals = session.execute(
        select(ScoringJob.id, ScoringJob.status, func.count(ScoringJobItem.id))
        .join(ScoringJobItem, ScoringJobItem.job_id == ScoringJob.id)
        .where(ScoringJob.id.in_(list(losing)))
        .group_by(ScoringJob.id, ScoringJob.status)
    )
    emptied = {job for job, _status, n in totals if n == losing[job]}
    return set(losing), emptied


def _settle_jobs(session: Session, touched: set[str], emptied: set[str]) -> None:
    """Delete the jobs left empty; recount the others (their totals included the items)."""
    for job_id in sorted(emptied):
        _remove(session, ScoringJob, ScoringJob.id == job_id)
    for job_id in sorted(touched - emptied):
        repo.refresh_job_counts(session, job_id)


# ------------------------------------------------------------------------------------- erasing


def _steps(patient_ids: Sequence[int]) -> list[tuple[str, Any, ColumnElement[bool]]]:
    """(table, model, rows of these patients), children first."""
    images = _images_of(patient_ids)
    bundles = select(Bundle.id).where(Bundle.patient_id.in_(patient_ids))
    return [
        ("explanation", Explanation, Explanation.image_id.in_(images)),
        ("prediction", Prediction, Prediction.image_id.in_(images)),
        ("scoring_job_item", ScoringJobItem, _items_of(patient_ids)),
        (
            "idempotency_key",
            IdempotencyKey,
            or_(
                and_(IdempotencyKey.kind == "image", IdempotencyKey.resource_id.in_(images)),
                and_(IdempotencyKey.kind == "bundle", IdempotencyKey.resource_id.in_(bundles)),
            ),
        ),
        ("eye_result", EyeResult, EyeResult.patient_id.in_(patient_ids)),
        ("patient_result", PatientResult, PatientResult.patient_id.in_(patient_ids)),
        ("grader_grade", GraderGrade, GraderGrade.image_id.in_(images)),
        ("image", Image, Image.patient_id.in_(patient_ids)),
        ("bundle", Bundle, Bundle.patient_id.in_(patient_ids)),
        ("patient", Patient, Patient.id.in_(patient_ids)),
    ]


def _erase_rows(session: Session, patient_ids: Sequence[int], out: Outcome) -> None:
    """Delete every row of these patients, counted into ``out``; their files go to ``out.files``.
    Explicit deletes, child tables first: the counts are exact and nothing depends on the foreign
    keys' ON DELETE actions."""
    if not patient_ids:
        return
    out.files.extend(_files_left_over(session, patient_ids))
    touched, emptied = _jobs_emptied(session, _items_of(patient_ids))
    # earlier reads and writes keep their audit rows; only the link to the patient goes
    session.execute(
        update(AuditEvent)
        .where(AuditEvent.patient_id.in_(patient_ids))
        .values(patient_id=None)
        .execution_options(synchronize_session=False)
    )
    for table, model, where in _steps(patient_ids):
        out.rows[table] += _remove(session, model, where)
    _settle_jobs(session, touched, emptied)
    out.rows["scoring_job"] += len(emptied)


def _audit(
    session: Session,
    action: str,
    out: Outcome,
    *,
    clinic_id: int | None,
    api_key_id: int | None,
    by: str,
    **extra: Any,
) -> None:
    detail = {"by": by, "rows": dict(out.rows), "files": len(out.files), **extra}
    repo.record_audit(
        session,
        action=action,
        clinic_id=clinic_id,
        api_key_id=api_key_id,
        target_type="patient" if action == ERASE_ACTION else "retention",
        detail=detail,
    )


def erase_patient(
    session: Session,
    clinic_id: int,
    external_id: str,
    *,
    force: bool = False,
    api_key_id: int | None = None,
    by: str = "cli",
    key: bytes | None = None,
    store_dir: Path | None = None,
    ledger_entry: str | None = None,
) -> Outcome:
    """Delete everything about the clinic's patient ``external_id`` (see the module docstring).

    ``found`` is False (and every count 0) when the clinic has no such patient: erasing twice is
    a no-op, and audits nothing. Raises Conflict while photographs of the patient are being
    scored, unless ``force`` (a worker then skips the rows that vanished). ``api_key_id`` / ``by``
    say who asked, in the audit row; ``store_dir`` is the deployment's store (default the
    configured one): its ledger records the erasure at the commit (core.ledger), and ``key``, its
    deployment key (default :func:`store_key`), keys the digest. ``ledger_entry``: the ledger
    line a restore's replay does again (its id goes in the audit row; no new line). The caller
    commits (or rolls back: a dry run), then passes ``files`` to :func:`remove_unreferenced_files`."""
    _lock_database(session)
    patient = repo.get_patient(session, clinic_id, external_id)
    ids = _lock_patients(session, [patient.id]) if patient is not None else []
    if not ids:  # no such patient (or erased by someone else meanwhile)
        return Outcome(found=False)
    out = Outcome(in_flight=sum(_in_flight(session, ids).values()))
    store_dir = store_dir if store_dir is not None else get_settings().store_path
    if ledger_entry is None:  # a new erasure: its line must land in the deployment's ledger
        ledger.check_store(session, store_dir)
    if key is None:
        try:
            key = store_key(store_dir)
        except (OSError, deployment_key.DeploymentKeyError) as exc:  # before anything is deleted
            raise Unavailable(f"the store's deployment key cannot be used: {exc}") from exc
    if out.in_flight and not force:
        raise Conflict(
            f"{out.in_flight} photograph(s) of this patient are still being scored; erase the "
            "patient once they are done"
        )
    _erase_rows(session, ids, out)
    digest, key_id = patient_digest(external_id, key), deployment_key.key_fingerprint(key)
    line = None
    if ledger_entry is None:  # a new erasure: a new line (a replay's is the line it does again)
        clinic = session.get(Clinic, clinic_id)
        line = ledger.erasure_entry(
            clinic_id=clinic_id,
            clinic=clinic.name if clinic else "",
            patient_hmac=digest,
            key_id=key_id,
        )
        ledger_entry = line.id
    _audit(
        session,
        ERASE_ACTION,
        out,
        clinic_id=clinic_id,
        api_key_id=api_key_id,
        by=by,
        **{DIGEST_FIELD: digest, KEY_ID_FIELD: key_id, LEDGER_FIELD: ledger_entry},
        forced=bool(out.in_flight),
    )
    if line is not None:
        ledger.record(session, store_dir, line)
    return out


# ------------------------------------------------------------------------------------- purging


def _purgeable(
    session: Session, cutoff: datetime, clinic_id: int | None, within: Sequence[int] | None = None
) -> list[int]:
    """Patients whose newest photograph was sent before ``cutoff`` (``Image.sent_at``: a folder
    job sending a photograph again restarts its clock) or who have none and were created before
    it; among ``within`` only, when given (whose photographs alone are read: not the whole image
    table once per chunk of a purge)."""
    latest = select(Image.patient_id, func.max(Image.sent_at).label("at")).group_by(Image.patient_id)
    if within is not None:
        latest = latest.where(Image.patient_id.in_(within))
    newest = latest.subquery()
    stmt = (
        select(Patient.id)
        .outerjoin(newest, newest.c.patient_id == Patient.id)
        .where(or_(newest.c.at < cutoff, and_(newest.c.at.is_(None), Patient.created_at < cutoff)))
        .order_by(Patient.id)
    )
    if clinic_id is not None:
        stmt = stmt.where(Patient.clinic_id == clinic_id)
    if within is not None:
        stmt = stmt.where(Patient.id.in_(within))
    return list(session.scalars(stmt))


def _old_leftovers(session: Session, cutoff: datetime, clinic_id: int | None, out: Outcome) -> None:
    """What no patient owns, from before the cutoff: the items of finished folder jobs that point
    at no photograph (files that failed; a patient's name may still be in the path), the finished
    jobs left with no item, and ``Idempotency-Key`` records (expired after a day anyway)."""
    old_jobs = and_(ScoringJob.created_at < cutoff, ScoringJob.status.in_(FINISHED_JOBS))
    keys = IdempotencyKey.created_at < cutoff
    if clinic_id is not None:
        old_jobs = and_(old_jobs, ScoringJob.clinic_id == clinic_id)
        keys = and_(keys, IdempotencyKey.clinic_id == clinic_id)
    # finished jobs that had no item to begin with (e.g. an empty folder); before the items go
    bare = and_(old_jobs, ~exists().where(ScoringJobItem.job_id == ScoringJob.id))
    out.rows["scoring_job"] += _remove(session, ScoringJob, bare)
    items = and_(
        ScoringJobItem.job_id.in_(select(ScoringJob.id).where(old_jobs)), ScoringJobItem.image_id.is_(None)
    )
    touched, emptied = _jobs_emptied(session, items)
    out.rows["scoring_job_item"] += _remove(session, ScoringJobItem, items)
    _settle_jobs(session, touched, emptied)
    out.rows["scoring_job"] += len(emptied)
    out.rows["idempotency_key"] += _remove(session, IdempotencyKey, keys)


def purge_before(
    session: Session, cutoff: datetime, clinic_id: int | None = None, *, by: str = "cli"
) -> Outcome:
    """Erase every patient (of ``clinic_id``, default every clinic) whose newest photograph was
    uploaded before ``cutoff`` (a naive datetime is taken as UTC), then what no patient owns from
    before it (:func:`_old_leftovers`). A patient with something still being scored is left alone
    and counted in ``skipped_patients``. Audited always: a purge that found nothing is still the
    record that the retention period was enforced. The caller commits (or rolls back: a dry
    run), then passes ``files`` to :func:`remove_unreferenced_files`."""
    cutoff = cutoff.replace(tzinfo=UTC) if cutoff.tzinfo is None else cutoff.astimezone(UTC)
    _lock_database(session)
    out = Outcome()
    for chunk in _chunks(_purgeable(session, cutoff, clinic_id)):
        # checked again once locked: a photograph may have arrived since the first look
        ids = _purgeable(session, cutoff, clinic_id, within=_lock_patients(session, chunk))
        busy = _in_flight(session, ids)
        out.skipped_patients += len(busy)
        _erase_rows(session, [i for i in ids if i not in busy], out)
    _old_leftovers(session, cutoff, clinic_id, out)
    _audit(
        session,
        PURGE_ACTION,
        out,
        clinic_id=clinic_id,
        api_key_id=None,
        by=by,
        cutoff=cutoff.isoformat(),
        skipped_patients=out.skipped_patients,
    )
    return out


def erased_since(session: Session, since: datetime) -> datetime | None:
    """When the newest erasure or purge recorded since ``since`` (any clinic) took place, or None.
    For a worker handed ids its database lacks: an erasure explains them. One query, newest audit
    row first (the primary key's order), so a recent erasure is found after the few rows audited
    since; with none, it reads the audit rows back to ``since``."""
    return session.scalar(
        select(AuditEvent.at)
        .where(AuditEvent.action.in_((ERASE_ACTION, PURGE_ACTION)), AuditEvent.at >= since)
        .order_by(AuditEvent.id.desc())
        .limit(1)
    )


# --------------------------------------------------------------------------------------- files


def remove_unreferenced_files(session: Session, store: FileStore, paths: Iterable[str]) -> int:
    """Delete the stored files among ``paths`` that no row references now; returns how many were
    removed. Call it after the erasure committed (a rolled-back erasure must find its files), in
    a new transaction: a row added meanwhile by another upload of the same bytes keeps its file.
    A file that cannot be removed is logged and left (its rows are gone already).

    A writer of the same bytes (an upload, a folder job, a heatmap) finds them stored, writes
    nothing, and commits its row a moment later, unseen by the first look. So the unreferenced
    files are first set aside (renamed: a writer from then on stores the bytes again), looked for
    once more, and put back when a row committed meanwhile names them; the writers check that
    their files are there once their rows are committed (a row committed after this second look
    finds its file set aside, and writes it again)."""
    wanted = sorted(set(paths))
    aside: dict[str, Path] = {}
    try:
        for chunk in _chunks(wanted):
            kept = _referenced(session, chunk)
            for path in chunk:
                if path in kept:
                    continue
                try:
                    moved = store.set_aside(path)
                except (OSError, ValueError) as exc:
                    log.error("erasure: stored file %s could not be removed: %s", path, exc)
                    continue
                if moved is not None:
                    aside[path] = moved
        # each statement reads what is committed by then (PostgreSQL's READ COMMITTED; SQLite
        # reads outside a transaction of its own after the caller's commit)
        claimed = _referenced(session, list(aside))
    except BaseException:  # the database went: every file back where it was, as if not looked at
        for path, moved in aside.items():
            store.put_back(moved, path)
        raise
    removed = 0
    for path, moved in aside.items():
        try:
            if path in claimed:
                store.put_back(moved, path)
            else:
                moved.unlink()
                removed += 1
        except OSError as exc:
            log.error("erasure: stored file %s could not be removed: %s", path, exc)
    return removed


class ErasureKeyMismatch(RuntimeError):
    """An erasure was recorded with another deployment key than this process's: this process
    cannot tell that patient's files (its store is not the deployment's)."""


@dataclass(frozen=True)
class ErasedPatients:
    """The patients of one clinic erased since some time, known by their keyed digests."""

    digests: frozenset[str] = frozenset()
    key: bytes = b""

    def named(self, external_id: str | None) -> bool:
        """Whether ``external_id`` is one of them."""
        if not self.digests or external_id is None:
            return False
        return patient_digest(external_id, self.key) in self.digests


def erased_patients(
    session: Session, clinic_id: int, since: datetime, store_dir: Path | None = None
) -> ErasedPatients:
    """The clinic's patients erased since ``since`` (their audit rows): for a folder job accepted
    before an erasure, whose folder still holds the patient's files (workers.folders leaves them
    out rather than record the patient again). ``store_dir``: whose deployment key (default the
    configured store's). Rows written before the key existed hold a plain sha256 (until a worker's
    start seals them, :func:`seal_audit_digests`) and are compared sealed. Raises
    :class:`ErasureKeyMismatch` for a row made with another key: failing closed, since the
    patient could not be recognised."""
    details = [
        d
        for d in session.scalars(
            select(AuditEvent.detail).where(
                AuditEvent.clinic_id == clinic_id, AuditEvent.at >= since, AuditEvent.action == ERASE_ACTION
            )
        )
        if isinstance(d, dict)
    ]
    if not details:
        return ErasedPatients()
    key = store_key(store_dir)
    own = deployment_key.key_fingerprint(key)
    found: set[str] = set()
    for detail in details:
        if detail.get(DIGEST_FIELD):
            if detail.get(KEY_ID_FIELD, own) != own:
                raise ErasureKeyMismatch(
                    "an erasure since this job was sent was recorded with another deployment key "
                    f"({detail[KEY_ID_FIELD]}, this worker's {own}): this worker's store folder is not "
                    "the deployment's (check DRSCREEN_STORE_DIR; drscreen status compares them)"
                )
            found.add(str(detail[DIGEST_FIELD]))
        elif detail.get(LEGACY_DIGEST_FIELD):
            found.add(deployment_key.seal(key, str(detail[LEGACY_DIGEST_FIELD])))
    return ErasedPatients(frozenset(found), key)


#: The audit detail's keyed digest, the fingerprint of the key that made it, and the unkeyed
#: digest written before the deployment key existed.
DIGEST_FIELD, KEY_ID_FIELD, LEGACY_DIGEST_FIELD = "patient_hmac", ledger.KEY_ID_FIELD, "patient_sha256"
#: The audit detail's restore-ledger line (core.ledger): the erasure is done in a database that
#: holds it.
LEDGER_FIELD = ledger.LEDGER_FIELD


def store_key(store_dir: Path | None = None) -> bytes:
    """The deployment key of ``store_dir``, default the configured store (created on first use)."""
    return deployment_key.deployment_key(store_dir if store_dir is not None else get_settings().store_path)


def patient_digest(external_id: str, key: bytes) -> str:
    """What the audit row of an erasure keeps of the patient id (keyed: see the module docstring)."""
    return deployment_key.keyed_digest(key, external_id.strip())


def seal_audit_digests(session: Session, key: bytes) -> int:
    """Replace the plain sha256 that older erasure audit rows hold by its keyed digest; returns how
    many rows changed. Idempotent (a sealed row has no plain digest left). Each worker's start
    runs it (workers.app: where the store, and so the key, is). The caller commits."""
    sealed = 0
    rows = session.scalars(select(AuditEvent).where(AuditEvent.action == ERASE_ACTION))
    for event in rows:
        detail = event.detail
        if not isinstance(detail, dict) or not detail.get(LEGACY_DIGEST_FIELD):
            continue
        updated = {k: v for k, v in detail.items() if k != LEGACY_DIGEST_FIELD}
        updated[DIGEST_FIELD] = deployment_key.seal(key, str(detail[LEGACY_DIGEST_FIELD]))
        updated[KEY_ID_FIELD] = deployment_key.key_fingerprint(key)
        event.detail = updated  # a new dict: the JSON column sees the change
        sealed += 1
    return sealed
