"""A small deployment to erase from, shared by the unit (SQLite) and integration (PostgreSQL)
retention tests: what belongs to the patient being erased is found here by queries of its own,
not by core.retention, so the tests can disagree with it.

North clinic's patient ``ERASE-1`` (the target) has a scored bundle, one photograph uploaded twice
(two rows, one stored file), a folder-job photograph, a failed folder-job file naming them, a job
of their photographs only, Idempotency-Key records and audit rows. North's ``KEEP-2`` shares one
photograph's bytes with the target (one stored file for both); South clinic has a patient with the
same id ``ERASE-1`` whose photograph is byte-identical to one of the target's, and a failed
folder-job file naming its own ``ERASE-1``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import select, update

from core import repository as repo
from core.db import get_engine, session_scope
from core.deployment_key import KEY_FILE
from core.ledger import LEDGER_FILE
from core.store import FileStore
from core.tables import (
    AuditEvent,
    Bundle,
    Explanation,
    EyeResult,
    IdempotencyKey,
    Image,
    Patient,
    PatientResult,
    Prediction,
    ScoringJob,
    ScoringJobItem,
    metadata,
    utcnow,
)
from tests.api_support import sample_bytes
from tests.unit.test_workers_scoring import Sent, StubEnsemble, add_images
from workers import scoring

NORTH, SOUTH = "North clinic", "South clinic"
TARGET, KEEP = "ERASE-1", "KEEP-2"


@dataclass
class World:
    url: str
    store: FileStore
    north: int
    south: int
    target: int  # North's ERASE-1 (patient row id)
    keep: int  # North's KEEP-2
    south_target: int  # South's ERASE-1
    job: str  # North's folder job: the target's and KEEP-2's photographs
    target_job: str  # North's finished job of the target's photographs only


def _patient_id(url: str, clinic: str, external_id: str) -> int:
    with session_scope(url) as s:
        c = repo.get_or_create_clinic(s, clinic)
        p = repo.get_patient(s, c.id, external_id)
        assert p is not None
        return p.id


def build(url: str, store: FileStore) -> World:
    a, b = sample_bytes("16", "left"), sample_bytes("16", "right")
    c, d = sample_bytes("178", "left"), sample_bytes("178", "right")
    e, f = sample_bytes("19", "left"), sample_bytes("19", "right")
    with session_scope(url) as s:
        north = repo.get_or_create_clinic(s, NORTH).id
        south = repo.get_or_create_clinic(s, SOUTH).id
        job = repo.create_job(s, north, "/exports/north").id
        target_job = repo.create_job(s, north, "/exports/north-2").id
        south_job = repo.create_job(s, south, "/exports/south")
        south_job.status = "done"
        # South's own failed file with the same patient id: South's, never North's to erase
        repo.add_job_items(s, south_job.id, [repo.JobItemSpec("ERASE-1_left.jpg", TARGET, "left")])
        [south_item] = repo.job_items(s, south_job.id)
        repo.set_job_item(s, south_item, status="failed", error="not an image")
    ids = add_images(
        url, store, TARGET, [("l.jpg", a, "left"), ("r.jpg", b, "right")], clinic=NORTH, bundle=True
    )
    twice = add_images(url, store, TARGET, [("c.jpg", c, "left"), ("c.jpg", c, "left")], clinic=NORTH)
    [in_job] = add_images(url, store, TARGET, [("ERASE-1_right.jpg", f, "right")], clinic=NORTH, job_id=job)
    keep = add_images(url, store, KEEP, [("c.jpg", c, "left")], clinic=NORTH)
    [keep_in_job] = add_images(url, store, KEEP, [("KEEP-2_right.jpg", d, "right")], clinic=NORTH, job_id=job)
    south_ids = add_images(url, store, TARGET, [("a.jpg", a, "left"), ("e.jpg", e, "right")], clinic=SOUTH)
    with session_scope(url) as s:
        specs = [
            repo.JobItemSpec("ERASE-1_right.jpg", TARGET, "right"),
            repo.JobItemSpec("KEEP-2_right.jpg", KEEP, "right"),
            repo.JobItemSpec("ERASE-1_left.jpg", TARGET, "left"),  # a file that failed
        ]
        repo.add_job_items(s, job, specs)
        first, second, broken = repo.job_items(s, job)
        repo.set_job_item(s, first, status="queued", image_id=in_job)
        repo.set_job_item(s, second, status="queued", image_id=keep_in_job)
        repo.set_job_item(s, broken, status="failed", error="not an image")
        repo.add_job_items(s, target_job, [repo.JobItemSpec("c.jpg", TARGET, "left")])
        [linked] = repo.job_items(s, target_job)
        repo.set_job_item(s, linked, status="done", image_id=twice[0])
        job_row = s.get(ScoringJob, target_job)
        assert job_row is not None
        job_row.status = "done"
        for kind, resource in (("bundle", _bundle_of(s, ids[0])), ("image", twice[0]), ("image", keep[0])):
            s.add(IdempotencyKey(clinic_id=north, kind=kind, key_hash=os.urandom(16).hex(),
                                 fingerprint="f" * 64, resource_id=resource))  # fmt: skip
        s.add(IdempotencyKey(clinic_id=south, kind="image", key_hash=os.urandom(16).hex(),
                             fingerprint="f" * 64, resource_id=south_ids[0]))  # fmt: skip
    everything = [*ids, *twice, in_job, *keep, keep_in_job, *south_ids]
    ens = StubEnsemble(maps_in_pass=True)  # heatmaps drawn and recorded with the grades
    summary = scoring.score_images(
        everything, ensemble=ens, store=store, db_url=url, enqueue=Sent(), explain=True
    )
    assert sorted(summary.scored + summary.ungradable) == sorted(everything), summary
    world = World(
        url,
        store,
        north,
        south,
        _patient_id(url, NORTH, TARGET),
        _patient_id(url, NORTH, KEEP),
        _patient_id(url, SOUTH, TARGET),
        job,
        target_job,
    )
    with session_scope(url) as s:
        for patient in (world.target, world.south_target):
            clinic = north if patient == world.target else south
            repo.record_audit(
                s, action="patient.read", clinic_id=clinic, patient_id=patient, target_type="patient"
            )
        assert s.scalar(select(Explanation.id).limit(1)) is not None, "no heatmap recorded: nothing tested"
    return world


def _bundle_of(session: Any, image_id: str) -> str:
    image = repo.get_image(session, image_id)
    assert image is not None and image.bundle_id is not None
    return image.bundle_id


# --------------------------------------------------------------------------------- observations


def dump(url: str) -> dict[str, dict[tuple[Any, ...], tuple[Any, ...]]]:
    """Every row of every table: table -> primary key -> the row."""
    out: dict[str, dict[tuple[Any, ...], tuple[Any, ...]]] = {}
    with get_engine(url).connect() as conn:
        for table in metadata.sorted_tables:
            pk = [table.c[c.name] for c in table.primary_key.columns]
            rows = conn.execute(select(table)).mappings().all()
            out[table.name] = {tuple(r[c.name] for c in pk): tuple(r.values()) for r in rows}
    return out


def files(store: FileStore) -> set[str]:
    """The photographs and heatmaps in the store (not its deployment key or its restore ledger)."""
    root = store.root
    if not root.exists():
        return set()
    return {
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.is_file() and p.name not in (KEY_FILE, LEDGER_FILE)
    }


def owned_by(url: str, patient: int) -> dict[str, set[tuple[Any, ...]]]:
    """Primary keys of the rows that are the patient's, table by table."""
    with session_scope(url) as s:
        clinic, external = s.execute(
            select(Patient.clinic_id, Patient.external_id).where(Patient.id == patient)
        ).one()
        images = set(s.scalars(select(Image.id).where(Image.patient_id == patient)))
        bundles = set(s.scalars(select(Bundle.id).where(Bundle.patient_id == patient)))
        items = {
            item.id
            for item, job_clinic in s.execute(
                select(ScoringJobItem, ScoringJob.clinic_id).join(
                    ScoringJob, ScoringJob.id == ScoringJobItem.job_id
                )
            )
            if item.image_id in images or (job_clinic == clinic and item.patient_external_id == external)
        }
        keys = {
            k.id
            for k in s.scalars(select(IdempotencyKey))
            if (k.kind, k.resource_id) in {("image", i) for i in images} | {("bundle", b) for b in bundles}
        }
        return {
            "patient": {(patient,)},
            "image": {(i,) for i in images},
            "bundle": {(b,) for b in bundles},
            "prediction": {
                (i,) for i in s.scalars(select(Prediction.id).where(Prediction.image_id.in_(images)))
            },
            "explanation": {
                (i,) for i in s.scalars(select(Explanation.id).where(Explanation.image_id.in_(images)))
            },
            "eye_result": {
                (i,) for i in s.scalars(select(EyeResult.id).where(EyeResult.patient_id == patient))
            },
            "patient_result": {
                (i,) for i in s.scalars(select(PatientResult.id).where(PatientResult.patient_id == patient))
            },
            "scoring_job_item": {(i,) for i in items},
            "idempotency_key": {(i,) for i in keys},
        }


