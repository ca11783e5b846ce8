"""Repository round trips on real PostgreSQL (upserts use the PostgreSQL dialect here)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy.orm import Session

from core import repository as repo
from core.aggregation import argmax_grade
from core.db import get_sessionmaker, session_scope
from core.tables import Clinic, ScoringJob


@pytest.fixture
def session(pg_url: str) -> Iterator[Session]:
    s = get_sessionmaker(pg_url)()
    try:
        yield s
        s.commit()
    finally:
        s.close()


def _clinic(session: Session) -> int:
    return repo.get_or_create_clinic(session, f"clinic-{uuid.uuid4().hex[:8]}").id


def test_keys_patients_images_predictions(session: Session) -> None:
    clinic_id = _clinic(session)
    clinic = session.get(Clinic, clinic_id)
    assert clinic is not None
    row, key = repo.create_api_key(session, clinic)
    found = repo.authenticate_api_key(session, key)
    assert found is not None and found.id == row.id and found.clinic.id == clinic_id
    assert row.key_hash != key and key not in row.key_hash

    p1 = repo.get_or_create_patient(session, clinic_id, "P-1")
    assert repo.get_or_create_patient(session, clinic_id, "P-1").id == p1.id
    images = [
        repo.create_image(
            session,
            clinic_id=clinic_id,
            patient_id=p1.id,
            eye=eye,
            sha256=eye[0] * 64,  # two photographs (one as both eyes counts for neither)
            stored_path="aa/aa/x.png",
            size_bytes=10,
        )
        for eye in ("left", "right")
    ]
    mv = repo.get_or_create_model_version(session, "ens@1.0.0", {"metrics": {}})
    assert repo.get_or_create_model_version(session, "ens@1.0.0").id == mv.id
    for im, probs in zip(images, ([0.1, 0.7, 0.1, 0.05, 0.05], [0.0, 0.1, 0.2, 0.6, 0.1]), strict=True):
        assert repo.claim_image(session, im.id) is not None
        for _ in range(2):  # a redelivered task writes the same row again
            repo.upsert_prediction(
                session,
                image_id=im.id,
                model_version_id=mv.id,
                grade=argmax_grade(probs),
                probabilities=probs,
                members={"m@1": probs},
                referable=argmax_grade(probs) >= 2,
            )
        repo.mark_image_done(session, im, quality={"gradable": True}, gradable=True)
        assert repo.claim_image(session, im.id) is None  # done -> status guard
    result = repo.recompute_patient(session, p1.id, model_version_id=mv.id, grade_fn=argmax_grade)
    assert (result.grade, result.referable) == (3, True)
    assert {e.eye: e.grade for e in result.eyes} == {"left": 1, "right": 3}
    repo.recompute_patient(session, p1.id, model_version_id=mv.id, grade_fn=argmax_grade)
    history = repo.patient_history(session, p1.id)
    assert len(history) == 2 and history[0].is_current and not history[1].is_current
    ex = repo.upsert_explanation(
        session, image_id=images[0].id, model_version_id=mv.id, sha256="b" * 64, stored_path="p1"
    )
    ex2 = repo.upsert_explanation(
        session, image_id=images[0].id, model_version_id=mv.id, sha256="c" * 64, stored_path="p2"
    )
    assert ex.id == ex2.id and ex2.stored_path == "p2"


def test_jobs_and_foreign_clinic(pg_url: str) -> None:
    with session_scope(pg_url) as s:
        a, b = _clinic(s), _clinic(s)
        job = repo.create_job(s, a, "/data/x")
        specs = [repo.JobItemSpec(f"img{i}.png", "P", "left") for i in range(3)]
        repo.add_job_items(s, job.id, specs)
        repo.add_job_items(s, job.id, specs)  # idempotent
        job_id = job.id
    with session_scope(pg_url) as s:
        assert len(repo.job_items(s, job_id)) == 3
        assert repo.get_job(s, job_id, clinic_id=b) is None
        items = repo.job_items(s, job_id)
        repo.set_job_item(s, items[0], status="failed", error="not an image")
        counts = repo.refresh_job_counts(s, job_id)
        assert (counts.total, counts.done, counts.failed, counts.status) == (3, 0, 1, "running")


def test_rescore_queries_on_postgresql(session: Session) -> None:
    """Which finished photographs a release must (re-)score: those only earlier versions scored."""
    clinic_id = _clinic(session)
    patient = repo.get_or_create_patient(session, clinic_id, "P-rescore")
    suffix = uuid.uuid4().hex[:8]  # versions are shared by the whole test database
    old, new, newer = (
        repo.get_or_create_model_version(session, f"ens-{suffix}@{v}") for v in ("1", "2", "3")
    )
    images = []
    for i, scored_by in enumerate(([old], [old, new], [newer], [])):
        im = repo.create_image(
            session,
            clinic_id=clinic_id,
            patient_id=patient.id,
            eye="left",
            sha256=f"{i}" * 64,
            stored_path=f"r/{i}.png",
            size_bytes=10,
        )
        for mv in scored_by:
            repo.upsert_prediction(
                session,
                image_id=im.id,
                model_version_id=mv.id,
                grade=0,
                probabilities=[1, 0, 0, 0, 0],
                members=None,
                referable=False,
            )
        if scored_by:
            repo.mark_image_done(session, im, quality=None, gradable=True)
        images.append(im)
    only_old, old_and_new, only_newer, queued = images

    assert [im.id for im in repo.images_to_rescore(session, patient.id, new.id)] == [only_old.id]
    assert [im.id for im in repo.images_to_rescore(session, patient.id, old.id)] == []
    assert repo.needs_rescoring(session, only_old, new.ref)
    assert not repo.needs_rescoring(session, old_and_new, new.ref)
    assert not repo.needs_rescoring(session, only_newer, new.ref)  # a later release's grade stays
    assert not repo.needs_rescoring(session, queued, new.ref)  # not finished: scored anyway
    assert repo.needs_rescoring(session, old_and_new, f"ens-{suffix}@unseen")


def test_a_folder_of_more_files_than_postgresql_binds_in_one_statement(pg_url: str) -> None:
    """10,000 items x 7 values passed PostgreSQL's 65,535 bound parameters in one INSERT."""
    with session_scope(pg_url) as s:
        job = repo.create_job(s, _clinic(s), "/data/big")
        specs = [repo.JobItemSpec(f"{i}_left.jpg", str(i), "left") for i in range(10_000)]
        repo.add_job_items(s, job.id, specs)
        job_id = job.id
    with session_scope(pg_url) as s:
        assert len(repo.job_items(s, job_id)) == 10_000


