"""Two workers finishing photographs of one patient at the same time, on real PostgreSQL and Redis
with two real ``drscreen worker`` processes (the dev ensemble).

Each worker's write recomputes the patient's result from the photographs it can see. Without a
lock on the patient, both read the patient while the other's grades were uncommitted: each
recorded a result that counted the other's photographs as ungradable, and both stayed current
(the session-32 race review). The window is widened, not faked: this test holds the patient's
current result row locked from its own connection until both workers' writes are waiting for it,
then lets go; the workers' code path is the real one.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from celery import Celery
from sqlalchemy import select, update

from core import producer, tasks
from core import repository as repo
from core.db import session_scope
from core.settings import Settings, get_settings
from core.store import FileStore
from core.tables import Bundle, Image, PatientResult, ScoringJob, utcnow
from tests.conftest import WorkerProcess, _psycopg_url
from tests.unit.test_workers_scoring import add_images

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

PHOTOS = Path("/work/shared/data/eyepacs-natural-512/images")
DEV_MODEL = "drscreen-dev@0.1.0"
REPO_ROOT = Path(__file__).resolve().parents[2]
WORKER_READY_S = 240
WAIT_S = 300


@dataclass
class Two:
    url: str
    imports: Path
    store: FileStore
    app: Celery
    workers: list[WorkerProcess]

    def logs(self) -> str:
        return "\n".join(w.output()[-4000:] for w in self.workers)


@pytest.fixture
def two_workers(
    own_pg_url: str,
    redis_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    start_worker: Callable[..., WorkerProcess],
) -> Iterator[Two]:
    models_dir = Path(os.environ.get("DRSCREEN_TEST_MODELS_DIR") or REPO_ROOT / "models")
    (tmp_path / "imports").mkdir()
    env = {
        "DRSCREEN_DATABASE_URL": own_pg_url,
        "DRSCREEN_BROKER_URL": redis_url,
        "DRSCREEN_VAR_DIR": str(tmp_path / "var"),
        "DRSCREEN_STORE_DIR": str(tmp_path / "store"),
        "DRSCREEN_MODEL": DEV_MODEL,
        "DRSCREEN_MODELS_DIR": str(models_dir),
        "DRSCREEN_TORCH_THREADS": "1",
        "DRSCREEN_SWEEP_INTERVAL_S": "0",  # nothing but this test's messages
        "DRSCREEN_EXPLAIN": "false",
        "DRSCREEN_IMPORT_ROOTS": str(tmp_path / "imports"),
        "OMP_NUM_THREADS": "1",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    get_settings.cache_clear()
    # one at a time: two model loads at once on a 2-core box only slow both
    workers = [start_worker(env=env, ready_timeout=WORKER_READY_S) for _ in range(2)]
    settings = Settings()
    yield Two(
        own_pg_url,
        tmp_path / "imports",
        FileStore(settings.store_path),
        producer.make_producer_app(settings),
        workers,
    )


def _add(two: Two, patient: str, name: str, *, eye: str, bundle: bool) -> str:
    files = [(name, (PHOTOS / name).read_bytes(), eye)]
    return add_images(two.url, two.store, patient, files, clinic="Race clinic", bundle=bundle)[0]


def _wait(check: Callable[[], bool], two: Two, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}; worker logs:\n{two.logs()}")


def _done(two: Two, ids: list[str]) -> Callable[[], bool]:
    def check() -> bool:
        with session_scope(two.url) as s:
            return all(st == "done" for st in s.scalars(select(Image.status).where(Image.id.in_(ids))))

    return check


def _lock_waiters(admin: psycopg.Connection, database: str) -> int:
    """Backends of this test's database waiting for a lock (the workers' writes)."""
    row = admin.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND wait_event_type = 'Lock'",
        (database,),
    ).fetchone()
    return int(row[0]) if row else 0


def test_both_eyes_finishing_at_once_leave_one_current_result_counting_both(two_workers: Two) -> None:
    """A clinic uploads a returning patient's left and right photographs at once (``POST
    /v1/images`` per eye: one task each); two workers grade them side by side."""
    two = two_workers
    # The patient's earlier visit, a month ago: scored, so the patient has a current result
    # (from then) that each worker's write replaces. Both eyes, graded 0: a standing referral
    # would be held while the new visit is graded (repository.held_referral), and only one
    # write would replace it.
    earlier = [
        _add(two, "RACE-1", "1017_left.jpg", eye="left", bundle=False),
        _add(two, "RACE-1", "1017_right.jpg", eye="right", bundle=False),
    ]
    producer.send(tasks.SCORE_IMAGES, [earlier], {"explain": False}, app=two.app)
    _wait(_done(two, earlier), two, "the earlier visit")
    with session_scope(two.url) as s:
        s.execute(update(Image).where(Image.id.in_(earlier)).values(created_at=utcnow() - timedelta(days=30)))
        patient_id = s.scalars(select(Image.patient_id).where(Image.id == earlier[0])).one()
        before = repo.get_current_patient_result(s, patient_id)
        assert before is not None and not before.referable, "the earlier visit should not refer"
    left = _add(two, "RACE-1", "1012_left.jpg", eye="left", bundle=False)
    right = _add(two, "RACE-1", "1012_right.jpg", eye="right", bundle=False)
    database = two.url.rsplit("/", 1)[1]
    with (
        psycopg.connect(_psycopg_url(two.url)) as holder,
        psycopg.connect(_psycopg_url(two.url), autocommit=True) as admin,
    ):
        # Each write replaces the current result (it is locked then): holding that row locked
        # keeps both workers' writes open until each has read the patient's photographs.
        holder.execute(
            "SELECT id FROM patient_result WHERE patient_id = %s AND is_current FOR UPDATE", (patient_id,)
        ).fetchall()
        producer.send(tasks.SCORE_IMAGES, [[left]], {"explain": False}, app=two.app)
        producer.send(tasks.SCORE_IMAGES, [[right]], {"explain": False}, app=two.app)
        # one worker per task: a worker (concurrency 1, prefetch 1) blocked in its write takes
        # no second message, so the other worker has it
        _wait(lambda: _lock_waiters(admin, database) >= 2, two, "both workers' writes to wait")
        holder.rollback()  # let go: both writes go on
    _wait(_done(two, [left, right]), two, "both photographs")

    with session_scope(two.url) as s:
        current = list(
            s.scalars(
                select(PatientResult).where(
                    PatientResult.patient_id == patient_id, PatientResult.is_current.is_(True)
                )
            )
        )
        shown = repo.get_current_patient_result(s, patient_id)
        assert shown is not None
        graded = dict(s.execute(select(Image.eye, Image.gradable).where(Image.id.in_([left, right]))).all())
        figures = {
            "current_results": len(current),
            "photographs_gradable": graded,
            "current": [
                {"referable": r.referable, "eyes": {e.eye: e.gradable for e in r.eyes}} for r in current
            ],
            "shown": {
                "grade": shown.grade,
                "gradable": shown.gradable,
                "referable": shown.referable,
                "eyes_gradable": {e.eye: e.gradable for e in shown.eyes},
            },
        }
    print("patient result race:", figures)
    assert "deadlock" not in two.logs(), two.logs()
    assert len(current) == 1, figures
    # what the clinic is shown counts both photographs, each eye as it was graded
    assert {e.eye: e.image_ids for e in shown.eyes} == {"left": [left], "right": [right]}, figures
    assert {e.eye: e.gradable for e in shown.eyes} == graded, figures


def test_two_chunks_of_a_folder_job_finishing_at_once_finish_the_job(two_workers: Two) -> None:
    """A folder job's chunks are graded by two workers side by side (the scaling story). Each
    chunk's write recounts the job; both counted while the other's grades were uncommitted, and
    the later write stored its count over the earlier one's: the job stayed ``running`` with half
    its photographs counted (``drscreen status``'s open jobs, until a client read the job)."""
    from workers.folders import expand_folder

    two = two_workers
    # a first photograph graded: the release's row exists (a first write inserting it would make
    # the other wait for it)
    warm = _add(two, "WARM", "1020_left.jpg", eye="left", bundle=False)
    producer.send(tasks.SCORE_IMAGES, [[warm]], {"explain": False}, app=two.app)
    _wait(_done(two, [warm]), two, "the first photograph")
    folder = two.imports / "export"
    folder.mkdir()
    for name in ("1012_left.jpg", "1012_right.jpg", "1017_left.jpg", "1017_right.jpg"):
        (folder / name).write_bytes((PHOTOS / name).read_bytes())
    with session_scope(two.url) as s:
        clinic = repo.get_or_create_clinic(s, "Race clinic")
        job_id = repo.create_job(s, clinic.id, str(folder)).id
    sent: list[tuple[str, list[Any], dict[str, Any]]] = []
    # the expansion itself, in this process: its chunk messages are published below, once the
    # job's row is held
    expand_folder(job_id, db_url=two.url, enqueue=lambda *m: sent.append(m), chunk=2)
    chunks = [m for m in sent if m[0] == tasks.SCORE_IMAGES]
    assert len(chunks) == 2, sent
    database = two.url.rsplit("/", 1)[1]
    with (
        psycopg.connect(_psycopg_url(two.url)) as holder,
        psycopg.connect(_psycopg_url(two.url), autocommit=True) as admin,
    ):
        # NO KEY UPDATE: the writes' foreign-key checks on the job pass, their update of it waits
        holder.execute("SELECT id FROM scoring_job WHERE id = %s FOR NO KEY UPDATE", (job_id,)).fetchall()
        for name, args, kwargs in chunks:
            producer.send(name, args, kwargs, app=two.app)
        _wait(lambda: _lock_waiters(admin, database) >= 2, two, "both chunks to wait for the job")
        holder.rollback()
    ids = [i for _, args, _ in chunks for i in args[0]]
    _wait(_done(two, ids), two, "both chunks")
    with session_scope(two.url) as s:
        job = s.get(ScoringJob, job_id)  # as stored: no reader has recounted it
        assert job is not None
        stored = {"status": job.status, "total": job.total, "done": job.done, "failed": job.failed}
    print("folder job race:", stored)
    assert "deadlock" not in two.logs(), two.logs()
    assert stored == {"status": "done", "total": 4, "done": 4, "failed": 0}, stored


def test_two_photographs_of_one_bundle_finishing_at_once_finish_the_bundle(two_workers: Two) -> None:
    """``refresh_bundle_status`` counts the bundle's photographs, then writes its status (the
    home page's recent screenings read it). Two tasks writing photographs of one bundle at once
    (a sweep re-sending part of a visit, or a visit's photographs split over two messages) could
    each count while the other's grade was uncommitted and leave it ``running`` for good. A bundle
    is one patient's, so the patient's lock (``lock_patients_for_result``, taken before the count)
    serialises the two writes; the bundle row is held here until both writes wait."""
    two = two_workers
    warm = _add(two, "WARM", "1020_left.jpg", eye="left", bundle=False)
    producer.send(tasks.SCORE_IMAGES, [[warm]], {"explain": False}, app=two.app)
    _wait(_done(two, [warm]), two, "the first photograph")
    files = [
        (n, (PHOTOS / n).read_bytes(), e) for n, e in (("1012_left.jpg", "left"), ("1012_right.jpg", "right"))
    ]
    ids = add_images(two.url, two.store, "RACE-B", files, clinic="Race clinic", bundle=True)
    with session_scope(two.url) as s:
        bundle_id = s.get_one(Image, ids[0]).bundle_id
    database = two.url.rsplit("/", 1)[1]
    with (
        psycopg.connect(_psycopg_url(two.url)) as holder,
        psycopg.connect(_psycopg_url(two.url), autocommit=True) as admin,
    ):
        # NO KEY UPDATE: the claims' and writes' foreign-key checks pass, their update of it waits
        holder.execute("SELECT id FROM bundle WHERE id = %s FOR NO KEY UPDATE", (bundle_id,)).fetchall()
        for image_id in ids:  # one message per photograph: one worker each
            producer.send(tasks.SCORE_IMAGES, [[image_id]], {"explain": False}, app=two.app)
        _wait(lambda: _lock_waiters(admin, database) >= 2, two, "both tasks to wait")
        holder.rollback()
    _wait(_done(two, ids), two, "both photographs")
    with session_scope(two.url) as s:
        stored = s.get_one(Bundle, bundle_id).status  # as stored: no reader has recounted it
    print("bundle race:", stored)
    assert "deadlock" not in two.logs(), two.logs()
    assert stored == "done", stored