def files_of(url: str, patient: int) -> set[str]:
    """The stored files of the patient's rows that no other row references."""
    with session_scope(url) as s:
        mine = set(s.scalars(select(Image.stored_path).where(Image.patient_id == patient)))
        mine |= set(
            s.scalars(
                select(Explanation.stored_path)
                .join(Image, Image.id == Explanation.image_id)
                .where(Image.patient_id == patient)
            )
        )
        others = set(s.scalars(select(Image.stored_path).where(Image.patient_id != patient)))
        others |= set(
            s.scalars(
                select(Explanation.stored_path)
                .join(Image, Image.id == Explanation.image_id)
                .where(Image.patient_id != patient)
            )
        )
    return mine - others


def shared_files_of(url: str, patient: int) -> set[str]:
    with session_scope(url) as s:
        mine = set(s.scalars(select(Image.stored_path).where(Image.patient_id == patient)))
        others = set(s.scalars(select(Image.stored_path).where(Image.patient_id != patient)))
    return mine & others


def age(url: str, patient: int, days: float) -> None:
    """Make every photograph (uploaded and last sent) and the row of the patient ``days`` old."""
    at = utcnow() - timedelta(days=days)
    with session_scope(url) as s:
        s.execute(update(Image).where(Image.patient_id == patient).values(created_at=at, sent_at=at))
        s.execute(update(Patient).where(Patient.id == patient).values(created_at=at))


def audit_rows(url: str, action: str) -> list[AuditEvent]:
    with session_scope(url) as s:
        return list(s.scalars(select(AuditEvent).where(AuditEvent.action == action).order_by(AuditEvent.id)))


def assert_only_patient_gone(
    before: dict[str, dict[tuple[Any, ...], tuple[Any, ...]]],
    after: dict[str, dict[tuple[Any, ...], tuple[Any, ...]]],
    gone: dict[str, set[tuple[Any, ...]]],
) -> None:
    """Every row not in ``gone`` is still there, unchanged, and those in ``gone`` are not (folder
    jobs, recounted, and audit rows, unlinked from the patient, are checked by the tests)."""
    for table, rows in before.items():
        if table in ("scoring_job", "audit_event", "api_key", "web_session"):
            continue
        expected = {k: v for k, v in rows.items() if k not in gone.get(table, set())}
        assert after[table] == expected, table