def test_ensure_patient_says_whether_it_created_the_row(pg_url: str) -> None:
    with session_scope(pg_url) as s:
        clinic = _clinic(s)
        assert repo.ensure_patient(s, clinic, "P-9")[1]
    with session_scope(pg_url) as s:
        assert not repo.ensure_patient(s, clinic, "P-9")[1]


def test_timestamps_read_back_in_utc_whatever_the_servers_time_zone() -> None:
    """The migration review (session 29): a server whose time zone is not UTC (Debian's initdb takes
    the host's) returned every timestamp in it, and the web pages printed New York time under
    "(UTC)". Every connection now asks for UTC."""
    from datetime import UTC, datetime, timedelta

    import psycopg

    from core.db import dispose_engines, make_engine
    from tests.conftest import PG_ADMIN_URL, _psycopg_url, fresh_pg_database

    with fresh_pg_database() as url:
        name = url.rsplit("/", 1)[1]
        with psycopg.connect(_psycopg_url(PG_ADMIN_URL), autocommit=True) as admin:
            admin.execute(f"ALTER DATABASE \"{name}\" SET timezone TO 'America/New_York'")
        dispose_engines()
        noon = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)
        with session_scope(url) as s:
            clinic = repo.get_or_create_clinic(s, "Zone clinic")
            job = repo.create_job(s, clinic.id, "/import/x")
            job.created_at = noon
            job_id = job.id
        # also with startup options of the operator's own in the URL (they replaced the time zone)
        for engine_url in (url, f"{url}?options=-csearch_path%3Dpublic"):
            engine = make_engine(engine_url)
            try:
                with Session(engine) as s:
                    read = s.get(ScoringJob, job_id)
                    assert read is not None
                    assert read.created_at.utcoffset() == timedelta(0) and read.created_at.hour == 12
            finally:
                engine.dispose()


def test_keys_and_worker_refuse_what_postgresql_cannot_hold_in_one_line(pg_url: str) -> None:
    """The migration review (session 29): a clinic name or key label over 200 characters and a key
    id over int4 were tracebacks on PostgreSQL (SQLite took them); a worker node name over 255 could
    never claim a photograph."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    drscreen = Path(sys.executable).with_name("drscreen")
    env = {**os.environ, "DRSCREEN_DATABASE_URL": pg_url}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([drscreen, *args], env=env, capture_output=True, text=True, timeout=120)

    for args, rc, message in [
        (("keys", "create", "--clinic", "C" * 201), 2, "clinic name is longer than 200 characters"),
        (("keys", "create", "--clinic", "North", "--label", "L" * 201), 2, "key label is longer than 200"),
        (("keys", "revoke", "99999999999"), 1, "no active key matched"),
        (("worker", "--hostname", "celery@" + "h" * 250), 2, "--hostname is longer than 255 characters"),
    ]:
        result = run(*args)
        assert result.returncode == rc and message in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, (
            result.stderr
        )
    with session_scope(pg_url) as s:
        assert repo.get_clinic_by_name(s, "C" * 201) is None
